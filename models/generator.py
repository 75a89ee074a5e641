"""The one serving interface: load a generator from safetensors + JSON and sample uint8 images.

Every architecture exposes ``sample(labels, seeds)``; image i depends only on (weights, labels[i], seeds[i]),
never on the batch it rides in (eval-mode normalisation, one latent RNG per seed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from models import cgan, cvae
from models.errors import InvalidModelConfig, WeightsError

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"


class ImageGenerator(Protocol):
    """What a worker needs from a loaded model."""

    @property
    def class_names(self) -> tuple[str, ...]: ...

    @property
    def resolution(self) -> int: ...

    @property
    def channels(self) -> int: ...

    def sample(self, labels: Sequence[int], seeds: Sequence[int]) -> torch.Tensor: ...


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map images in [-1, 1] (B, C, H, W) to uint8 (B, C, H, W) in [0, 255]."""
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


class CGANSampler:
    """Serving wrapper around a trained (EMA) cGAN generator, always in eval mode."""

    def __init__(self, config: cgan.CGANConfig, net: cgan.Generator, device: str | torch.device = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.class_names

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def channels(self) -> int:
        return self.config.channels

    @torch.no_grad()
    def sample(self, labels: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        """labels (B,) class indices and seeds (B,) ints -> uint8 images (B, C, H, W) on the CPU."""
        if len(labels) != len(seeds):
            raise ValueError(f"got {len(labels)} labels but {len(seeds)} seeds")
        bad = [label for label in labels if not 0 <= label < self.config.num_classes]
        if bad:
            raise ValueError(f"label index {bad[0]} out of range 0..{self.config.num_classes - 1}")
        z = cgan.latents_for_seeds(list(seeds), self.config.z_dim).to(self.device)  # (B, z_dim)
        y = torch.tensor(list(labels), dtype=torch.long, device=self.device)  # (B,)
        return to_uint8(self.net(z, y)).cpu()


class CVAESampler:
    """Serving wrapper around a trained cVAE decoder: decodes N(0, I) latents, one per seed, to the mean image."""

    def __init__(self, config: cvae.CVAEConfig, net: cvae.Decoder, device: str | torch.device = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.class_names

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def channels(self) -> int:
        return self.config.channels

    def sample(self, labels: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        """labels (B,) class indices and seeds (B,) ints -> uint8 images (B, C, H, W) on the CPU."""
        if len(labels) != len(seeds):
            raise ValueError(f"got {len(labels)} labels but {len(seeds)} seeds")
        bad = [label for label in labels if not 0 <= label < self.config.num_classes]
        if bad:
            raise ValueError(f"label index {bad[0]} out of range 0..{self.config.num_classes - 1}")
        return to_uint8(cvae.sample_images(self.net, list(labels), list(seeds)))


def save_generator(directory: Path, config: cgan.CGANConfig | cvae.CVAEConfig, net: nn.Module) -> None:
    """Write ``weights.safetensors`` and ``config.json`` for a generator into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_model(net, str(directory / WEIGHTS_FILE), metadata={"arch": config.arch})
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")


def read_config(directory: Path) -> dict[str, Any]:
    """Read and minimally check a model's ``config.json``."""
    path = directory / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise WeightsError(f"no {CONFIG_FILE} in {directory}") from exc
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or "arch" not in data:
        raise WeightsError(f"{path} has no 'arch' field")
    return data


def load_generator(directory: Path, device: str | torch.device = "cpu") -> ImageGenerator:
    """Load a generator saved by :func:`save_generator`. Weights are read strictly; nothing is unpickled.

    Raises:
        WeightsError: a file is missing or the tensors do not match the config.
        InvalidModelConfig: the config names an unknown architecture or bad dimensions.
    """
    data = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightsError(f"no {WEIGHTS_FILE} in {directory}")
    if data["arch"] == cvae.ARCH:
        cvae_config = cvae.CVAEConfig.from_json(data)
        decoder = cvae.Decoder(cvae_config)
        load_weights(decoder, weights)
        return CVAESampler(cvae_config, decoder, device)
    if data["arch"] != cgan.ARCH:
        raise InvalidModelConfig(
            f"unknown architecture {data['arch']!r} in {directory / CONFIG_FILE} (known: {cgan.ARCH}, {cvae.ARCH})"
        )
    config = cgan.CGANConfig.from_json(data)
    net = cgan.Generator(config)
    load_weights(net, weights)
    return CGANSampler(config, net, device)


def load_weights(net: nn.Module, weights: Path) -> None:
    """Load safetensors ``weights`` into ``net`` strictly (every key and shape must match); nothing is unpickled.

    Raises:
        WeightsError: the file is missing, unreadable or does not match ``net``.
    """
    if not weights.is_file():
        raise WeightsError(f"no {weights.name} in {weights.parent}")
    try:
        load_model(net, str(weights), strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise WeightsError(f"cannot load {weights}: {exc}") from exc
