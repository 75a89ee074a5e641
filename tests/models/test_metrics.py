"""Offline metrics: closed forms, limiting cases, and a tiny end-to-end evaluation with every score in range."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_model import make_tiny_model

from models import metrics
from models.classifier import Classifier, ClassifierConfig, train_classifier
from models.data import FASHION_MNIST_CLASSES, LabelledImages
from models.errors import DatasetError
from models.evaluate import (
    QUICK_CAS_EPOCHS,
    QUICK_N_PER_CLASS,
    EvalReport,
    balanced_subset,
    evaluate,
    format_report,
    sample_balanced,
)
from models.generator import load_generator


def gaussian(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).multivariate_normal(mean, cov, size=n)


def test_fid_of_a_set_against_itself_is_zero() -> None:
    x = np.random.default_rng(0).normal(size=(500, 16))
    assert metrics.fid(x, x) == pytest.approx(0.0, abs=1e-6)
    assert metrics.fid(torch.from_numpy(x).float(), torch.from_numpy(x).float()) == pytest.approx(0.0, abs=1e-4)


def test_frechet_distance_of_diagonal_gaussians_matches_the_closed_form() -> None:
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()  # 5 + 1 + 1 + 4
    assert metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_non_commuting_2d_gaussians_matches_the_closed_form() -> None:
    # for 2x2 PSD A, B: tr (AB)^1/2 = sqrt(tr(AB) + 2 sqrt(det A det B)), since AB has eigenvalues l1, l2 >= 0
    a = np.array([[2.0, 0.5], [0.5, 1.0]])
    b = np.array([[1.0, -0.3], [-0.3, 3.0]])
    mu1, mu2 = np.array([0.5, -1.0]), np.array([0.0, 0.0])
    tr_sqrt = math.sqrt(np.trace(a @ b) + 2 * math.sqrt(np.linalg.det(a) * np.linalg.det(b)))
    expected = 1.25 + np.trace(a) + np.trace(b) - 2 * tr_sqrt
    assert metrics.frechet_distance(mu1, a, mu2, b) == pytest.approx(expected, rel=1e-10)
    assert metrics.frechet_distance(mu2, b, mu1, a) == pytest.approx(expected, rel=1e-10)  # symmetric


def test_fid_of_samples_approaches_the_distance_between_their_gaussians() -> None:
    a, b = np.diag([1.0, 2.0]), np.array([[1.5, 0.4], [0.4, 0.5]])
    mu2 = np.array([1.0, 0.0])
    x, y = gaussian(20000, np.zeros(2), a, 1), gaussian(20000, mu2, b, 2)
    assert metrics.fid(x, y) == pytest.approx(metrics.frechet_distance(np.zeros(2), a, mu2, b), rel=0.05)


def test_fid_with_fewer_samples_than_dimensions_is_finite() -> None:
    rng = np.random.default_rng(0)
    x, y = np.maximum(rng.normal(size=(10, 64)), 0), np.maximum(rng.normal(size=(10, 64)), 0)  # rank-deficient
    value = metrics.fid(x, y)
    assert math.isfinite(value) and value > 0


def test_per_class_fid_is_zero_for_identical_classes_and_named_by_class() -> None:
    rng = np.random.default_rng(0)
    x, labels = rng.normal(size=(60, 4)), np.arange(60) % 3
    y = x.copy()
    y[labels == 2] += 5.0
    scores = metrics.per_class_fid(x, labels, y, labels, ("a", "b", "c"))
    assert list(scores) == ["a", "b", "c"]
    assert scores["a"] == pytest.approx(0, abs=1e-6) and scores["b"] == pytest.approx(0, abs=1e-6)
    assert scores["c"] == pytest.approx(4 * 25.0, rel=1e-6)


def test_per_class_recall_shows_the_class_that_collapsed_while_the_global_recall_hides_it() -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(3000) % 3
    real = rng.normal(size=(3000, 4)) + 10.0 * labels[:, None]  # three well-separated classes
    fake = rng.normal(size=(3000, 4)) + 10.0 * labels[:, None]
    fake[labels == 1] = 10.0 + 0.01 * rng.normal(size=(1000, 4))  # class "b" collapses onto its mean
    scores = metrics.per_class_prdc(real, labels, fake, labels, ("a", "b", "c"), k=5)
    assert list(scores) == ["a", "b", "c"]
    assert scores["a"].recall > 0.9 and scores["c"].recall > 0.9 and scores["a"].coverage > 0.9
    assert scores["b"].recall < 0.05 and scores["b"].coverage < 0.05
    assert metrics.precision_recall_density_coverage(real, fake, k=5).recall > 0.6  # the whole set looks fine


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shifted_one() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    same = metrics.kid(x, y, subsets=20, subset_size=300)
    shifted = metrics.kid(x, y + 1.0, subsets=20, subset_size=300)
    assert abs(same.mean) < 3 * same.std + 1e-3
    assert shifted.mean > 0.1 and shifted.mean > 10 * abs(same.mean)
    assert metrics.kid(x, y, subsets=5, subset_size=100) == metrics.kid(x, y, subsets=5, subset_size=100)


def test_prdc_of_a_set_against_itself_is_one_everywhere() -> None:
    x = np.random.default_rng(0).normal(size=(300, 8))
    scores = metrics.precision_recall_density_coverage(x, x, k=5, chunk=64)
    assert (scores.precision, scores.recall, scores.coverage) == (1.0, 1.0, 1.0)
    assert scores.density == pytest.approx(1.0)  # each real ball holds itself and k - 1 neighbours: kN in all


def test_prdc_of_far_disjoint_sets_is_zero_everywhere() -> None:
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(200, 8)), rng.normal(size=(150, 8)) + 100.0
    assert metrics.precision_recall_density_coverage(real, fake, k=5) == metrics.PRDC(0.0, 0.0, 0.0, 0.0)


def test_prdc_sees_a_collapsed_generator_as_precise_but_without_recall() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 4))
    fake = real[:20][rng.integers(0, 20, 400)] + 0.01 * rng.normal(size=(400, 4))  # 400 copies of 20 modes
    scores = metrics.precision_recall_density_coverage(real, fake, k=5)
    assert scores.precision > 0.9 and scores.recall < 0.2 and scores.coverage < 0.4  # ~20 modes x (k + 1) balls


def constant_classifier(class_index: int) -> Classifier:
    """A classifier that answers ``class_index`` whatever it is shown."""
    model = Classifier(ClassifierConfig(class_names=("a", "b", "c", "d"), widths=(4, 4, 4), feature_dim=8))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(class_index), 4).float())
    return model.eval()


def test_label_consistency_is_the_fraction_classified_as_requested() -> None:
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    model = constant_classifier(3)
    assert metrics.label_consistency(model, images, [3] * 8) == 1.0
    assert metrics.label_consistency(model, images, [3, 3, 0, 1, 3, 3, 2, 2]) == 0.5
    with pytest.raises(ValueError, match="equally many"):
        metrics.label_consistency(model, images, [3])


def patterned(n_per_class: int, seed: int) -> LabelledImages:
    """Ten classes of noisy images with a bright bar at a class-dependent row: easy for a tiny CNN."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(n_per_class)
    images = torch.randint(0, 50, (len(labels), 1, 28, 28), generator=g, dtype=torch.uint8)
    for c in range(10):
        images[labels == c, :, 2 + 2 * c : 5 + 2 * c, 4:24] = 220
    return LabelledImages(images, labels, FASHION_MNIST_CLASSES)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> EvalReport:
    generator = load_generator(make_tiny_model(tmp_path_factory.mktemp("zoo")))
    real_train, real_test = patterned(30, seed=0), patterned(25, seed=1)
    config = ClassifierConfig(class_names=FASHION_MNIST_CLASSES, widths=(4, 8, 8), feature_dim=16)
    classifier = train_classifier(real_train, epochs=1, batch_size=32, seed=0, config=config)
    stages: set[str] = set()
    report = evaluate(
        generator,
        classifier=classifier,
        real_train=real_train,
        real_test=real_test,
        n_per_class=QUICK_N_PER_CLASS,
        seed=0,
        cas_epochs=QUICK_CAS_EPOCHS,
        kid_subsets=10,
        model_name="tiny-cgan",
        extractor_name="tiny-classifier",
        on_progress=lambda stage, _done, _total: stages.add(stage),
    )
    assert stages == {"sample", "features", "distances", "cas generated", "cas real"}
    return report


def test_tiny_evaluation_reports_every_field_with_counts_and_sane_ranges(tiny_report: EvalReport) -> None:
    r = tiny_report
    data = r.to_json()
    assert set(data) == {f.name for f in fields(EvalReport)}
    assert all(v is not None for v in data.values())
    assert (r.n_per_class, r.n_generated, r.n_reference, r.n_target) == (20, 200, 200, 200)
    assert r.extractor == "tiny-classifier penultimate (16-d)" and r.kid_subset_size == 200
    assert 0 <= r.fid_real < r.fid  # random weights are far from the real images; real train is close
    assert r.kid_mean > r.kid_real_mean
    for name in ("precision", "recall", "coverage", "label_consistency", "classifier_test_accuracy", "cas"):
        assert 0.0 <= data[name] <= 1.0 and 0.0 <= data.get(name + "_real", 0.0) <= 1.0, name
    assert r.density >= 0 and r.density_real >= 0
    assert list(r.per_class_fid) == list(FASHION_MNIST_CLASSES) == list(r.per_class_fid_real)
    assert all(v >= 0 for v in [*r.per_class_fid.values(), *r.per_class_fid_real.values()])
    per_class = (r.per_class_recall, r.per_class_recall_real, r.per_class_coverage, r.per_class_coverage_real)
    for scores in per_class:
        assert list(scores) == list(FASHION_MNIST_CLASSES) and all(0.0 <= v <= 1.0 for v in scores.values())
    assert r.per_class_recall != r.per_class_recall_real  # generated and real are scored apart


def test_report_table_puts_each_score_beside_its_reference(tiny_report: EvalReport) -> None:
    text = format_report(tiny_report)
    fid_row = next(line for line in text.splitlines() if line.startswith("FID"))
    assert f"{tiny_report.fid:.3f}" in fid_row and f"{tiny_report.fid_real:.3f}" in fid_row
    for word in ("KID", "precision", "recall", "density", "coverage", "label consistency", "CAS", "ankle-boot"):
        assert word in text
    boot = next(line for line in text.splitlines() if line.startswith("ankle-boot"))
    r = tiny_report
    assert f"{r.per_class_recall['ankle-boot']:.3f} /{r.per_class_recall_real['ankle-boot']:6.3f}" in boot
    assert f"{r.per_class_coverage['ankle-boot']:.3f} /{r.per_class_coverage_real['ankle-boot']:6.3f}" in boot


def test_generated_evaluation_set_is_repeatable_and_class_major(tmp_path: Path) -> None:
    generator = load_generator(make_tiny_model(tmp_path))
    a, b = sample_balanced(generator, 3, seed=5, batch_size=7), sample_balanced(generator, 3, seed=5, batch_size=30)
    assert torch.equal(a.images, b.images) and a.labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert torch.equal(a.images[4], generator.sample([1], [5 + 4])[0])


def test_balanced_subset_refuses_a_class_with_too_few_images() -> None:
    data = patterned(5, seed=0)
    assert torch.bincount(balanced_subset(data, 4, seed=0).labels).tolist() == [4] * 10
    with pytest.raises(DatasetError, match="fewer than the 6"):
        balanced_subset(data, 6, seed=0)


def test_evaluation_refuses_a_classifier_with_other_classes(tmp_path: Path) -> None:
    generator = load_generator(make_tiny_model(tmp_path))
    with pytest.raises(DatasetError, match="classifier classes"):
        evaluate(generator, classifier=constant_classifier(0), real_train=patterned(5, 0), real_test=patterned(5, 1))
