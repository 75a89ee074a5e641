"""Post-processing of samples into renditions: resize to a box (contain, cover or pad), then enhancement operations.

Pure functions of (pixels, :class:`~producer.contract.Rendition`) over Pillow, with no state and no randomness: the
same sample and rendition give the same pixels on every run and in every process, so a rerun stores byte-identical
renditions (the encoders are deterministic too).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from producer.contract import (
    Autocontrast,
    Contrast,
    Operation,
    Rendition,
    Sharpness,
    UnsharpMask,
    output_size,
    scaled_size,
)

RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def from_chw(image: np.ndarray) -> Image.Image:
    """uint8 (C, H, W) with C in {1, 3} -> a PIL image (mode L or RGB)."""
    hwc = np.ascontiguousarray(image.transpose(1, 2, 0))  # (H, W, C)
    return Image.fromarray(hwc[:, :, 0], mode="L") if hwc.shape[2] == 1 else Image.fromarray(hwc, mode="RGB")


def to_chw(image: Image.Image) -> np.ndarray:
    """A PIL image of mode L or RGB -> uint8 (C, H, W), as the encoders take it."""
    array = np.asarray(image, dtype=np.uint8)
    return array[None, :, :] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def render(image: Image.Image, rendition: Rendition) -> Image.Image:
    """``image`` (mode L or RGB) as ``rendition``: resized to fit its box, enhanced by its ``ops`` in order, then
    padded for ``fit="pad"``. The result is exactly :func:`~producer.contract.output_size` big.

    A grey sample stays one channel unless a pad colour that is not grey makes it RGB.
    """
    width, height = scaled_size(image.width, image.height, rendition)
    scaled = image.resize((width, height), RESAMPLE[rendition.resample])
    box_w, box_h = output_size(image.width, image.height, rendition)
    if rendition.fit == "cover":  # crop the overflow evenly; an odd pixel goes from the right or bottom
        left, top = (width - box_w) // 2, (height - box_h) // 2
        scaled = scaled.crop((left, top, left + box_w, top + box_h))
    for op in rendition.ops:
        scaled = apply(scaled, op)
    if rendition.fit != "pad":
        return scaled
    r, g, b = rendition.rgb()
    grey = scaled.mode == "L" and r == g == b
    canvas = Image.new("L" if grey else "RGB", (box_w, box_h), r if grey else (r, g, b))
    canvas.paste(scaled if grey else scaled.convert("RGB"), ((box_w - width) // 2, (box_h - height) // 2))
    return canvas


def apply(image: Image.Image, op: Operation) -> Image.Image:
    """One enhancement step on ``image`` (mode L or RGB); returns a new image of the same size and mode."""
    if isinstance(op, Autocontrast):
        return ImageOps.autocontrast(image, cutoff=op.cutoff)
    if isinstance(op, UnsharpMask):
        return image.filter(ImageFilter.UnsharpMask(radius=op.radius, percent=op.percent, threshold=op.threshold))
    if isinstance(op, Contrast):
        return ImageEnhance.Contrast(image).enhance(op.factor)
    if isinstance(op, Sharpness):
        return ImageEnhance.Sharpness(image).enhance(op.factor)
    raise TypeError(f"no such operation: {op!r}")  # the contract admits no other
