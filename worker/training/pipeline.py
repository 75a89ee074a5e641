"""The fine-tune pipeline: fetch the data set, resume or start from the base, train step by step, publish a version.

Plain function over injected side effects (storage, model store, reporter), like :mod:`worker.generate.pipeline`; the
Celery task in :mod:`worker.tasks` only decodes the payload, and :mod:`worker.jobs` holds the lease and maps errors.

Crash safety: a checkpoint goes to storage every ``checkpoint_every`` steps; a redelivered job resumes from it (the
view says ``resumed_from``). The version to publish is recorded in the job before any file is written, so a worker
that dies while publishing is followed by one that finishes that same version instead of allocating another.

Ownership: the version is published into the job's owner's namespace (:attr:`FineTuneJob.target`: the tenant's own
model, or the system's for a job without a tenant) and only that model's aliases move. A gate passes only when it
measured at least one threshold: an empty gate never promotes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from models.augment import AugmentConfig
from models.classifier import load_classifier
from models.data import LabelledImages
from models.evaluate import reference_scores
from models.events import RunEvents
from models.finetune import FineTuneConfig, FineTuner, init_from_base
from models.generator import load_generator
from models.grid import class_grid, encode_png
from producer.contract import FineTuneJob, TrainingView
from producer.core import constants
from worker.catalog.store import ModelStore
from worker.errors import ObjectNotFound, UnsafeUpload
from worker.storage.base import Storage
from worker.training.ingest import ArchiveLimits, extract_archive, load_dataset_dir, safe_relative_key

log = logging.getLogger("genq.training")

CHECKPOINT_NAME = "checkpoint.safetensors"
EVENTS_DIR = "tensorboard/"  # under the job's training prefix, beside the checkpoint: TensorBoard event files
GRID_SEEDS = list(range(8))  # columns of every sample grid: the same latents at every step, so grids compare
EVAL_PER_CLASS = 100  # generated images per class for the in-training evaluation (seconds, not minutes)
_MODEL_FILES = ("weights.safetensors", "config.json", "discriminator.safetensors")


class TrainingReport(Protocol):
    """What the pipeline tells the outside world (Redis and callbacks in a worker)."""

    def begin(self, job: FineTuneJob) -> bool:
        """Mark the job running; False if it already ended (then nothing runs)."""
        ...

    def active(self, job: FineTuneJob) -> bool:
        """False once the job was canceled or failed elsewhere: stop at the next step."""
        ...

    def current(self, job: FineTuneJob) -> TrainingView | None: ...

    def training(self, job: FineTuneJob, view: TrainingView, *, announce: bool = False) -> None: ...

    def trained(self, job: FineTuneJob, view: TrainingView) -> None: ...


@dataclass(frozen=True)
class FineTuneResult:
    """How a delivery ended: ``published`` (name@version), ``stopped`` (canceled/lost lease) or ``skipped``."""

    view: TrainingView | None
    published: str | None = None
    stopped: bool = False
    skipped: bool = False


def training_prefix(job: FineTuneJob) -> str:
    return constants.TRAINING_PREFIX.format(job_id=job.job_id)


def finetune_config(job: FineTuneJob) -> FineTuneConfig:
    """The models-level configuration of a job."""
    return FineTuneConfig(
        steps=job.steps,
        batch_size=job.batch_size,
        lr_g=job.lr_g,
        lr_d=job.lr_d,
        seed=job.seed % 2**63,
        freeze_d=job.freeze_d,
        augment=AugmentConfig(policy=tuple(job.augment.policy), ada_target=job.augment.ada_target),
    )


def fetch_dataset(
    job: FineTuneJob,
    storage: Storage,
    dest: Path,
    *,
    resolution: int,
    channels: int,
    limits: ArchiveLimits,
) -> tuple[LabelledImages, list[str], dict[str, int]]:
    """Download the job's data set (a folder of objects or one archive) into ``dest`` and load it.

    Returns the images, the skipped files with their reasons, and the per-class counts.
    Raises DatasetError / UnsafeUpload / InvalidArchive (permanent: the job fails with the reason) or storage errors.
    """
    dest.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    key = job.dataset_key
    if key.endswith("/"):
        keys = [k for k in storage.list(key) if not k.endswith("/")]  # "folder" marker objects hold nothing
        if not keys:
            raise ObjectNotFound(f"the data set {key!r} is empty or was never uploaded")
        if len(keys) > limits.max_members:
            raise UnsafeUpload(f"the data set {key!r} has {len(keys)} files, more than {limits.max_members}")
        total = 0
        for k in keys:
            target = dest / safe_relative_key(k, key)
            body = storage.get(k)
            total += len(body)
            if len(body) > limits.max_member_bytes or total > limits.max_total_bytes:
                raise UnsafeUpload(
                    f"the data set {key!r} is larger than the limit ({limits.max_member_bytes} bytes a file, "
                    f"{limits.max_total_bytes} in all) at {k!r}"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
    elif key.lower().endswith(".npz"):
        (dest / "data.npz").write_bytes(storage.get(key))
    else:
        skipped += [f"{member}: {reason}" for member, reason in extract_archive(storage.get(key), key, dest, limits)]
    data, report = load_dataset_dir(dest, resolution=resolution, channels=channels, class_names=job.classes)
    skipped += [f"{path}: {reason}" for path, reason in report.skipped]
    return data, skipped, dict(report.counts)


def run_finetune(
    job: FineTuneJob,
    *,
    storage: Storage,
    models: ModelStore,
    base_dir: Path,
    workdir: Path,
    reporter: TrainingReport,
    allocate_version: Callable[[str], str],
    on_published: Callable[[str, str], None],
    keep_going: Callable[[], bool] = lambda: True,
    limits: ArchiveLimits | None = None,
    url_expires_s: int = 3600,
) -> FineTuneResult:
    """Run (or resume) ``job`` to the end and publish its model; see the module docstring.

    Args:
        base_dir: the base model's folder (weights, config, and discriminator when it has one).
        workdir: scratch space for this delivery (data set, checkpoint, export); the caller removes it.
        allocate_version: the next version number of a model, by catalogue key (atomic across workers).
        on_published: told (catalogue key, version) once the version is stored, to refresh catalogues.
        keep_going: False once this worker lost its lease: stop without touching the job.
        url_expires_s: how long the presigned URL of each sample grid lives (``GENQ_S3__PRESIGN_EXPIRES_S``); only
            jobs without a tenant get one (``samples_url``).
    """
    if not reporter.begin(job):
        return FineTuneResult(view=None, skipped=True)
    earlier = reporter.current(job)
    claimed = _claimed_version(job, earlier)
    if earlier is not None and claimed is not None and models.has_version(job.target, claimed):
        return _finish(job, earlier, models, reporter, on_published)  # published by a worker that died right after

    base_cfg = json.loads((base_dir / "config.json").read_text())
    data, skipped, counts = fetch_dataset(
        job,
        storage,
        workdir / "data",
        resolution=int(base_cfg["resolution"]),
        channels=int(base_cfg["channels"]),
        limits=limits or ArchiveLimits(),
    )
    cfg = finetune_config(job)
    prefix = training_prefix(job)
    ckpt_path = workdir / CHECKPOINT_NAME
    resumed_from: int | None = None
    try:
        ckpt_path.write_bytes(storage.get(prefix + CHECKPOINT_NAME))
        tuner = FineTuner.load_checkpoint(ckpt_path, data, cfg)
        resumed_from = tuner.step
        log.info("job %s resumes from its checkpoint at step %d of %d", job.job_id, tuner.step, job.steps)
    except ObjectNotFound:
        state, model_cfg, mapping = init_from_base(base_dir, data.class_names, cfg, data=data)
        tuner = FineTuner(state, model_cfg, data, cfg)
        log.info(
            "job %s starts from %s@%s: classes reused %s, new %s (nearest base classes %s)",
            job.job_id, job.base_name, job.base_version, sorted(mapping.reused) or "none", list(mapping.new) or "none",
            mapping.nearest or "n/a",
        )  # fmt: skip
    view = (earlier or TrainingView(total_steps=job.steps)).model_copy(
        update={
            "total_steps": job.steps,
            "step": tuner.step,
            "resumed_from": resumed_from,
            "dataset": counts,
            "skipped": skipped[:100],
        }
    )
    reporter.training(job, view, announce=True)

    # a redelivery logs from one past its checkpoint; TensorBoard hides the earlier delivery's events from there on
    events = RunEvents.open(workdir / "tensorboard", purge_step=tuner.step + 1 if tuner.step else None)
    try:
        finished = _train_steps(job, tuner, view, data, workdir, events, storage, reporter, keep_going, url_expires_s)
        if isinstance(finished, FineTuneResult):
            events.close()
            _upload_events(events, storage, prefix)
            return finished
        view = finished
        export_dir = workdir / "export"
        tuner.export(export_dir)
        scores = _scores(export_dir, data, job.seed)
        events.scalars(tuner.step, {f"eval/{name}": value for name, value in scores.items()})
        events.close()
        _upload_events(events, storage, prefix)
    finally:
        events.close()
    gate_passed = _gate(job, scores)
    # A version claimed by a delivery that died before its config.json landed is finished, not claimed again.
    version = claimed if claimed is not None else allocate_version(job.target)
    view = view.model_copy(update={"metrics": scores, "gate_passed": gate_passed, "model": f"{job.name}@{version}"})
    reporter.training(job, view)  # the version is claimed before any file is written (see module docstring)
    files = {name: (export_dir / name).read_bytes() for name in _MODEL_FILES if (export_dir / name).is_file()}
    files["metrics.json"] = (json.dumps(scores, indent=2) + "\n").encode()
    files["samples.png"] = _grid_png(tuner)
    files["MODEL_CARD.md"] = model_card(job, version, view, scores, gate_passed).encode()
    models.publish(job.target, version, files)
    return _finish(job, view, models, reporter, on_published)


def _train_steps(
    job: FineTuneJob,
    tuner: FineTuner,
    view: TrainingView,
    data: LabelledImages,
    workdir: Path,
    events: RunEvents,
    storage: Storage,
    reporter: TrainingReport,
    keep_going: Callable[[], bool],
    url_expires_s: int,
) -> TrainingView | FineTuneResult:
    """Step ``tuner`` to ``job.steps`` with grids, evaluations, checkpoints and events; the last view, or how it
    stopped (canceled or lease lost)."""
    prefix = training_prefix(job)
    ckpt_path = workdir / CHECKPOINT_NAME
    started, start_step = time.monotonic(), tuner.step
    while tuner.step < job.steps:
        if not keep_going() or not reporter.active(job):
            log.info(
                "job %s stops at step %d: %s", job.job_id, tuner.step, "lease lost" if not keep_going() else "ended"
            )
            return FineTuneResult(view=view, stopped=True)
        stats = tuner.step_once()
        events.scalars(
            stats.step,
            {
                "loss/d": stats.d_loss,
                "loss/g": stats.g_loss,
                "lr/g": tuner.state.opt_g.param_groups[0]["lr"],
                "lr/d": tuner.state.opt_d.param_groups[0]["lr"],
                "augment/p": stats.augment_p,
                "speed/steps_per_s": stats.steps_per_s,
            },
        )
        rate = (tuner.step - start_step) / max(time.monotonic() - started, 1e-9)
        view = view.model_copy(
            update={
                "step": stats.step,
                "d_loss": round(stats.d_loss, 5),
                "g_loss": round(stats.g_loss, 5),
                "steps_per_s": round(rate, 3),
                "eta_s": round((job.steps - stats.step) / rate, 1) if rate > 0 else None,
                "augment_p": tuner.augment_p,
            }
        )
        announce = False
        last = tuner.step == job.steps
        if tuner.step % job.sample_every == 0 or last:
            key = f"{prefix}samples/step-{tuner.step:06d}.png"
            grid = class_grid(tuner.sample_grid(GRID_SEEDS), len(GRID_SEEDS))
            storage.put(key, encode_png(grid), "image/png")
            events.image(tuner.step, "samples", grid)
            # A presigned URL names the deployment's storage endpoint, bucket and credentials' key id (a local
            # store's, a worker folder): the operator's to see, never a tenant's, which gets the key like its outputs.
            url = storage.url(key, url_expires_s) if job.tenant is None else None
            view = view.model_copy(update={"samples_key": key, "samples_url": url})
            announce = True
        if job.eval_every and tuner.step % job.eval_every == 0 and not last:
            metrics = _evaluate(tuner, data, workdir / "eval", job.seed)
            events.scalars(tuner.step, {f"eval/{name}": value for name, value in metrics.items()})
            view = view.model_copy(update={"metrics": metrics})
            announce = True
        if tuner.step % job.checkpoint_every == 0 and not last:
            tuner.save_checkpoint(ckpt_path)
            storage.put(prefix + CHECKPOINT_NAME, ckpt_path.read_bytes(), "application/octet-stream")
            events.flush()
            _upload_events(events, storage, prefix)
            view = view.model_copy(update={"checkpoint_step": tuner.step})
        reporter.training(job, view, announce=announce)
    return view


def _upload_events(events: RunEvents, storage: Storage, prefix: str) -> None:
    """Copy this delivery's TensorBoard event files beside the job's checkpoint (nothing without tensorboard)."""
    for path in events.files:
        storage.put(prefix + EVENTS_DIR + path.name, path.read_bytes(), "application/octet-stream")


def _claimed_version(job: FineTuneJob, view: TrainingView | None) -> str | None:
    """The version an earlier delivery of ``job`` claimed (the view names it ``<name>@<version>``), if any."""
    if view is None or view.model is None:
        return None
    name, _, version = view.model.partition("@")
    return version if name == job.name and version else None


def _finish(
    job: FineTuneJob,
    view: TrainingView,
    models: ModelStore,
    reporter: TrainingReport,
    on_published: Callable[[str, str], None],
) -> FineTuneResult:
    version = _claimed_version(job, view)
    assert version is not None
    aliases = ["latest"]
    if job.gate is not None and view.gate_passed:
        aliases.append(job.gate.alias)
    models.set_aliases(job.target, {alias: version for alias in aliases})  # the job's own model only
    on_published(job.target, version)
    view = view.model_copy(update={"aliases": aliases})
    reporter.trained(job, view)
    log.info("job %s published %s (aliases: %s)", job.job_id, view.model, ", ".join(aliases))
    return FineTuneResult(view=view, published=view.model)


def _grid_png(tuner: FineTuner) -> bytes:
    return encode_png(class_grid(tuner.sample_grid(GRID_SEEDS), len(GRID_SEEDS)))


def _evaluate(tuner: FineTuner, data: LabelledImages, directory: Path, seed: int) -> dict[str, float]:
    tuner.export(directory)
    return _scores(directory, data, seed)


def _scores(export_dir: Path, data: LabelledImages, seed: int) -> dict[str, float]:
    """Label consistency and FID of the exported generator against the training images (see reference_scores)."""
    classifier, _card = load_classifier()
    with torch.no_grad():
        scores = reference_scores(load_generator(export_dir), data, classifier, EVAL_PER_CLASS, seed % 2**31)
    return {name: round(value, 5) for name, value in scores.items()}


def _gate(job: FineTuneJob, scores: dict[str, float]) -> bool | None:
    """Whether the promotion gate passes; None without a gate.

    A threshold on a metric not measured fails, and so does a gate with no threshold at all (requests refuse one;
    a job queued with one never promotes): a gate passes only on at least one measured threshold.
    """
    gate = job.gate
    if gate is None:
        return None
    checks: list[bool] = []
    if gate.min_label_consistency is not None:
        checks.append(scores.get("label_consistency", -1.0) >= gate.min_label_consistency)
    if gate.max_fid is not None:
        checks.append(scores.get("fid", float("inf")) <= gate.max_fid)
    if not checks:
        log.warning("job %s: its gate sets no threshold; %r does not move", job.job_id, gate.alias)
        return False
    return all(checks)


def model_card(
    job: FineTuneJob, version: str, view: TrainingView, scores: dict[str, float], gate_passed: bool | None
) -> str:
    """A short Markdown card: where the version came from, its data, its settings and its scores."""
    lines = [
        f"# {job.name}@{version}",
        "",
        f"Fine-tuned from `{job.base_name}@{job.base_version}` by job `{job.job_id}` ({job.created_at:%Y-%m-%d}).",
        "",
        "| | |",
        "|---|---|",
        f"| data set | `{job.dataset_key}`: {sum(view.dataset.values())} images, "
        + ", ".join(f"{k} {v}" for k, v in view.dataset.items())
        + " |",
        f"| skipped files | {len(view.skipped)} |",
        f"| steps | {job.steps} at batch {job.batch_size}, lr G {job.lr_g:g} / D {job.lr_d:g}, seed {job.seed} |",
        f"| augmentation | {', '.join(job.augment.policy) or 'none'}"
        + (f", ADA target {job.augment.ada_target}" if job.augment.ada_target else "")
        + f"; FreezeD {job.freeze_d} |",
    ]
    for name, value in scores.items():
        lines.append(f"| {name} | {value:.4f} (training images as reference, {EVAL_PER_CLASS} per class) |")
    if job.gate is not None:
        lines.append(f"| promotion gate | {'passed' if gate_passed else 'failed'}: {job.gate.model_dump_json()} |")
    return "\n".join(lines) + "\n"
