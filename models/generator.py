"""The one serving interface: load a generator from safetensors + JSON and sample uint8 images.

Every architecture exposes ``sample(labels, seeds)``; image i depends only on (weights, labels[i], seeds[i]),
never on the batch it rides in (eval-mode normalisation, one latent RNG per seed).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Acceleration:
    """How a served generator runs its forward pass. The default (fp32, eager, contiguous) is exact on the CPU:
    image i is byte-identical whatever batch it rides in (tested at one and two intra-op threads; on another machine
    ``python -m benchmarks.exactness`` checks it, on a GPU too, where cuDNN picks kernels by batch size). The options
    trade that exactness for speed on a GPU:

    - ``bf16``: autocast convolutions and matmuls to bfloat16 (tensor cores); an image may move by a grey level or
      two between batch sizes, since kernels pick other accumulation orders.
    - ``channels_last``: NHWC weights and activations, the layout cuDNN's fastest convolutions want.
    - ``compile_backend``: ``torch.compile`` the forward pass with this backend (``"inductor"`` on a GPU), once per
      batch-size bucket: a batch is padded up to the next power of two, so a worker compiles at most
      log2(max_batch) + 1 graphs instead of one per batch size it happens to see.
    """

    bf16: bool = False
    channels_last: bool = False
    compile_backend: str | None = None


def batch_bucket(n: int) -> int:
    """The smallest power of two >= ``n`` (>= 1): the batch size a compiled forward pass runs at."""
    return 1 << max(0, n - 1).bit_length()


# Graphs one compiled sampler may need: a bucket per power of two up to 2**31 images.
_BUCKETS_PER_SAMPLER = 32


def _reserve_compiled_graphs(n: int) -> None:
    """Let torch.compile keep ``n`` more graphs of the sampling function before it gives up.

    Dynamo counts the graphs it caches per code object, and every sampler of a class shares ``_decode``'s code: past
    its ``recompile_limit`` (8) it warns once and runs every further batch bucket, of any model in the process, eager.
    A worker with max_batch 256 needs 9 buckets for one model; each compiled sampler adds its share to the limits.
    """
    config = torch._dynamo.config
    renamed = {"recompile_limit": "cache_size_limit", "accumulated_recompile_limit": "accumulated_cache_size_limit"}
    for name, old_name in renamed.items():  # the old names before torch 2.6
        key = name if hasattr(config, name) else old_name
        setattr(config, key, getattr(config, key) + n)


class _Sampler:
    """Serving wrapper around a trained network, always in eval mode: validation, per-seed latents, padding to a
    compiled bucket, autocast, and the conversion to uint8 are here; subclasses map (normal draws, labels) to
    images in [-1, 1]."""

    def __init__(
        self,
        config: cgan.CGANConfig | cvae.CVAEConfig,
        net: nn.Module,
        device: str | torch.device = "cpu",
        accel: Acceleration | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.accel = accel or Acceleration()
        self.net = net.to(self.device).eval()
        if self.accel.channels_last:
            # Module.to takes memory_format at run time (4-D weights become NHWC); torch's stubs leave it out.
            self.net = self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self._decode
        if self.accel.compile_backend is not None:
            _reserve_compiled_graphs(_BUCKETS_PER_SAMPLER)
            self._forward = torch.compile(self._decode, backend=self.accel.compile_backend, dynamic=False)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.class_names

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def channels(self) -> int:
        return self.config.channels

    def _decode(self, eps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Normal draws (B, z_dim) and labels (B,) -> images (B, C, H, W) in [-1, 1]."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, labels: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        """labels (B,) class indices and seeds (B,) ints -> uint8 images (B, C, H, W) on the CPU."""
        if len(labels) != len(seeds):
            raise ValueError(f"got {len(labels)} labels but {len(seeds)} seeds")
        bad = [label for label in labels if not 0 <= label < self.config.num_classes]
        if bad:
            raise ValueError(f"label index {bad[0]} out of range 0..{self.config.num_classes - 1}")
        n = len(labels)
        if self.accel.compile_backend is not None:
            pad = batch_bucket(n) - n
        else:
            # oneDNN's transposed convolution splits an odd batch of 3 or more between two threads mid-image, which
            # moves that image by a last bit: a dummy makes the batch even (models.invariant has the rest).
            pad = 1 if n % 2 and n > 1 and self.device.type == "cpu" else 0
        eps = cgan.latents_for_seeds([*seeds, *[0] * pad], self.config.z_dim).to(self.device)  # (B + pad, z_dim)
        y = torch.tensor([*labels, *[0] * pad], dtype=torch.long, device=self.device)  # (B + pad,)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.accel.bf16):
            images = self._forward(eps, y)  # (B + pad, C, H, W)
        return to_uint8(images[:n]).cpu()


class CGANSampler(_Sampler):
    """A trained (EMA) cGAN generator: the latent of image i is its normal draw."""

    net: cgan.Generator

    def _decode(self, eps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(eps, labels)


class CVAESampler(_Sampler):
    """A trained cVAE decoder: the normal draw goes through the decoder's prior (N(0, I) or its fitted
    class-gaussian) and is decoded to the mean image."""

    net: cvae.Decoder

    def _decode(self, eps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(self.net.latents(labels, eps), labels)


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


def load_generator(
    directory: Path, device: str | torch.device = "cpu", accel: Acceleration | None = None
) -> ImageGenerator:
    """Load a generator saved by :func:`save_generator` onto ``device``, run as ``accel`` says (default: exact
    fp32). Weights are read strictly; nothing is unpickled.

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
        return CVAESampler(cvae_config, decoder, device, accel)
    if data["arch"] != cgan.ARCH:
        raise InvalidModelConfig(
            f"unknown architecture {data['arch']!r} in {directory / CONFIG_FILE} (known: {cgan.ARCH}, {cvae.ARCH})"
        )
    config = cgan.CGANConfig.from_json(data)
    net = cgan.Generator(config)
    load_weights(net, weights)
    return CGANSampler(config, net, device, accel)


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
