"""Differentiable augmentation for data-efficient GAN training: DiffAugment with an ADA-style adaptive probability.

DiffAugment (Zhao et al. 2020) applies the same *kinds* of random, differentiable transforms to the real and the
fake batch right before every D call, so D never sees an un-augmented image and cannot memorise a small data set,
while G still gets gradients through the transform. ADA (Karras et al. 2020, StyleGAN2-ADA) applies each transform
to a sample only with probability ``p`` and tunes ``p`` from an overfitting heuristic: the mean sign of D's logits
on real images, ``r_t``, drifts towards 1 when D memorises the reals.

Ops (one random draw per sample and op, each op applied with probability ``p``):

- ``color``: brightness (add U(-0.5, 0.5)), saturation (scale the distance to the channel mean by U(0, 2); a
  no-op on 1-channel images) and contrast (scale the distance to the image mean by U(0.5, 1.5)): three ops.
- ``translation``: shift by up to 1/8 of the side in each direction, uncovered pixels zero (mid-grey in [-1, 1]).
- ``cutout``: a square of half the side at a random centre multiplied by 0, i.e. set to mid-grey in [-1, 1],
  as the reference implementation's mask does (not to -1, black).

Every random number comes from a caller's CPU ``torch.Generator`` (never the global RNG), so a run that saves that
generator in its checkpoint resumes exactly. The draws do not depend on ``p``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.config import JsonConfig
from models.errors import InvalidModelConfig

POLICIES = ("color", "translation", "cutout")
TRANSLATION_RATIO = 0.125  # largest shift, as a fraction of the side (DiffAugment's default)
CUTOUT_RATIO = 0.5  # side of the cut-out square, as a fraction of the image side


@dataclass(frozen=True)
class AugmentConfig(JsonConfig):
    """Which augmentations to apply, and whether their probability is fixed (p = 1) or adapted (ADA)."""

    policy: tuple[str, ...] = ()  # names from POLICIES, applied in this order; () = no augmentation
    ada_target: float | None = None  # None: fixed p = 1 (plain DiffAugment); e.g. 0.6: ADA from p = 0
    ada_interval: int = 4  # steps between two adjustments of p
    ada_kimg: float = 100.0  # p can move from 0 to 1 in ada_kimg * 1000 real images (StyleGAN2-ADA's speed)

    def __post_init__(self) -> None:
        unknown = [name for name in self.policy if name not in POLICIES]
        if unknown:
            raise InvalidModelConfig(
                f"unknown augmentation {', '.join(map(repr, unknown))} (known: {', '.join(POLICIES)})"
            )
        if len(set(self.policy)) != len(self.policy):
            raise InvalidModelConfig(f"augmentation policy names an op twice: {list(self.policy)}")
        if self.ada_target is not None:
            if not 0.0 < self.ada_target < 1.0:
                raise InvalidModelConfig(f"ada_target must be between 0 and 1 (e.g. 0.6), got {self.ada_target}")
            if not self.policy:
                raise InvalidModelConfig("ada_target is set but the augmentation policy is empty: name some ops")
        if self.ada_interval < 1:
            raise InvalidModelConfig(f"ada_interval must be at least 1 step, got {self.ada_interval}")
        if not self.ada_kimg > 0:
            raise InvalidModelConfig(f"ada_kimg must be positive, got {self.ada_kimg}")


class AdaController:
    """The augmentation probability ``p``: fixed at 1 without an ADA target, else adapted from D's real logits.

    Call :meth:`update` once per step with the mean sign of D's logits on the (augmented) real batch. Every
    ``ada_interval`` steps ``r_t`` (their mean over the interval) moves ``p`` by
    ``sign(r_t - target) * batch * interval / (ada_kimg * 1000)``, clamped to [0, 1].
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg
        self.p = 1.0 if cfg.ada_target is None else 0.0
        self._sign_sum = 0.0  # sum of the per-step mean signs since the last adjustment
        self._count = 0

    def update(self, real_sign: float, batch_size: int) -> float:
        """Record one step's mean sign of D(real) in [-1, 1]; returns ``p`` after any adjustment."""
        target = self.cfg.ada_target
        if target is None:
            return self.p
        self._sign_sum += real_sign
        self._count += 1
        if self._count >= self.cfg.ada_interval:
            r_t = self._sign_sum / self._count
            step = batch_size * self._count / (self.cfg.ada_kimg * 1000.0)
            if r_t != target:  # sign(r_t - target): D too sure of the reals -> more augmentation
                self.p = min(max(self.p + (step if r_t > target else -step), 0.0), 1.0)
            self._sign_sum, self._count = 0.0, 0
        return self.p

    def state(self) -> dict[str, float]:
        """Plain floats for a checkpoint header: ``p`` and the partly filled interval."""
        return {"p": self.p, "sign_sum": self._sign_sum, "count": float(self._count)}

    def load_state(self, state: dict[str, float]) -> None:
        """Restore what :meth:`state` returned."""
        self.p = float(state["p"])
        self._sign_sum = float(state["sign_sum"])
        self._count = int(state["count"])


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a CPU tensor to ``device`` without making the host wait for the device's queue to drain.

    Randomness is drawn on CPU generators (exact resume), so every step sends a few small tensors over; a plain
    ``.to("cuda")`` from pageable memory would synchronise each time.
    """
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def translate(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Shift each image by whole pixels, filling what is uncovered with 0.

    x: (B, C, H, W); shifts: int64 (B, 2) as (down, right), on ``x``'s device. Returns (B, C, H, W).
    """
    b, _, h, w = x.shape
    # one ring of zeros around the image; every source index outside the image is clamped onto it
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (B, H + 2, W + 2, C)
    rows = (torch.arange(h, device=x.device)[None, :] - shifts[:, 0:1] + 1).clamp(0, h + 1)  # (B, H): source rows
    cols = (torch.arange(w, device=x.device)[None, :] - shifts[:, 1:2] + 1).clamp(0, w + 1)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]  # (B, 1, 1)
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)


def cutout(x: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square per image (clipped at the borders).

    x: (B, C, H, W); corners: int64 (B, 2) on ``x``'s device, the (top, left) of each square, may lie outside the
    image. Returns (B, C, H, W).
    """
    _, _, h, w = x.shape
    rows = torch.arange(h, device=x.device)[None, :] - corners[:, 0:1]  # (B, H)
    cols = torch.arange(w, device=x.device)[None, :] - corners[:, 1:2]  # (B, W)
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]  # (B, H, W)
    return x * (~inside).to(x.dtype)[:, None]


# Each op draws its parameters for the whole batch, always (so the number of draws never depends on p), then
# transforms the samples whose entry in ``apply`` (CPU bool (B,)) is set; ``apply`` None means p = 0: no work.
_Op = Callable[[torch.Tensor, torch.Tensor | None, torch.Generator], torch.Tensor]


def _per_sample(u: torch.Tensor, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
    """Uniform draws ``u`` (B,) in [0, 1) mapped to [low, high) as (B, 1, 1, 1) on ``like``'s device and dtype."""
    return host_to_device((u * (high - low) + low).view(-1, 1, 1, 1), like.device).to(like.dtype)


def _where(apply: torch.Tensor, changed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``changed`` for the samples to augment, ``x`` itself (bit for bit) for the others."""
    return torch.where(host_to_device(apply.view(-1, 1, 1, 1), x.device), changed, x)


def _brightness(x: torch.Tensor, apply: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(x.shape[0], generator=generator)
    if apply is None:
        return x
    return _where(apply, x + _per_sample(u, -0.5, 0.5, x), x)


def _saturation(x: torch.Tensor, apply: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(x.shape[0], generator=generator)
    if apply is None or x.shape[1] == 1:  # grey images have no saturation
        return x
    mean = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    return _where(apply, (x - mean) * _per_sample(u, 0.0, 2.0, x) + mean, x)


def _contrast(x: torch.Tensor, apply: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(x.shape[0], generator=generator)
    if apply is None:
        return x
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return _where(apply, (x - mean) * _per_sample(u, 0.5, 1.5, x) + mean, x)


def _translation(x: torch.Tensor, apply: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    b, _, h, w = x.shape
    limit = torch.tensor([int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)])  # (2,)
    shifts = torch.floor(torch.rand(b, 2, generator=generator) * (2 * limit + 1)).long() - limit  # (B, 2)
    if apply is None:
        return x
    shifts[~apply] = 0
    return translate(x, host_to_device(shifts, x.device))


def _cutout(x: torch.Tensor, apply: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    b, _, h, w = x.shape
    size = int(min(h, w) * CUTOUT_RATIO + 0.5)
    # centres anywhere in the image (as in the reference), so a square may hang over the border
    centres = torch.floor(torch.rand(b, 2, generator=generator) * torch.tensor([h, w])).long()  # (B, 2)
    if apply is None:
        return x
    corners = centres - size // 2
    corners[~apply] = max(h, w)  # a sample left alone gets its square outside the image
    return cutout(x, host_to_device(corners, x.device), size)


_OPS: dict[str, tuple[_Op, ...]] = {
    "color": (_brightness, _saturation, _contrast),
    "translation": (_translation,),
    "cutout": (_cutout,),
}


def diff_augment(x: torch.Tensor, policy: tuple[str, ...], p: float, generator: torch.Generator) -> torch.Tensor:
    """Augment a batch differentiably: every sample gets every op of ``policy`` with probability ``p``.

    Args:
        x: float images (B, C, H, W) in [-1, 1], on any device; gradients flow back to it.
        policy: names from :data:`POLICIES`, applied in order.
        p: probability per sample and op; 1 is plain DiffAugment, 0 returns ``x`` itself.
        generator: a CPU generator, the only source of randomness; the number of draws depends on the policy and
            the batch size, never on ``p``.

    Returns:
        (B, C, H, W), same dtype and device as ``x``.

    Raises:
        InvalidModelConfig: a policy name is unknown.
    """
    unknown = [name for name in policy if name not in _OPS]
    if unknown:
        raise InvalidModelConfig(f"unknown augmentation {', '.join(map(repr, unknown))} (known: {', '.join(POLICIES)})")
    b = x.shape[0]
    for name in policy:
        for op in _OPS[name]:
            draw = torch.rand(b, generator=generator)  # (B,)
            x = op(x, draw < p if p > 0.0 else None, generator)
    return x
