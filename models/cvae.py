"""Class-conditional VAE: a conv encoder q(z|x,y) and decoder p(x|z,y), both told the label through an embedding.

The decoder is a Bernoulli likelihood over pixels in [0, 1] (binary cross-entropy on logits), the sharpest of the
simple choices here. Fashion-MNIST is mostly saturated black background around sharp-edged garments, and what
blurs VAE samples is the reconstruction term losing to the KL term. A pixel drawn at 0.5 that should be 0 or 1
costs ln 2 = 0.69 nats under BCE but 0.125 under a unit-variance Gaussian (MSE / 2), so the Gaussian, against the
same KL, settles for smooth averages. L1 is a Laplace likelihood with the same problem: its scale, i.e. its weight
against the KL, is a free guess. The image served is the decoder mean, ``sigmoid(logits)``.

Serving only needs the :class:`Decoder`. Neither network has a normalisation layer, so image i depends only on
(weights, label i, seed i), never on the batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.cgan import latents_for_seeds
from models.errors import InvalidModelConfig

ARCH = "cvae"

# resolution -> (base feature map side, number of 2x resolution changes); the same layouts as the cGAN
_LAYOUTS = {28: (7, 2), 32: (4, 3), 64: (4, 4)}


@dataclass(frozen=True)
class CVAEConfig:
    """Everything needed to rebuild the networks; stored as JSON beside the weights."""

    class_names: tuple[str, ...]
    resolution: int = 28
    channels: int = 1
    z_dim: int = 16  # small: prior samples land where the decoder has seen posteriors
    width: int = 32  # conv width at full resolution; doubles per level down (at most 8x)
    embed_dim: int = 16  # label embedding fed to the decoder beside z
    arch: str = field(default=ARCH)

    def __post_init__(self) -> None:
        if self.arch != ARCH:
            raise InvalidModelConfig(f"a CVAEConfig needs arch {ARCH!r}, got {self.arch!r}")
        if self.resolution not in _LAYOUTS:
            raise InvalidModelConfig(f"resolution {self.resolution} not supported (choose from {sorted(_LAYOUTS)})")
        if self.channels not in (1, 3):
            raise InvalidModelConfig(f"channels must be 1 or 3, got {self.channels}")
        if len(self.class_names) < 1:
            raise InvalidModelConfig("a conditional model needs at least one class name")
        if len(set(self.class_names)) != len(self.class_names):
            raise InvalidModelConfig(f"class names must be unique, got {list(self.class_names)}")
        for name in ("z_dim", "width", "embed_dim"):
            if getattr(self, name) < 1:
                raise InvalidModelConfig(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def widths(self) -> list[int]:
        """Channel widths from full resolution down to the base map, e.g. [32, 64, 128] at 28 px."""
        _, levels = _LAYOUTS[self.resolution]
        return [self.width * 2 ** min(i, 3) for i in range(levels + 1)]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CVAEConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["class_names"] = tuple(known.get("class_names", ()))
        return cls(**known)


class Encoder(nn.Module):
    """images (B, C, H, W) in [0, 1] and labels (B,) -> posterior mean and log-variance, each (B, z_dim).

    The label enters as one extra input plane (a learned H x W map per class).
    """

    def __init__(self, cfg: CVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths()
        base, _ = _LAYOUTS[cfg.resolution]
        self.label_plane = nn.Embedding(cfg.num_classes, cfg.resolution * cfg.resolution)
        self.stem = nn.Conv2d(cfg.channels + 1, widths[0], 3, padding=1)
        self.downs = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1) for i in range(len(widths) - 1)
        )
        self.head = nn.Linear(widths[-1] * base * base, 2 * cfg.z_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.cfg.resolution
        plane = self.label_plane(y).view(-1, 1, r, r)  # (B, 1, H, W)
        h = F.leaky_relu(self.stem(torch.cat([x, plane], dim=1)), 0.2)  # (B, w0, H, W)
        for down in self.downs:
            h = F.leaky_relu(down(h), 0.2)  # (B, w_{i+1}, H/2, W/2)
        mu, logvar = self.head(h.flatten(1)).chunk(2, dim=1)  # (B, z_dim) each
        return mu, logvar


class Decoder(nn.Module):
    """z (B, z_dim) and labels (B,) -> images (B, C, H, W) in [-1, 1]; :meth:`logits` gives the raw outputs."""

    def __init__(self, cfg: CVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths()[::-1]  # base map first, e.g. [128, 64, 32] at 28 px
        self.base, _ = _LAYOUTS[cfg.resolution]
        self.embed = nn.Embedding(cfg.num_classes, cfg.embed_dim)
        self.fc = nn.Linear(cfg.z_dim + cfg.embed_dim, widths[0] * self.base * self.base)
        # 4x4 stride-2 transposed convs (DCGAN's up-sampler): half the cost of upsample + 3x3 conv on a CPU
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i], widths[i + 1], 4, stride=2, padding=1) for i in range(len(widths) - 1)
        )
        self.out = nn.Conv2d(widths[-1], cfg.channels, 3, padding=1)

    def logits(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits (B, C, H, W) of every pixel being white."""
        h = F.leaky_relu(self.fc(torch.cat([z, self.embed(y)], dim=1)), 0.2)  # (B, w_base * base * base)
        h = h.view(z.shape[0], -1, self.base, self.base)  # (B, w_base, base, base)
        for up in self.ups:
            h = F.leaky_relu(up(h), 0.2)  # (B, w_{i+1}, 2H, 2W)
        return self.out(h)  # (B, C, R, R)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(z, y)) * 2.0 - 1.0  # (B, C, R, R): the mean image, in [-1, 1]


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I) drawn from ``rng``; shapes (B, z_dim)."""
    eps = torch.randn(mu.shape, generator=rng, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x,y) || N(0, I)) in nats per image, (B,), for diagonal Gaussians."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def reconstruction_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bernoulli negative log-likelihood in nats per image, (B,); target (B, C, H, W) in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(dim=1)


def kl_weight(step: int, beta: float, warmup_steps: int) -> float:
    """KL warm-up: the weight rises linearly from 0 at step 0 to ``beta`` at ``warmup_steps``, then stays there.

    Starting at 0 lets the decoder learn to use z before the KL term can pull every posterior onto the prior
    (posterior collapse). ``step`` counts updates already made; ``warmup_steps=0`` means no warm-up.
    """
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


@torch.no_grad()
def sample_images(decoder: Decoder, labels: list[int], seeds: list[int]) -> torch.Tensor:
    """Decode prior samples: labels (B,) and seeds (B,) -> float images (B, C, H, W) in [-1, 1] on the CPU.

    z for image i is drawn from N(0, I) by its own seeded generator (:func:`models.cgan.latents_for_seeds`).
    """
    device = next(decoder.parameters()).device
    z = latents_for_seeds(seeds, decoder.cfg.z_dim).to(device)  # (B, z_dim)
    y = torch.tensor(labels, dtype=torch.long, device=device)  # (B,)
    was_training = decoder.training
    decoder.eval()
    images = decoder(z, y).cpu()
    decoder.train(was_training)
    return images
