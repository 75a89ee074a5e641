"""Does fine-tuning work? A base trained on half the classes, adapted to 60 images per class of the other half.

    genq train --arch cgan --classes 0,1,2,3,4 --steps 3000 --out runs/base-0to4      # the base (once)
    python -m benchmarks.finetune_transfer --base-run runs/base-0to4 [--steps 3000] [--quick]

1. Base: a cGAN trained on Fashion-MNIST classes 0-4 (t-shirt, trouser, pullover, dress, coat) only; its checkpoint
   is exported with its discriminator (StyleGAN2-ADA's transfer learning resumes G *and* D).
2. Few-shot data: the first 60 training images of each of classes 5-9 (sandal, shirt, sneaker, bag, ankle boot):
   300 images, every class new to the base.
3. Fine-tuned: :func:`models.finetune.init_from_base` (in G each new class starts as a blend of the base classes
   its images resemble, scored by the base D; in D its row starts fresh) then ``--steps`` steps with DiffAugment.
   From scratch: the same architecture, recipe, data and steps, random init.
4. Both scored against the real *test* images of classes 5-9 with the shipped in-domain classifier: label
   consistency (labels mapped by class name) and FID in its penultimate feature space, same sample counts.
5. Overhead: seconds per step of genq's fine-tune loop (:func:`worker.training.pipeline.run_finetune`, with a real Redis
   reporter, cancellation checks and progress records) vs a bare PyTorch loop over the same model, batch and step
   function; the fixed costs (data load, export, evaluation) are removed by timing two run lengths.

Prints one table and one ``name=value`` line per figure. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import tempfile
import time
from pathlib import Path

import redis
import torch

from models import cgan, train
from models.classifier import load_classifier
from models.data import FASHION_MNIST_CLASSES, LabelledImages, load_fashion_mnist, select_classes
from models.evaluate import reference_scores
from models.finetune import FineTuneConfig, FineTuner, init_from_base
from models.generator import load_generator
from models.grid import class_grid, save_png

NEW_CLASSES = list(FASHION_MNIST_CLASSES[5:])
_VERSIONS = itertools.count(1)  # every overhead run publishes a version of its own
PER_CLASS = 60


def export_base(run: Path, out: Path) -> Path:
    """The base run's EMA generator and its discriminator, exported from its checkpoint."""
    state, model_cfg = train.load_checkpoint(run / train.CHECKPOINT_FILE, train.TrainConfig())
    train.export(state, model_cfg, out)
    print(f"base: {run} at step {state.step}, classes {', '.join(model_cfg.class_names)}")
    return out


def train_model(tuner: FineTuner, label: str) -> float:
    started = time.perf_counter()
    while not tuner.done:
        stats = tuner.step_once()
        if stats.step % 250 == 0 or tuner.done:
            print(f"  {label}: step {stats.step}/{stats.total} d={stats.d_loss:.3f} g={stats.g_loss:.3f}", flush=True)
    return time.perf_counter() - started


def score(directory: Path, real_test: LabelledImages, n_per_class: int) -> dict[str, float]:
    classifier, _ = load_classifier()
    return reference_scores(load_generator(directory), real_test, classifier, n_per_class, seed=0)


def bare_seconds_per_step(tuner: FineTuner, steps: int) -> float:
    """A bare PyTorch loop: draw a batch, one hinge D+G step with the same augmentation, nothing else."""
    state, data, cfg = tuner.state, tuner.data, tuner.cfg
    train_cfg = cfg.train_config()
    started = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=state.rng)
        real = data.images[idx].float() / 127.5 - 1.0
        train.train_step_aug(state, real, data.labels[idx], train_cfg, augment=tuner._augment)
    return (time.perf_counter() - started) / steps


def genq_seconds_per_step(base_dir: Path, data_dir: Path, redis_url: str, steps: int, batch_size: int) -> float:
    """Seconds per step of run_finetune with a real Redis reporter: (T(n + steps) - T(n)) / steps."""
    from datetime import UTC, datetime

    from producer.contract import AugmentSpec, FineTuneJob
    from producer.core.store import JobStore
    from worker.catalog.store import ModelStore
    from worker.reporting import TrainingReporter
    from worker.storage.local import LocalStorage
    from worker.training.pipeline import run_finetune

    client = redis.Redis.from_url(redis_url)
    store = JobStore(client, 3600)
    storage = LocalStorage(data_dir)

    def run(n: int, version: int) -> float:
        job = FineTuneJob(
            job_id=f"overhead-{n}-{time.time_ns()}",
            base="base",
            base_name="base",
            base_version="1",
            dataset_key="datasets/fewshot/",
            name="overhead",
            steps=n,
            batch_size=batch_size,
            lr_g=2e-4,
            lr_d=2e-4,
            augment=AugmentSpec(policy=["translation", "cutout", "color"]),
            freeze_d=0,
            sample_every=10**6,
            checkpoint_every=10**6,
            seed=0,
            created_at=datetime.now(UTC),
        )
        store.create(job)
        reporter = TrainingReporter(store)
        with tempfile.TemporaryDirectory() as work:
            started = time.perf_counter()
            run_finetune(
                job,
                storage=storage,
                models=ModelStore(storage, Path(work) / "cache"),
                base_dir=base_dir,
                workdir=Path(work),
                reporter=reporter,
                allocate_version=lambda _name: str(version),
                on_published=lambda _n, _v: None,
            )
            return time.perf_counter() - started

    short, long = run(10, next(_VERSIONS)), run(10 + steps, next(_VERSIONS))
    return (long - short) / steps


def write_fewshot_folder(data: LabelledImages, root: Path) -> None:
    """The few-shot set as an ImageFolder tree (what a customer uploads)."""
    from models.grid import to_pil

    for i, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        path = root / "datasets" / "fewshot" / data.class_names[int(label)] / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        to_pil(image).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-run", type=Path, required=True, help="genq train --classes 0,1,2,3,4 output folder")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("runs/finetune-transfer"))
    parser.add_argument("--redis", default=os.environ.get("GENQ_BENCH_REDIS", "redis://127.0.0.1:6379/15"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="100 steps, 100 images per class scored: wiring only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = 100 if args.quick else args.steps
    n_eval = 100 if args.quick else 1000
    args.out.mkdir(parents=True, exist_ok=True)

    base_dir = export_base(args.base_run, args.out / "base")
    fewshot = select_classes(load_fashion_mnist("train"), NEW_CLASSES, per_class=PER_CLASS)
    real_test = select_classes(load_fashion_mnist("test"), NEW_CLASSES)
    cfg = FineTuneConfig(
        steps=steps,
        batch_size=args.batch_size,
        augment=dataclasses.replace(FineTuneConfig().augment, policy=("translation", "cutout", "color")),
    )
    print(f"few-shot data: {len(fewshot)} images, {PER_CLASS} per class of {', '.join(NEW_CLASSES)}")

    state, model_cfg, mapping = init_from_base(base_dir, fewshot.class_names, cfg, data=fewshot)
    tuned = FineTuner(state, model_cfg, fewshot, cfg)
    print(f"fine-tune: new classes {list(mapping.new)}, nearest base classes {mapping.nearest}")
    tuned_s = train_model(tuned, "fine-tune")
    tuned.export(args.out / "finetuned")

    base_cfg = cgan.CGANConfig.from_json(model_cfg.to_json())
    scratch_cfg = dataclasses.replace(cfg, ema_start=min(500, steps // 4))
    scratch = FineTuner(train.new_state(base_cfg, scratch_cfg.train_config()), base_cfg, fewshot, scratch_cfg)
    scratch_s = train_model(scratch, "scratch")
    scratch.export(args.out / "scratch")
    for name, tuner in (("finetuned", tuned), ("scratch", scratch)):
        save_png(class_grid(tuner.sample_grid(list(range(10))), 10), args.out / f"{name}-samples.png")

    tuned_scores = score(args.out / "finetuned", real_test, n_eval)
    scratch_scores = score(args.out / "scratch", real_test, n_eval)
    real_ref = reference_scores_real(fewshot, real_test)

    overhead_steps = 20 if args.quick else 100
    data_root = args.out / "storage"
    write_fewshot_folder(fewshot, data_root)
    bare_runs, genq_runs = [], []
    for _ in range(3):  # alternate, keep each side's best: other load on the machine hits both alike
        bare_runs.append(bare_seconds_per_step(tuned, overhead_steps))
        genq_runs.append(genq_seconds_per_step(base_dir, data_root, args.redis, overhead_steps, args.batch_size))
    bare, genq = min(bare_runs), min(genq_runs)

    print()
    print(f"{'':28} {'fine-tuned':>12} {'from scratch':>14} {'real (60/class)':>16}")
    print(f"{'label consistency':28} {tuned_scores['label_consistency']:>12.3f} "
          f"{scratch_scores['label_consistency']:>14.3f} {real_ref['label_consistency']:>16.3f}")  # fmt: skip
    print(f"{'classifier FID vs real test':28} {tuned_scores['fid']:>12.2f} {scratch_scores['fid']:>14.2f} "
          f"{real_ref['fid']:>16.2f}")  # fmt: skip
    print(f"{'training wall time (s)':28} {tuned_s:>12.0f} {scratch_s:>14.0f}")
    print(f"steps {steps} at batch {args.batch_size}; scored with {n_eval} generated images per class vs "
          f"{len(real_test)} real test images of classes 5-9 (fmnist-classifier features)")  # fmt: skip
    print(f"step time: bare loop {1e3 * bare:.1f} ms, genq run_finetune {1e3 * genq:.1f} ms "
          f"(overhead {100 * (genq / bare - 1):+.1f}%)")  # fmt: skip
    print()
    figures = {
        "finetuned_label_consistency": tuned_scores["label_consistency"],
        "scratch_label_consistency": scratch_scores["label_consistency"],
        "finetuned_fid": tuned_scores["fid"],
        "scratch_fid": scratch_scores["fid"],
        "real_fewshot_fid": real_ref["fid"],
        "bare_step_ms": 1e3 * bare,
        "genq_step_ms": 1e3 * genq,
        "finetune_overhead": genq / bare - 1,
    }
    for name, value in figures.items():
        print(f"{name}={value:.4f}")


def reference_scores_real(fewshot: LabelledImages, real_test: LabelledImages) -> dict[str, float]:
    """The 300 real few-shot images scored like a generator's (the FID floor at this sample count)."""
    from models import metrics
    from models.classifier import embed

    classifier, _ = load_classifier()
    names = classifier.cfg.class_names
    mapped = torch.tensor([names.index(fewshot.class_names[int(y)]) for y in fewshot.labels])
    return {
        "fid": metrics.fid(embed(classifier, real_test.images).numpy(), embed(classifier, fewshot.images).numpy()),
        "label_consistency": metrics.label_consistency(classifier, fewshot.images, mapped),
    }


if __name__ == "__main__":
    main()
