"""Training data: Fashion-MNIST from Debian's IDX files, read without any download."""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.errors import DatasetError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Slugs of Zalando's class names ("T-shirt/top", ..., "Ankle boot"), in label order.
FASHION_MNIST_CLASSES = (
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)

_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True)
class LabelledImages:
    """uint8 images (N, C, H, W) with int64 labels (N,) and the class names they index."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array, checking the header against the payload."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError as exc:
        raise DatasetError(
            f"{path} not found (install Fashion-MNIST with: apt-get install dataset-fashion-mnist)"
        ) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = _IDX_DTYPES[raw[2]]
    payload = raw[4 + 4 * ndim :]
    if len(payload) != int(np.prod(dims)) * dtype.itemsize:
        raise DatasetError(f"{path}: header says {dims} but the payload has {len(payload)} bytes")
    return np.frombuffer(payload, dtype=dtype).reshape(dims)


def load_fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_DIR) -> LabelledImages:
    """Load the Fashion-MNIST ``train`` (60,000) or ``test`` (10,000) split as (N, 1, 28, 28) uint8."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DatasetError(f"unknown split {split!r} (choose train or test)")
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    return LabelledImages(
        images=torch.from_numpy(images.copy()).unsqueeze(1),  # (N, 1, 28, 28)
        labels=torch.from_numpy(labels.astype(np.int64)),
        class_names=FASHION_MNIST_CLASSES,
    )


def select_classes(data: LabelledImages, classes: list[str | int], per_class: int | None = None) -> LabelledImages:
    """Keep only ``classes`` (names or indices), relabelled 0..k-1 in the order given.

    Args:
        per_class: keep only the first ``per_class`` images of each class (a few-shot slice), in data order.

    Raises:
        DatasetError: a class is unknown, repeated, or has fewer than ``per_class`` images.
    """
    indices: list[int] = []
    for cls in classes:
        if isinstance(cls, int) or (isinstance(cls, str) and cls.isdigit()):
            index = int(cls)
            if not 0 <= index < len(data.class_names):
                raise DatasetError(f"class index {index} out of range 0..{len(data.class_names) - 1}")
        elif cls in data.class_names:
            index = data.class_names.index(cls)
        else:
            raise DatasetError(f"unknown class {cls!r} (known: {', '.join(data.class_names)})")
        if index in indices:
            raise DatasetError(f"class {data.class_names[index]!r} given twice")
        indices.append(index)
    picks: list[torch.Tensor] = []
    new_labels: list[torch.Tensor] = []
    for new, old in enumerate(indices):
        rows = torch.nonzero(data.labels == old).squeeze(1)
        if per_class is not None:
            if rows.numel() < per_class:
                raise DatasetError(
                    f"class {data.class_names[old]!r} has {rows.numel()} images, fewer than the {per_class} asked"
                )
            rows = rows[:per_class]
        picks.append(rows)
        new_labels.append(torch.full((rows.numel(),), new, dtype=torch.int64))
    order = torch.cat(picks)
    return LabelledImages(
        images=data.images[order],
        labels=torch.cat(new_labels),
        class_names=tuple(data.class_names[i] for i in indices),
    )
