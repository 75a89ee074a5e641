"""The fine-tune pipeline over injected storage, model store and reporter: publish, gate, resume, stop, finish."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_model import make_tiny_base

from producer.contract import AugmentSpec, FineTuneJob, PromotionGate, TrainingView
from worker.catalog.store import ModelStore
from worker.storage.local import LocalStorage
from worker.training.pipeline import CHECKPOINT_NAME, EVENTS_DIR, run_finetune, training_prefix


class Reporter:
    """Records what the pipeline reports; ``stop_after`` makes the job inactive after that many active() calls."""

    def __init__(self, earlier: TrainingView | None = None, stop_after: int | None = None) -> None:
        self.earlier = earlier
        self.stop_after = stop_after
        self.views: list[TrainingView] = []
        self.done: TrainingView | None = None
        self.checks = 0

    def begin(self, job: FineTuneJob) -> bool:
        return True

    def active(self, job: FineTuneJob) -> bool:
        self.checks += 1
        return self.stop_after is None or self.checks <= self.stop_after

    def current(self, job: FineTuneJob) -> TrainingView | None:
        return self.earlier

    def training(self, job: FineTuneJob, view: TrainingView, *, announce: bool = False) -> None:
        self.views.append(view)

    def trained(self, job: FineTuneJob, view: TrainingView) -> None:
        self.done = view


Setup = tuple[LocalStorage, ModelStore, Path, Iterator[int]]


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    storage = LocalStorage(tmp_path / "bucket")
    base = make_tiny_base(tmp_path / "zoo")
    rng = np.random.default_rng(0)
    for name in ("logo", "sneaker"):
        for i in range(8):
            image = Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L")
            path = tmp_path / "upload" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            storage.put(f"datasets/u1/{name}/{i}.png", path.read_bytes(), "image/png")
    return storage, ModelStore(storage, tmp_path / "cache"), base, itertools.count(5)  # the versions handed out


def job(**fields: object) -> FineTuneJob:
    spec: dict[str, object] = {
        "job_id": "job-12345678",
        "base": "tiny-base",
        "base_name": "tiny-base",
        "base_version": "1",
        "dataset_key": "datasets/u1/",
        "name": "brand",
        "steps": 4,
        "batch_size": 4,
        "lr_g": 2e-4,
        "lr_d": 2e-4,
        "augment": AugmentSpec(),
        "freeze_d": 0,
        "sample_every": 2,
        "checkpoint_every": 2,
        "seed": 3,
        "created_at": datetime(2026, 11, 30, tzinfo=UTC),
    }
    return FineTuneJob.model_validate({**spec, **fields})


def run(setup: Setup, spec: FineTuneJob, reporter: Reporter, tmp: Path, **kw: object):  # type: ignore[no-untyped-def]
    storage, models, base, versions = setup
    allocated: list[str] = []

    def allocate(name: str) -> str:
        allocated.append(name)
        return str(next(versions))

    result = run_finetune(
        spec,
        storage=storage,
        models=models,
        base_dir=base,
        workdir=tmp,
        reporter=reporter,
        allocate_version=allocate,
        on_published=lambda _n, _v: None,
        **kw,  # type: ignore[arg-type]
    )
    return result, allocated


def test_a_run_publishes_every_file_and_moves_the_gate_alias_only_when_it_passes(setup: Setup, tmp_path: Path) -> None:
    storage, models, _, _ = setup
    passing = Reporter()
    result, allocated = run(setup, job(gate=PromotionGate(max_fid=1e9)), passing, tmp_path / "a")
    assert result.published == "brand@5" and allocated == ["brand"]
    assert passing.done is not None and passing.done.aliases == ["latest", "production"]
    assert passing.done.dataset == {"logo": 8, "sneaker": 8} and passing.done.gate_passed is True
    assert sorted(k.rsplit("/", 1)[1] for k in storage.list("models/brand/5/")) == [
        "MODEL_CARD.md", "config.json", "discriminator.safetensors", "metrics.json", "samples.png",
        "weights.safetensors",
    ]  # fmt: skip
    grids = sorted({v.samples_key for v in passing.views if v.samples_key})
    assert [k.rsplit("/", 1)[1] for k in grids] == ["step-000002.png", "step-000004.png"]

    failing = Reporter()
    again, _ = run(setup, job(job_id="job-87654321", gate=PromotionGate(max_fid=1e-9)), failing, tmp_path / "b")
    assert again.published == "brand@6"
    assert failing.done is not None and failing.done.aliases == ["latest"] and failing.done.gate_passed is False
    assert models.entries()["brand"].aliases == {"latest": "6", "production": "5"}  # production: the one that passed


def test_a_redelivery_resumes_from_the_stored_checkpoint(setup: Setup, tmp_path: Path) -> None:
    storage, _, _, _ = setup
    first = Reporter(stop_after=3)  # canceled after 3 steps: the checkpoint of step 2 is stored
    stopped, _ = run(setup, job(), first, tmp_path / "a")
    assert stopped.stopped and stopped.published is None
    assert storage.exists(training_prefix(job()) + CHECKPOINT_NAME)
    assert storage.list("models/") == []

    second = Reporter()
    done, _ = run(setup, job(), second, tmp_path / "b")
    assert done.published is not None and second.views[0].resumed_from == 2


def test_a_version_claimed_by_a_delivery_that_died_while_publishing_is_finished_not_claimed_again(
    setup: Setup, tmp_path: Path
) -> None:
    claimed = TrainingView(total_steps=4, step=4, model="brand@9")
    reporter = Reporter(earlier=claimed)
    result, allocated = run(setup, job(), reporter, tmp_path / "a")
    assert result.published == "brand@9" and allocated == []


def test_an_already_published_version_is_finished_without_training(setup: Setup, tmp_path: Path) -> None:
    first = Reporter()
    published, _ = run(setup, job(), first, tmp_path / "a")
    assert first.done is not None
    again = Reporter(earlier=first.done)
    result, allocated = run(setup, job(), again, tmp_path / "b")
    assert result.published == published.published and allocated == [] and again.views == []


def test_a_lost_lease_stops_without_publishing(setup: Setup, tmp_path: Path) -> None:
    reporter = Reporter()
    result, allocated = run(setup, job(), reporter, tmp_path / "a", keep_going=lambda: False)
    assert result.stopped and allocated == [] and reporter.done is None


def test_a_tenants_fine_tune_publishes_into_its_namespace_and_moves_only_its_own_aliases(
    setup: Setup, tmp_path: Path
) -> None:
    storage, models, _, _ = setup
    system = make_tiny_base(tmp_path / "system")  # a system model "brand", published by the operator
    models.publish("brand", "1", {p.name: p.read_bytes() for p in system.iterdir()})
    models.set_aliases("brand", {"latest": "1", "production": "1"})
    system_keys = storage.list("models/")

    reporter = Reporter()
    result, allocated = run(setup, job(tenant="acme", gate=PromotionGate(max_fid=1e9)), reporter, tmp_path / "a")

    assert result.published == "brand@5" and allocated == ["acme/brand"]
    assert reporter.done is not None and reporter.done.aliases == ["latest", "production"]
    assert "tenant-models/acme/brand/5/weights.safetensors" in storage.list("tenant-models/")
    assert storage.list("models/") == system_keys  # nothing of the system model moved
    entries = models.entries()
    assert entries["brand"].aliases == {"latest": "1", "production": "1"} and set(entries["brand"].versions) == {"1"}
    assert entries["acme/brand"].aliases == {"latest": "5", "production": "5"}

    again = Reporter(earlier=reporter.done)  # a redelivery after publishing finishes in the same namespace
    finished, allocated = run(setup, job(tenant="acme", gate=PromotionGate(max_fid=1e9)), again, tmp_path / "b")
    assert finished.published == "brand@5" and allocated == [] and again.views == []


class PresigningStorage(LocalStorage):
    """Presigns as S3 does: the URL names the deployment's endpoint and bucket, and the lifetime asked for."""

    def url(self, key: str, expires_s: int) -> str:
        return f"http://minio.internal:9000/genq/{key}?X-Amz-Expires={expires_s}"


@pytest.mark.parametrize(("tenant", "presigned"), [(None, True), ("acme", False)])
def test_sample_grid_urls_live_presign_expires_s_and_are_never_a_tenants(
    setup: Setup, tmp_path: Path, tenant: str | None, presigned: bool
) -> None:
    # The review: a tenant's view showed the internal endpoint, bucket and worker paths in samples_url, presigned for
    # 7 days whatever GENQ_S3__PRESIGN_EXPIRES_S said.
    storage, models, base, versions = setup
    presigning = PresigningStorage(storage.root)
    reporter = Reporter()
    run((presigning, models, base, versions), job(tenant=tenant), reporter, tmp_path / "a", url_expires_s=900)

    grids = {v.samples_key: v.samples_url for v in reporter.views if v.samples_key}
    assert sorted(k.rsplit("/", 1)[1] for k in grids) == ["step-000002.png", "step-000004.png"]
    if presigned:  # the operator's job: a URL of the configured lifetime
        assert grids == {k: f"http://minio.internal:9000/genq/{k}?X-Amz-Expires=900" for k in grids}
    else:
        assert set(grids.values()) == {None}
        assert reporter.done is not None and reporter.done.samples_url is None
        assert all("minio.internal" not in v.model_dump_json() for v in [*reporter.views, reporter.done])


def test_a_gate_without_a_threshold_never_promotes(setup: Setup, tmp_path: Path) -> None:
    _, models, _, _ = setup
    reporter = Reporter()  # a job queued before requests refused empty gates
    result, _ = run(setup, job(gate=PromotionGate(alias="production")), reporter, tmp_path / "a")

    assert result.published == "brand@5"
    assert reporter.done is not None and reporter.done.gate_passed is False and reporter.done.aliases == ["latest"]
    assert models.entries()["brand"].aliases == {"latest": "5"}


def test_a_fine_tune_stores_tensorboard_events_beside_its_checkpoint_across_a_redelivery(
    setup: Setup, tmp_path: Path
) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    storage, _, _, _ = setup
    spec = job(steps=6, eval_every=2)
    stopped, _ = run(setup, spec, Reporter(stop_after=5), tmp_path / "a")  # steps 1-5, checkpoint at 4
    assert stopped.stopped
    done, _ = run(setup, spec, Reporter(), tmp_path / "b")  # resumes at 4
    assert done.published is not None
    prefix = training_prefix(spec) + EVENTS_DIR
    keys = storage.list(prefix)
    assert len(keys) == 2  # one file per delivery
    logdir = tmp_path / "downloaded"
    logdir.mkdir()
    for key in keys:
        (logdir / key.rsplit("/", 1)[1]).write_bytes(storage.get(key))
    acc = accumulator.EventAccumulator(str(logdir), size_guidance={accumulator.IMAGES: 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/d")] == [1, 2, 3, 4, 5, 6]  # step 5, redone, counted once
    assert [e.step for e in acc.Scalars("lr/g")] == [1, 2, 3, 4, 5, 6]
    assert {"loss/g", "lr/d", "augment/p", "speed/steps_per_s"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Images("samples")] == [2, 4, 6]
    fid = acc.Scalars("eval/fid")
    assert [e.step for e in fid] == [2, 4, 6]
    assert fid[-1].value == pytest.approx(done.view.metrics["fid"], rel=1e-5)  # type: ignore[union-attr]
