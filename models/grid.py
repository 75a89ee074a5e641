"""Contact sheets: many small images tiled into one PNG (one row per class in training samples, a job's outputs
captioned with their index and label in generation)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

SHEET_CELL = 128  # a contact sheet's cell: each image scaled to fit a square of this side
SHEET_CAPTION = 14  # the caption strip under each cell
SHEET_PAD = 2  # white space between cells and around the sheet (class_grid's default)
SHEET_BACKGROUND = 224  # light grey behind each image, so that a white pad or margin shows as part of the image
_CAPTION_FONT_SIZE = 10


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


def sheet_cell(image: Image.Image, side: int = SHEET_CELL) -> Image.Image:
    """``image`` scaled to fit a ``side`` square, keeping its aspect ratio: Lanczos when it shrinks, nearest when it
    grows (a 28-pixel sample stays crisp rather than blurred)."""
    scale = min(side / image.width, side / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    grows = scale > 1
    return image.resize(size, Image.Resampling.NEAREST if grows else Image.Resampling.LANCZOS)


def contact_sheet(images: Sequence[Image.Image], captions: Sequence[str], per_row: int) -> Image.Image:
    """Tile ``images`` (mode L or RGB, any sizes) row-major, ``per_row`` a row, each scaled into a
    :data:`SHEET_CELL` square (:func:`sheet_cell`), centred on :data:`SHEET_BACKGROUND`, with its caption underneath
    on white; tiled by :func:`class_grid`. Mode L when every image is, else RGB.

    Cell ``i`` spans ``left = SHEET_PAD + col * (SHEET_CELL + SHEET_PAD)`` and ``top = SHEET_PAD + row *
    (SHEET_CELL + SHEET_CAPTION + SHEET_PAD)``; its image is centred in the square at (left, top), the caption below.
    """
    if len(images) != len(captions) or not images:
        raise ValueError(f"need one caption per image and at least one image, got {len(images)} and {len(captions)}")
    mode = "L" if all(image.mode == "L" for image in images) else "RGB"
    font = ImageFont.load_default(size=_CAPTION_FONT_SIZE)
    cells = []
    for image, caption in zip(images, captions, strict=True):
        cell = Image.new(mode, (SHEET_CELL, SHEET_CELL + SHEET_CAPTION), "white")
        cell.paste(SHEET_BACKGROUND if mode == "L" else (SHEET_BACKGROUND,) * 3, (0, 0, SHEET_CELL, SHEET_CELL))
        thumb = sheet_cell(image.convert(mode))
        cell.paste(thumb, ((SHEET_CELL - thumb.width) // 2, (SHEET_CELL - thumb.height) // 2))
        draw = ImageDraw.Draw(cell)
        while caption and draw.textlength(caption, font=font) > SHEET_CELL - 4:
            caption = caption[:-1]  # a long label is cut rather than spilling into the next cell
        draw.text((2, SHEET_CELL + 1), caption, fill="black", font=font)
        array = np.array(cell, dtype=np.uint8)  # a writable copy: torch refuses to share a read-only buffer
        cells.append(torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()))
    return to_pil(class_grid(torch.stack(cells), min(per_row, len(cells)), pad=SHEET_PAD))
