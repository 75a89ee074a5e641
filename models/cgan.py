"""Class-conditional GAN: conditional-BN generator, spectral-norm projection discriminator.

The recipe that works at small scale (PyTorch-StudioGAN's SNGAN configs): spectral norm on every D layer, hinge
loss, conditional batch norm in G, a projection discriminator and an EMA copy of G for sampling. Resolution (28,
32 or 64 px) and channels (1 or 3) come from the config, so the same code serves Fashion-MNIST and a customer's
64x64 RGB product photos.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from models.config import JsonConfig
from models.errors import InvalidModelConfig
from models.invariant import BatchInvariantConv2d, BatchInvariantLinear
from models.layout import LAYOUTS, check_image_config

ARCH = "cgan"


@dataclass(frozen=True)
class CGANConfig(JsonConfig):
    """Everything needed to rebuild the networks; stored as JSON beside the weights."""

    class_names: tuple[str, ...]
    resolution: int = 28
    channels: int = 1
    z_dim: int = 64
    g_ch: int = 64  # generator width at the output; doubles per resolution level going down
    d_ch: int = 32  # discriminator width at the input
    attention: int = 0  # side of the feature maps that get a self-attention block in G and D (SAGAN); 0: none
    arch: str = field(default=ARCH)

    def __post_init__(self) -> None:
        check_image_config(self.resolution, self.channels, self.class_names)
        sides = attention_sides(self.resolution)
        if self.attention and self.attention not in sides:
            raise InvalidModelConfig(
                f"attention at {self.attention} px is not possible at resolution {self.resolution} "
                f"(feature map sides: {', '.join(map(str, sides))}; 0 for none)"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def attention_sides(resolution: int) -> list[int]:
    """Sides of the inner feature maps both networks share at ``resolution``: where attention may go."""
    base, n_up = LAYOUTS[resolution]
    return [base * 2**i for i in range(1, n_up)]


class SelfAttention(nn.Module):
    """SAGAN's self-attention over all positions of a feature map; starts as the identity (gamma = 0).

    Keys and queries are 1x1 convs to C/8 channels, values to C/2, max-pooled 2x as in BigGAN to cut the cost.
    """

    def __init__(self, channels: int, sn: bool) -> None:
        super().__init__()
        wrap = spectral_norm if sn else (lambda m: m)
        self.query = wrap(BatchInvariantConv2d(channels, max(channels // 8, 1), 1, bias=False))
        self.key = wrap(BatchInvariantConv2d(channels, max(channels // 8, 1), 1, bias=False))
        self.value = wrap(BatchInvariantConv2d(channels, max(channels // 2, 1), 1, bias=False))
        self.out = wrap(BatchInvariantConv2d(max(channels // 2, 1), channels, 1, bias=False))
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2)  # (B, C/8, HW)
        k = F.max_pool2d(self.key(x), 2).flatten(2)  # (B, C/8, HW/4)
        v = F.max_pool2d(self.value(x), 2).flatten(2)  # (B, C/2, HW/4)
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (B, HW, HW/4)
        o = (v @ attn.transpose(1, 2)).view(b, -1, h, w)  # (B, C/2, H, W)
        return x + self.gamma * self.out(o)


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine; gain and bias come from the class embedding."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, affine=False)
        self.gain = nn.Embedding(num_classes, num_features)
        self.bias = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.bn(x)  # (B, C, H, W)
        return h * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


class GBlock(nn.Module):
    """Up-block: CBN-ReLU, 2x nearest upsample, 3x3 conv (SNGAN's DCGAN-style generator block)."""

    def __init__(self, c_in: int, c_out: int, num_classes: int) -> None:
        super().__init__()
        self.bn = ConditionalBatchNorm2d(c_in, num_classes)
        self.conv = BatchInvariantConv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn(x, y)), scale_factor=2.0, mode="nearest")  # (B, c_in, 2H, 2W)
        return self.conv(h)  # (B, c_out, 2H, 2W)


class Generator(nn.Module):
    """z (B, z_dim) and labels (B,) -> images (B, C, H, W) in [-1, 1]."""

    def __init__(self, cfg: CGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        base, n_up = LAYOUTS[cfg.resolution]
        widths = [cfg.g_ch * 2 ** min(n_up - i, 3) for i in range(n_up + 1)]  # e.g. [256, 128, 64] at 28 px
        self.base = base
        self.fc = BatchInvariantLinear(cfg.z_dim, widths[0] * base * base)
        self.blocks = nn.ModuleList(GBlock(widths[i], widths[i + 1], cfg.num_classes) for i in range(n_up))
        # after the block whose output has side cfg.attention (index i: side base * 2 ** (i + 1))
        self.attn_after = next((i for i in range(n_up) if base * 2 ** (i + 1) == cfg.attention), -1)
        self.attn = SelfAttention(widths[self.attn_after + 1], sn=False) if self.attn_after >= 0 else None
        self.out_bn = nn.BatchNorm2d(widths[-1])
        self.out_conv = BatchInvariantConv2d(widths[-1], cfg.channels, 3, padding=1)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], -1, self.base, self.base)  # (B, C0, base, base)
        for i, block in enumerate(self.blocks):
            h = block(h, y)
            if i == self.attn_after and self.attn is not None:
                h = self.attn(h)  # (B, C_i, side, side)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))  # (B, channels, R, R)


class DBlock(nn.Module):
    """Down-block: SN 3x3 conv then SN 4x4 stride-2 conv, LeakyReLU(0.1) after each (SNGAN's DCGAN D)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = spectral_norm(nn.Conv2d(c_in, c_out, 3, padding=1))
        self.conv2 = spectral_norm(nn.Conv2d(c_out, c_out, 4, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), 0.1)  # (B, c_out, H, W)
        return F.leaky_relu(self.conv2(h), 0.1)  # (B, c_out, H/2, W/2)


class Discriminator(nn.Module):
    """images (B, C, H, W) and labels (B,) -> logits (B,), with a projection term for the class."""

    def __init__(self, cfg: CGANConfig) -> None:
        super().__init__()
        _, n_down = LAYOUTS[cfg.resolution]
        widths = [cfg.channels] + [cfg.d_ch * 2 ** min(i, 3) for i in range(n_down)]
        self.blocks = nn.Sequential(*(DBlock(widths[i], widths[i + 1]) for i in range(n_down)))
        # after the block whose output has side cfg.attention (index i: side resolution / 2 ** (i + 1))
        self.attn_after = next((i for i in range(n_down) if cfg.resolution // 2 ** (i + 1) == cfg.attention), -1)
        self.attn = SelfAttention(widths[self.attn_after + 1], sn=True) if self.attn_after >= 0 else None
        self.final = spectral_norm(nn.Conv2d(widths[-1], 2 * widths[-1], 3, padding=1))
        self.linear = spectral_norm(nn.Linear(2 * widths[-1], 1))
        self.embed = spectral_norm(nn.Embedding(cfg.num_classes, 2 * widths[-1]))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> the pooled features (B, F) that the linear and projection heads read."""
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.attn_after and self.attn is not None:
                h = self.attn(h)  # (B, C_i, side, side)
        h = F.leaky_relu(self.final(h), 0.1)  # (B, C_last, base, base)
        return h.sum(dim=(2, 3))  # (B, C_last): global sum pooling

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.features(x)  # (B, F)
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)  # (B,)


def latents_for_seeds(seeds: list[int], z_dim: int) -> torch.Tensor:
    """One latent per seed, drawn on the CPU from its own generator: image i never depends on its batch.

    Returns a float32 tensor of shape (B, z_dim).
    """
    rows = [torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows) if rows else torch.empty(0, z_dim)
