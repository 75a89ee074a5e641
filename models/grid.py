"""Contact sheets: many small images tiled into one PNG (one row per class in training samples)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image


def class_grid(images: torch.Tensor, per_row: int, pad: int = 2) -> torch.Tensor:
    """Tile uint8 images (N, C, H, W) row-major, ``per_row`` a row, into one uint8 image (C, H', W')."""
    n, c, h, w = images.shape
    rows = -(-n // per_row)
    sheet = torch.full((c, rows * (h + pad) + pad, per_row * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, per_row)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        sheet[:, top : top + h, left : left + w] = images[i]
    return sheet


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 (C, H, W) with C in {1, 3} -> a PIL image (mode L or RGB)."""
    array = image.permute(1, 2, 0).numpy()  # (H, W, C)
    return Image.fromarray(array[:, :, 0], mode="L") if array.shape[2] == 1 else Image.fromarray(array, mode="RGB")


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write a uint8 (C, H, W) image as PNG, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image).save(path, format="PNG")


def encode_png(image: torch.Tensor) -> bytes:
    """A uint8 (C, H, W) image as PNG bytes."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()
