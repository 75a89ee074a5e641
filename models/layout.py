"""What the cGAN and the cVAE share about their images: the supported resolutions with the feature-map layout
of each, and the checks of a config's resolution, channels and class names."""

from __future__ import annotations

from collections.abc import Sequence

from models.errors import InvalidModelConfig

# resolution -> (base feature map side, number of 2x resolution changes between it and the image)
LAYOUTS: dict[int, tuple[int, int]] = {28: (7, 2), 32: (4, 3), 64: (4, 4)}


def check_image_config(resolution: int, channels: int, class_names: Sequence[str]) -> None:
    """Check the part of a cGAN or cVAE config that both architectures read the same way.

    Args:
        resolution: image side in px; needs a layout in :data:`LAYOUTS`.
        channels: 1 (greyscale) or 3 (RGB).
        class_names: the labels the model is conditioned on, one or more, unique.

    Raises:
        InvalidModelConfig: the first of these that does not hold.
    """
    if resolution not in LAYOUTS:
        raise InvalidModelConfig(f"resolution {resolution} not supported (choose from {sorted(LAYOUTS)})")
    if channels not in (1, 3):
        raise InvalidModelConfig(f"channels must be 1 or 3, got {channels}")
    if len(class_names) < 1:
        raise InvalidModelConfig("a conditional model needs at least one class name")
    if len(set(class_names)) != len(class_names):
        raise InvalidModelConfig(f"class names must be unique, got {list(class_names)}")
