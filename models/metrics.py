"""Offline sample-quality metrics on feature vectors from a fixed extractor (see ``models/classifier.py``).

Every function takes features as numpy arrays or torch tensors of shape (N, D) and computes in float64; none
downloads anything. A score is comparable to another only with the same extractor, sample counts and splits, so
``models/evaluate.py`` reports each beside the same score for real data.

- FID: Fréchet distance between Gaussians fitted to the two feature sets (Heusel et al. 2017).
- KID: unbiased MMD² with the cubic polynomial kernel, mean ± std over random subsets (Bińkowski et al. 2018).
- Precision / recall / density / coverage: k-NN manifold estimates (Naeem et al. 2020, their reference code).
- Label consistency and CAS (Ravuri & Vinyals 2019) use a classifier instead of features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from models.classifier import Classifier, ClassifierConfig, ClassifierStep, accuracy, predict, train_classifier
from models.data import LabelledImages

ArrayLike = np.ndarray | torch.Tensor


def _as_float64(x: ArrayLike, name: str, ndim: int) -> np.ndarray:
    array = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    return array


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite (D, D) matrix via its eigen-decomposition."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^½)``, where the last trace is computed as
    ``tr((sigma1^½ sigma2 sigma1^½)^½)``: the same value (the two matrices are similar), but the argument is symmetric
    PSD, so an eigen-decomposition gives real, non-negative eigenvalues and no imaginary round-off to discard (unlike
    ``scipy.linalg.sqrtm`` of the non-symmetric product). Rank-deficient covariances (N <= D, dead ReLU units) are
    fine: negative round-off eigenvalues are clipped to zero.

    Args:
        mu1, mu2: means, shape (D,).
        sigma1, sigma2: covariances, shape (D, D), symmetric PSD.

    Returns:
        The squared distance (>= 0) as a float.
    """
    m1, m2 = _as_float64(mu1, "mu1", 1), _as_float64(mu2, "mu2", 1)
    s1, s2 = _as_float64(sigma1, "sigma1", 2), _as_float64(sigma2, "sigma2", 2)
    if not m1.shape == m2.shape or not s1.shape == s2.shape == (m1.shape[0], m1.shape[0]):
        raise ValueError(f"shape mismatch: mu {m1.shape}, {m2.shape}; sigma {s1.shape}, {s2.shape}")
    root1 = _sqrt_psd(s1)
    inner = root1 @ s2 @ root1  # (D, D), symmetric PSD
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2.0), 0.0, None)).sum())
    diff = m1 - m2
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean))


def gaussian_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), N >= 2, in float64."""
    x = _as_float64(features, "features", 2)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def fid(features_a: ArrayLike, features_b: ArrayLike) -> float:
    """Fréchet Inception-style distance between features_a (N, D) and features_b (M, D); N, M >= 2.

    Biased upward at small N (the covariance estimate is noisy): compare only values with the same counts.
    """
    mu_a, sigma_a = gaussian_stats(features_a)
    mu_b, sigma_b = gaussian_stats(features_b)
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)


def per_class_fid(
    features_a: ArrayLike,
    labels_a: ArrayLike,
    features_b: ArrayLike,
    labels_b: ArrayLike,
    class_names: Sequence[str],
) -> dict[str, float]:
    """FID between the two sets restricted to each class.

    Args:
        features_a: (N, D) with labels_a (N,) class indices; features_b: (M, D) with labels_b (M,).
        class_names: names of classes 0..K-1; every class needs at least 2 vectors on each side.

    Returns:
        ``{class name: FID}`` in class order.
    """
    fa, fb = _as_float64(features_a, "features_a", 2), _as_float64(features_b, "features_b", 2)
    la, lb = _as_float64(labels_a, "labels_a", 1), _as_float64(labels_b, "labels_b", 1)
    return {name: fid(fa[la == c], fb[lb == c]) for c, name in enumerate(class_names)}


class KID(NamedTuple):
    """Kernel Inception-style distance: mean and standard deviation of the unbiased MMD² over subsets."""

    mean: float
    std: float


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² between x (m, D) and y (m, D) with k(a, b) = (a·b / D + 1)³."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    off_diagonal = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(off_diagonal - 2.0 * k_xy.mean())


def kid(
    features_a: ArrayLike, features_b: ArrayLike, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> KID:
    """KID between features_a (N, D) and features_b (M, D): unbiased MMD², cubic polynomial kernel.

    Each of ``subsets`` rounds draws ``min(subset_size, N, M)`` vectors without replacement from each side (a
    ``numpy`` generator seeded with ``seed``, so the result is repeatable). The estimate is unbiased, so it can be
    slightly negative when the sets come from the same distribution. The values are on the extractor's scale (the
    kernel sees raw features), so compare only KIDs from one extractor; with ``subset_size`` >= N every subset is
    the whole set and std is 0.

    Returns:
        ``KID(mean, std)`` over the subsets (std is 0 for a single subset).
    """
    a, b = _as_float64(features_a, "features_a", 2), _as_float64(features_b, "features_b", 2)
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2 or subsets < 1:
        raise ValueError(f"KID needs subsets >= 1 of at least 2 vectors (got {subsets} of {m})")
    rng = np.random.default_rng(seed)
    scores = [
        _polynomial_mmd2(a[rng.choice(a.shape[0], m, replace=False)], b[rng.choice(b.shape[0], m, replace=False)])
        for _ in range(subsets)
    ]
    return KID(float(np.mean(scores)), float(np.std(scores)))


@dataclass(frozen=True)
class PRDC:
    """Naeem et al. (2020) manifold scores; precision, recall, coverage in [0, 1], density around 1 when matched."""

    precision: float
    recall: float
    density: float
    coverage: float


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b)  # (len(a), len(b)), float64 keeps the matrix-product shortcut accurate


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row of x (N, D) to its k-th nearest other row: (N,). Row i itself sits at rank 0."""
    radii = [
        _distances(x[i : i + chunk], x).topk(k + 1, dim=1, largest=False).values[:, k] for i in range(0, len(x), chunk)
    ]
    return torch.cat(radii)


def precision_recall_density_coverage(real: ArrayLike, fake: ArrayLike, k: int = 5, chunk: int = 1024) -> PRDC:
    """Precision, recall, density and coverage of fake (M, D) against real (N, D); N, M > k.

    With r(x) the distance from a real x to its k-th nearest real neighbour (and r'(y) likewise among fakes):

    - precision: fraction of fakes inside some real ball, ``d(y, x) < r(x)``;
    - recall: fraction of reals inside some fake ball, ``d(x, y) < r'(y)``;
    - density: ``(1 / kM) Σ_y #{x : d(y, x) < r(x)}`` (rewards fakes where reals are dense; can exceed 1);
    - coverage: fraction of reals whose ball holds at least one fake.

    Distances are Euclidean, computed in float64 in chunks of ``chunk`` rows: memory stays O(chunk · max(N, M)).
    """
    x = torch.from_numpy(_as_float64(real, "real", 2))
    y = torch.from_numpy(_as_float64(fake, "fake", 2))
    if len(x) <= k or len(y) <= k:
        raise ValueError(f"need more than k={k} real and fake vectors, got {len(x)} and {len(y)}")
    r_real, r_fake = _knn_radii(x, k, chunk), _knn_radii(y, k, chunk)  # (N,), (M,)
    in_real_balls = torch.cat(
        [(_distances(y[i : i + chunk], x) < r_real[None, :]).sum(dim=1) for i in range(0, len(y), chunk)]
    )  # (M,): how many real balls hold each fake
    covered, recalled = [], []
    for i in range(0, len(x), chunk):
        d = _distances(x[i : i + chunk], y)  # (chunk, M)
        covered.append(d.min(dim=1).values < r_real[i : i + chunk])
        recalled.append((d < r_fake[None, :]).any(dim=1))
    return PRDC(
        precision=float((in_real_balls > 0).double().mean()),
        recall=float(torch.cat(recalled).double().mean()),
        density=float(in_real_balls.double().sum() / (k * len(y))),
        coverage=float(torch.cat(covered).double().mean()),
    )


def per_class_prdc(
    real: ArrayLike,
    real_labels: ArrayLike,
    fake: ArrayLike,
    fake_labels: ArrayLike,
    class_names: Sequence[str],
    k: int = 5,
) -> dict[str, PRDC]:
    """:func:`precision_recall_density_coverage` within each class: a class whose samples collapse shows low recall
    and coverage here even when the other classes keep the global figures high.

    Args:
        real: (N, D) with real_labels (N,) class indices; fake: (M, D) with fake_labels (M,).
        class_names: names of classes 0..K-1; every class needs more than ``k`` vectors on each side.

    Returns:
        ``{class name: PRDC}`` in class order. The k-NN balls are those of the class alone, so the figures are not
        comparable with the global ones: compare a class with its real-vs-real reference.
    """
    x, y = _as_float64(real, "real", 2), _as_float64(fake, "fake", 2)
    lx, ly = _as_float64(real_labels, "real_labels", 1), _as_float64(fake_labels, "fake_labels", 1)
    return {name: precision_recall_density_coverage(x[lx == c], y[ly == c], k=k) for c, name in enumerate(class_names)}


def label_consistency(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> float:
    """Fraction of images (N, C, H, W) uint8 that ``classifier`` assigns to the label (N,) they were generated for.

    For a conditional generator this is "does the image show the requested class"; the same classifier's accuracy
    on the real test split is the ceiling to compare against.
    """
    target = torch.as_tensor(labels, dtype=torch.long)
    if len(images) == 0 or len(images) != len(target):
        raise ValueError(f"need equally many images and labels, got {len(images)} and {len(target)}")
    return float((predict(classifier, images) == target).float().mean())


def classification_accuracy_score(
    generated: LabelledImages,
    real_test: LabelledImages,
    *,
    config: ClassifierConfig | None = None,
    epochs: int = 5,
    batch_size: int = 128,
    seed: int = 0,
    augment: bool = False,
    on_progress: Callable[[ClassifierStep], None] | None = None,
) -> float:
    """CAS (Ravuri & Vinyals 2019): train a fresh classifier on generated images only, test it on real images.

    Args:
        generated: uint8 images (N, C, H, W) with the labels they were generated for.
        real_test: the real held-out split, same classes.
        config: the architecture (default: :class:`ClassifierConfig` for the data); use the extractor's to compare.

    Returns:
        Accuracy on ``real_test`` in [0, 1]. Train the same way on as many real images for the baseline.
    """
    model = train_classifier(
        generated,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        augment=augment,
        config=config,
        on_progress=on_progress,
    )
    return accuracy(model, real_test)
