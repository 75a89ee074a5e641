"""Evaluate a served generator offline: every score beside the same score for real data with the same counts.

A FID of 7 means nothing alone: it depends on the extractor, the sample counts and the split. So the report
records all three and pairs each score with a real-vs-real reference: real *train* images (a class-balanced subset
as large as the generated set) scored exactly as the generated images are, against the same real *test* images.
A perfect generator would match the reference column.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from models import metrics
from models.classifier import Classifier, ClassifierStep, accuracy, embed
from models.data import LabelledImages
from models.errors import DatasetError
from models.generator import ImageGenerator

# Small counts for tests and smoke runs (``genq eval --quick``): seconds, not minutes; the scores are noisy.
QUICK_N_PER_CLASS = 20
QUICK_CAS_EPOCHS = 1

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class EvalReport:
    """Scores of one generator, each with its real-vs-real reference (the ``*_real`` fields), and how they were got.

    "generated" is scored against the real target set; "real" is a real reference set of the same size from the
    other split, scored against the same target. FID/KID: lower is better; the rest: higher is better.
    """

    model: str
    extractor: str  # feature extractor and layer, e.g. "fmnist-classifier penultimate (64-d)"
    feature_dim: int
    class_names: tuple[str, ...]
    seed: int  # generated image i used seed ``seed + i``, labels class-major
    n_per_class: int
    n_generated: int
    reference_split: str  # where the real reference set came from ("train")
    n_reference: int
    target_split: str  # what both are compared with ("test")
    n_target: int
    fid: float
    fid_real: float
    kid_mean: float
    kid_std: float
    kid_real_mean: float
    kid_real_std: float
    kid_subsets: int
    kid_subset_size: int
    prdc_k: int
    precision: float
    recall: float
    density: float
    coverage: float
    precision_real: float
    recall_real: float
    density_real: float
    coverage_real: float
    label_consistency: float  # classifier agrees with the requested label on generated images
    classifier_test_accuracy: float  # its reference: the same classifier on the whole real target split
    n_classifier_test: int
    cas: float  # accuracy on the whole real target split of a classifier trained on generated images only
    cas_real: float  # the same architecture and recipe trained on the real reference set instead
    cas_epochs: int
    per_class_fid: dict[str, float]
    per_class_fid_real: dict[str, float]
    # recall and coverage (k = prdc_k) of each class's generated images against that class's target images
    per_class_recall: dict[str, float]
    per_class_recall_real: dict[str, float]
    per_class_coverage: dict[str, float]
    per_class_coverage_real: dict[str, float]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        return data


def balanced_subset(data: LabelledImages, n_per_class: int, seed: int) -> LabelledImages:
    """``n_per_class`` images of every class drawn without replacement (seeded), class-major order.

    Raises:
        DatasetError: some class has fewer than ``n_per_class`` images.
    """
    rng = torch.Generator().manual_seed(seed)
    picks = []
    for c, name in enumerate(data.class_names):
        idx = torch.nonzero(data.labels == c).squeeze(1)
        if len(idx) < n_per_class:
            raise DatasetError(f"class {name!r} has {len(idx)} images, fewer than the {n_per_class} asked for")
        picks.append(idx[torch.randperm(len(idx), generator=rng)[:n_per_class]])
    chosen = torch.cat(picks)
    return LabelledImages(data.images[chosen], data.labels[chosen], data.class_names)


def sample_balanced(
    generator: ImageGenerator, n_per_class: int, seed: int, batch_size: int = 500, on_progress: ProgressFn | None = None
) -> LabelledImages:
    """``n_per_class`` generated images per class, class-major; image i uses seed ``seed + i`` (repeatable)."""
    labels = [c for c in range(len(generator.class_names)) for _ in range(n_per_class)]
    seeds = [seed + i for i in range(len(labels))]
    chunks = []
    for i in range(0, len(labels), batch_size):
        chunks.append(generator.sample(labels[i : i + batch_size], seeds[i : i + batch_size]))  # (b, C, H, W) uint8
        if on_progress is not None:
            on_progress("sample", min(i + batch_size, len(labels)), len(labels))
    return LabelledImages(torch.cat(chunks), torch.tensor(labels, dtype=torch.long), tuple(generator.class_names))


def evaluate(
    generator: ImageGenerator,
    *,
    classifier: Classifier,
    real_train: LabelledImages,
    real_test: LabelledImages,
    n_per_class: int = 1000,
    seed: int = 0,
    cas_epochs: int = 10,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    prdc_k: int = 5,
    model_name: str = "",
    extractor_name: str = "classifier",
    on_progress: ProgressFn | None = None,
) -> EvalReport:
    """Score ``generator`` with ``classifier`` as the fixed extractor; every score gets its real-vs-real reference.

    Generated: ``n_per_class`` images per class. Reference: as many real train images per class (seeded). Target:
    up to ``n_per_class`` real test images per class (all of them when a class has fewer); FID, KID, per-class FID
    and precision/recall/density/coverage compare generated and reference with this target. Label consistency is
    paired with the classifier's accuracy on all of ``real_test``; CAS trains the classifier's architecture for
    ``cas_epochs`` on the generated images and, for its reference, on the real reference set, both tested on all
    of ``real_test``. Takes minutes at 1,000 per class on a CPU; use ``QUICK_*`` counts for smoke tests.

    Raises:
        DatasetError: the generator, classifier and data disagree on classes or image shape, or a split is too small.
    """
    started = time.perf_counter()
    progress = on_progress or (lambda _stage, _done, _total: None)
    names = tuple(generator.class_names)
    for what, other in (("classifier", classifier.cfg.class_names), ("real train", real_train.class_names)):
        if tuple(other) != names:
            raise DatasetError(f"{what} classes {list(other)} differ from the generator's {list(names)}")
    if tuple(real_test.class_names) != names:
        raise DatasetError(f"real test classes {list(real_test.class_names)} differ from the generator's {list(names)}")
    shape = (generator.channels, generator.resolution, generator.resolution)
    if tuple(real_train.images.shape[1:]) != shape or (classifier.cfg.channels, classifier.cfg.resolution) != shape[:2]:
        raise DatasetError(f"generator images are {shape}, real images {tuple(real_train.images.shape[1:])}")
    per_class_test = min(n_per_class, *(int((real_test.labels == c).sum()) for c in range(len(names))))
    if per_class_test < max(2, prdc_k + 1):
        raise DatasetError(f"real test split has only {per_class_test} images in some class")

    generated = sample_balanced(generator, n_per_class, seed, on_progress=progress)
    reference = balanced_subset(real_train, n_per_class, seed)
    target = balanced_subset(real_test, per_class_test, seed)

    progress("features", 0, 3)
    f_gen = embed(classifier, generated.images)  # (N, D)
    progress("features", 1, 3)
    f_ref = embed(classifier, reference.images)  # (N, D)
    progress("features", 2, 3)
    f_tgt = embed(classifier, target.images)  # (T, D)
    progress("features", 3, 3)

    progress("distances", 0, 2)
    kid_gen = metrics.kid(f_gen, f_tgt, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    kid_ref = metrics.kid(f_ref, f_tgt, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    prdc_gen = metrics.precision_recall_density_coverage(f_tgt, f_gen, k=prdc_k)
    progress("distances", 1, 2)
    prdc_ref = metrics.precision_recall_density_coverage(f_tgt, f_ref, k=prdc_k)
    per_class_gen = metrics.per_class_prdc(f_tgt, target.labels, f_gen, generated.labels, names, k=prdc_k)
    per_class_ref = metrics.per_class_prdc(f_tgt, target.labels, f_ref, reference.labels, names, k=prdc_k)
    progress("distances", 2, 2)

    cas_scores = []
    for stage, train_set in (("cas generated", generated), ("cas real", reference)):

        def on_step(s: ClassifierStep, stage: str = stage) -> None:
            progress(stage, s.step, s.total)

        cas_scores.append(
            metrics.classification_accuracy_score(
                train_set, real_test, config=classifier.cfg, epochs=cas_epochs, seed=seed, on_progress=on_step
            )
        )

    return EvalReport(
        model=model_name,
        extractor=f"{extractor_name} penultimate ({f_gen.shape[1]}-d)",
        feature_dim=int(f_gen.shape[1]),
        class_names=names,
        seed=seed,
        n_per_class=n_per_class,
        n_generated=len(generated),
        reference_split="train",
        n_reference=len(reference),
        target_split="test",
        n_target=len(target),
        fid=metrics.fid(f_gen, f_tgt),
        fid_real=metrics.fid(f_ref, f_tgt),
        kid_mean=kid_gen.mean,
        kid_std=kid_gen.std,
        kid_real_mean=kid_ref.mean,
        kid_real_std=kid_ref.std,
        kid_subsets=kid_subsets,
        kid_subset_size=min(kid_subset_size, len(generated), len(target)),
        prdc_k=prdc_k,
        precision=prdc_gen.precision,
        recall=prdc_gen.recall,
        density=prdc_gen.density,
        coverage=prdc_gen.coverage,
        precision_real=prdc_ref.precision,
        recall_real=prdc_ref.recall,
        density_real=prdc_ref.density,
        coverage_real=prdc_ref.coverage,
        label_consistency=metrics.label_consistency(classifier, generated.images, generated.labels),
        classifier_test_accuracy=accuracy(classifier, real_test),
        n_classifier_test=len(real_test),
        cas=cas_scores[0],
        cas_real=cas_scores[1],
        cas_epochs=cas_epochs,
        per_class_fid=metrics.per_class_fid(f_gen, generated.labels, f_tgt, target.labels, names),
        per_class_fid_real=metrics.per_class_fid(f_ref, reference.labels, f_tgt, target.labels, names),
        per_class_recall={name: per_class_gen[name].recall for name in names},
        per_class_recall_real={name: per_class_ref[name].recall for name in names},
        per_class_coverage={name: per_class_gen[name].coverage for name in names},
        per_class_coverage_real={name: per_class_ref[name].coverage for name in names},
        seconds=round(time.perf_counter() - started, 1),
    )


def format_report(report: EvalReport) -> str:
    """A plain-text table: each score, its real-vs-real reference and which direction is better."""
    r = report
    lines = [
        f"model {r.model or '(unnamed)'}: {r.n_generated} generated ({r.n_per_class} per class, seeds "
        f"{r.seed}..{r.seed + r.n_generated - 1})",
        f"extractor {r.extractor}; target: {r.n_target} real {r.target_split} images; "
        f"reference: {r.n_reference} real {r.reference_split} images",
        "",
        f"{'score':<26}{'generated':>16}{'real ref':>16}  better",
    ]

    def row(name: str, value: str, ref: str, better: str) -> None:
        lines.append(f"{name:<26}{value:>16}{ref:>16}  {better}")

    row("FID", f"{r.fid:.3f}", f"{r.fid_real:.3f}", "lower")
    row(
        f"KID ({r.kid_subsets}x{r.kid_subset_size})",
        f"{r.kid_mean:.4f}±{r.kid_std:.4f}",
        f"{r.kid_real_mean:.4f}±{r.kid_real_std:.4f}",
        "lower",
    )
    for name in ("precision", "recall", "density", "coverage"):
        row(f"{name} (k={r.prdc_k})", f"{getattr(r, name):.3f}", f"{getattr(r, name + '_real'):.3f}", "higher")
    row("label consistency", f"{r.label_consistency:.4f}", f"{r.classifier_test_accuracy:.4f}", "higher")
    row(f"CAS ({r.cas_epochs} epochs)", f"{r.cas:.4f}", f"{r.cas_real:.4f}", "higher")
    lines += [
        "",
        f"label consistency ref: the classifier's accuracy on all {r.n_classifier_test} real {r.target_split} images",
        f"CAS: trained on the {r.n_generated} generated (ref: {r.n_reference} real {r.reference_split}) images, "
        f"tested on all {r.n_classifier_test} real {r.target_split} images",
        "",
        "per-class FID, recall and coverage (generated / real reference)",
        f"{'class':<26}{'FID':>20}{'recall':>20}{'coverage':>20}",
    ]
    for name in r.class_names:
        lines.append(
            f"{name:<26}{r.per_class_fid[name]:>10.3f} /{r.per_class_fid_real[name]:>8.3f}"
            f"{r.per_class_recall[name]:>12.3f} /{r.per_class_recall_real[name]:>6.3f}"
            f"{r.per_class_coverage[name]:>12.3f} /{r.per_class_coverage_real[name]:>6.3f}"
        )
    lines.append(f"(per-class recall and coverage: k={r.prdc_k} nearest neighbours within the class)")
    lines.append(f"\n{r.seconds:.0f} s")
    return "\n".join(lines)


def reference_scores(
    generator: ImageGenerator, real: LabelledImages, classifier: Classifier, n_per_class: int = 100, seed: int = 0
) -> dict[str, float]:
    """Cheap scores of a generator against its own training images (a fine-tune has no other reference).

    - ``fid``: Fréchet distance in ``classifier``'s feature space between ``n_per_class`` generated images per class
      and up to as many of ``real``'s per class; only when the generator's images have the classifier's shape.
    - ``label_consistency``: the classifier's accuracy on the generated images against the requested class; only
      when the classifier knows every one of the generator's class names (its labels are mapped by name).
    A score that cannot be measured is absent from the result.
    """
    cfg = classifier.cfg
    scores: dict[str, float] = {}
    if (generator.resolution, generator.channels) != (cfg.resolution, cfg.channels):
        return scores
    fake = sample_balanced(generator, n_per_class, seed)
    picks = []
    rng = torch.Generator().manual_seed(seed)
    for c in range(len(real.class_names)):
        idx = torch.nonzero(real.labels == c).squeeze(1)
        picks.append(idx[torch.randperm(len(idx), generator=rng)[:n_per_class]])
    reference = real.images[torch.cat(picks)]
    if len(reference) >= 2:
        scores["fid"] = metrics.fid(embed(classifier, reference).numpy(), embed(classifier, fake.images).numpy())
    names = list(generator.class_names)
    if all(name in cfg.class_names for name in names):
        mapped = torch.tensor([cfg.class_names.index(names[int(y)]) for y in fake.labels])
        scores["label_consistency"] = metrics.label_consistency(classifier, fake.images, mapped)
    return scores
