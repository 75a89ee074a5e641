"""Training a class-conditional GAN: hinge loss, generator EMA, exact resume from safetensors checkpoints.

Checkpoints hold every tensor of training (G, D, EMA G, both Adam states, the data/noise RNG) in one
``checkpoint.safetensors`` with the step and optimiser hyper-parameters as JSON metadata: resuming continues the
same random stream, and nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import nn

from models import cgan
from models.augment import AugmentConfig, diff_augment, host_to_device
from models.checkpoint import read_checkpoint, restore, write_checkpoint
from models.data import LabelledImages
from models.errors import DatasetError, InvalidModelConfig
from models.events import RunEvents
from models.generator import WEIGHTS_FILE, load_weights, read_config, save_generator, to_uint8
from models.grid import class_grid, save_png

CHECKPOINT_FILE = "checkpoint.safetensors"
EXPORT_DIR = "export"
# Written beside an export's generator so a published model can be fine-tuned with its D (models.finetune);
# the generator loader ignores it.
DISCRIMINATOR_FILE = "discriminator.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Adam betas (0.5, 0.999) at 2e-4 for both nets: StudioGAN's DCGAN recipe, n_dis=1."""

    steps: int = 8000
    batch_size: int = 64
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    ema_decay: float = 0.999
    ema_start: int = 500  # before this step the EMA simply copies G: early weights are not worth averaging
    # StyleGAN2-ADA's EMA ramp-up: the EMA's half-life (in steps) is at most this fraction of the steps since
    # ema_start, so a short run averages recent weights, not its first ones. None: the fixed ema_decay.
    ema_rampup: float | None = None
    seed: int = 0
    sample_every: int = 500
    checkpoint_every: int = 500
    augment: tuple[str, ...] = ()  # DiffAugment policy (translation, cutout, color) on every batch D sees; p = 1
    bn_recalibration_batches: int = 50  # of 100 samples each, at every export (see recalibrate_bn)
    # Both learning rates decay linearly to 0 at the last step from this fraction of ``steps`` on; 1.0: constant.
    lr_decay_start: float = 1.0
    # Steps at the start that update D only: a fresh D meets a warm-started G (``train(init_from=...)``) and must
    # learn to judge it before G follows its gradients, or G's first updates follow a random critic.
    d_warmup_steps: int = 0
    eval_every: int = 0  # steps between calls of train()'s ``scorer`` on the export (and at the end); 0: never
    # D updates per G update (SNGAN's n_dis; BigGAN uses 2), each on a real batch of its own; ``steps`` counts G's.
    d_steps: int = 1
    # Weight of MSGAN's mode-seeking term (Mao et al., 2019) in G's loss: G's batch pairs two latents per class and
    # is rewarded for mapping them far apart, λ / (mean|G(z1,y) - G(z2,y)| / mean|z1 - z2| + ε). 0: off, and the
    # step draws exactly what it drew before the term existed.
    mode_seeking: float = 0.0
    # Weight of balanced consistency regularisation (bCR, Zhao et al. 2021) in D's loss: D's logits on each real and
    # fake batch and on the same batch shifted by up to 1/8 of the side are pulled together, λ * (mean (D(x) -
    # D(T(x)))² over the reals + the same over the fakes); 10 in the paper. Unlike DiffAugment, D is still trained
    # on the images themselves, and G's loss is untouched. 0: off, and the step draws exactly what it drew before.
    consistency: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.lr_decay_start <= 1.0:
            raise InvalidModelConfig(f"lr_decay_start must be in [0, 1], got {self.lr_decay_start}")
        if self.eval_every < 0:
            raise InvalidModelConfig(f"eval_every must be 0 or more, got {self.eval_every}")
        if self.d_warmup_steps < 0:
            raise InvalidModelConfig(f"d_warmup_steps must be 0 or more, got {self.d_warmup_steps}")
        if self.d_steps < 1:
            raise InvalidModelConfig(f"d_steps must be 1 or more (D updates per G update), got {self.d_steps}")
        if self.mode_seeking < 0:
            raise InvalidModelConfig(f"mode_seeking must be 0 or more (a loss weight), got {self.mode_seeking}")
        if self.consistency < 0:
            raise InvalidModelConfig(f"consistency must be 0 or more (a loss weight), got {self.consistency}")
        if self.consistency > 0 and self.augment:
            raise InvalidModelConfig(
                "consistency regularisation and augment both regularise D with shifted images: use one of them"
            )
        if self.mode_seeking > 0 and self.batch_size % 2:
            raise InvalidModelConfig(f"mode_seeking pairs G's batch: batch_size must be even, got {self.batch_size}")


@dataclass(frozen=True)
class StepStats:
    """What a progress display needs after each step."""

    step: int
    total: int
    d_loss: float
    g_loss: float
    steps_per_s: float
    augment_p: float | None = None  # augmentation probability after the step; None when training without


@dataclass(frozen=True)
class StepResult:
    """What one D + G update measured: both losses and the mean sign of D's logits on the (augmented) reals."""

    d_loss: float
    g_loss: float
    real_sign: float  # in [-1, 1]; ADA's overfitting heuristic r_t averages it


@dataclass
class TrainState:
    """Everything that changes during training; saved whole in a checkpoint."""

    g: cgan.Generator
    d: cgan.Discriminator
    ema: cgan.Generator
    opt_g: torch.optim.Adam
    opt_d: torch.optim.Adam
    rng: torch.Generator
    step: int = 0


def new_state(model_cfg: cgan.CGANConfig, cfg: TrainConfig) -> TrainState:
    """Fresh networks and optimisers, seeded from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    g, d = cgan.Generator(model_cfg), cgan.Discriminator(model_cfg)
    ema = copy.deepcopy(g).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return TrainState(
        g=g,
        d=d,
        ema=ema,
        opt_g=torch.optim.Adam(g.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2)),
        opt_d=torch.optim.Adam(d.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2)),
        rng=torch.Generator().manual_seed(cfg.seed),
    )


def lr_scale_at(step: int, cfg: TrainConfig) -> float:
    """The factor on both learning rates for the update that makes step ``step + 1``: 1, then linear to 0.

    From step ``lr_decay_start * steps`` on, the rate falls linearly so that the last update uses ``1 / n`` of it,
    n being the number of decaying steps; a function of the step alone, so resuming repeats it exactly.
    """
    start = int(cfg.lr_decay_start * cfg.steps)
    if step < start or cfg.steps <= start:
        return 1.0
    return (cfg.steps - step) / (cfg.steps - start)


def set_learning_rates(state: TrainState, cfg: TrainConfig) -> None:
    """Set both optimisers' learning rates for the next update from ``cfg`` and :func:`lr_scale_at`."""
    scale = lr_scale_at(state.step, cfg)
    for opt, lr in ((state.opt_g, cfg.lr_g), (state.opt_d, cfg.lr_d)):
        for group in opt.param_groups:
            group["lr"] = lr * scale


def ema_decay_at(step: int, cfg: TrainConfig) -> float:
    """The EMA decay after ``step`` steps: 0 (a copy) up to ``ema_start``, then ``ema_decay``, ramped if asked.

    With ``ema_rampup`` r the half-life is min(h, r * (step - ema_start)) steps, h being ``ema_decay``'s.
    """
    if step <= cfg.ema_start:
        return 0.0
    if cfg.ema_rampup is None or cfg.ema_decay <= 0.0:
        return cfg.ema_decay
    half_life = min(math.log(0.5) / math.log(cfg.ema_decay), cfg.ema_rampup * (step - cfg.ema_start))
    return 0.5 ** (1.0 / half_life)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Exponential moving average of parameters *and* BN buffers (running statistics)."""
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        if b.dtype.is_floating_point:
            b_ema.lerp_(b, 1.0 - decay)
        else:
            b_ema.copy_(b)


def train_step(
    state: TrainState,
    real: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    *,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, float]:
    """One D and one G update with the hinge loss; returns (d_loss, g_loss). See :func:`train_step_aug`."""
    result = train_step_aug(state, real, labels, cfg, augment=augment)
    return result.d_loss, result.g_loss


def train_step_aug(
    state: TrainState,
    real: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    *,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    update_g: bool = True,
    extra_d: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    shift: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> StepResult:
    """One D and one G update with the hinge loss, optionally augmenting every batch D sees (DiffAugment).

    Args:
        real: float images (B, C, H, W) in [-1, 1] on the networks' device; labels: (B,) class indices there.
        cfg: only ``ema_start``, ``ema_decay``, ``mode_seeking`` and ``consistency`` are read.
        augment: applied to the real and the fake batch right before each of the three D calls, a fresh random
            draw each call; it must be differentiable (G's gradient goes through it). None: no augmentation and
            no extra draws from ``state.rng``.
        update_g: False updates D only (G's loss is still measured, without a gradient): D's warm-up.
        extra_d: (real, labels) batches for D updates of their own before this step's (``TrainConfig.d_steps``
            - 1 of them), each against a fresh fake batch; () draws exactly what a single-D-step run draws.
        shift: the transform of ``cfg.consistency``'s term (a fresh random draw each call; the translation of
            :func:`_augmenter`); needed when that weight is above 0, unused otherwise.

    Returns:
        The losses and the mean sign of D(real), read back from the device together (one synchronisation).
    """
    aug = augment or (lambda x: x)
    if cfg.consistency > 0 and shift is None:
        raise ValueError("cfg.consistency > 0 needs the shift that its term compares with")
    cr = (shift, cfg.consistency) if cfg.consistency > 0 and shift is not None else None
    for extra_real, extra_labels in extra_d:
        with torch.no_grad():
            extra_fake, extra_y, _ = _fake_batch(state, extra_real.shape[0], extra_real.device)
        _d_update(state, aug, extra_real, extra_labels, extra_fake, extra_y, cr)
    paired = cfg.mode_seeking > 0
    fake, y_fake, z = _fake_batch(state, real.shape[0], real.device, paired=paired)  # (B, C, H, W), (B,), (B, z)
    d_loss, real_logits = _d_update(state, aug, real, labels, fake.detach(), y_fake, cr)

    if update_g:
        g_loss = -state.d(aug(fake), y_fake).mean()
        if paired:
            g_loss = g_loss + cfg.mode_seeking * mode_seeking_penalty(fake, z)
        state.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        state.opt_g.step()
    else:
        with torch.no_grad():
            g_loss = -state.d(aug(fake.detach()), y_fake).mean()

    state.step += 1
    update_ema(state.ema, state.g, ema_decay_at(state.step, cfg))
    measured = torch.stack([d_loss.detach(), g_loss.detach(), real_logits.detach().sign().mean()])  # (3,)
    d_value, g_value, sign = measured.tolist()
    return StepResult(d_value, g_value, sign)


def _fake_batch(
    state: TrainState, b: int, device: torch.device, paired: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G's images (B, C, H, W) for b random latents and classes drawn from ``state.rng``, those classes (B,) and
    latents (B, z_dim).

    paired: the second half of the batch repeats the first half's classes (for :func:`mode_seeking_penalty`);
    b must then be even (TrainConfig checks). False draws b classes, exactly as before pairing existed.
    """
    z = host_to_device(torch.randn(b, state.g.cfg.z_dim, generator=state.rng), device)  # (B, z_dim)
    if paired:
        half = torch.randint(0, state.g.cfg.num_classes, (b // 2,), generator=state.rng)  # (B/2,)
        y = host_to_device(torch.cat([half, half]), device)  # (B,)
    else:
        y = host_to_device(torch.randint(0, state.g.cfg.num_classes, (b,), generator=state.rng), device)  # (B,)
    return state.g(z, y), y, z


def mode_seeking_penalty(fake: torch.Tensor, z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """MSGAN's term for a batch whose halves share classes: 1 / (mean|Δimage| / mean|Δz| + eps), a scalar.

    Small when two latents of one class give far-apart images, large when G maps them to one mode.
    fake: (B, C, H, W); z: (B, z_dim); row i of the first half pairs with row i of the second.
    """
    half = fake.shape[0] // 2
    image_gap = (fake[:half] - fake[half:]).abs().mean()
    latent_gap = (z[:half] - z[half:]).abs().mean()
    return 1.0 / (image_gap / latent_gap + eps)


def _d_update(
    state: TrainState,
    aug: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    labels: torch.Tensor,
    fake: torch.Tensor,
    y_fake: torch.Tensor,
    consistency: tuple[Callable[[torch.Tensor], torch.Tensor], float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hinge-loss update of D on real and (detached) fake images, plus bCR's term when ``consistency`` (the
    shift, the weight) is given; returns the loss and D's logits on the reals."""
    real_logits = state.d(aug(real), labels)  # (B,)
    fake_logits = state.d(aug(fake), y_fake)  # (B,)
    d_loss = F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    if consistency is not None:
        shift, weight = consistency
        gap_real = (real_logits - state.d(shift(real), labels)).square().mean()
        gap_fake = (fake_logits - state.d(shift(fake), y_fake)).square().mean()
        d_loss = d_loss + weight * (gap_real + gap_fake)
    state.opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    state.opt_d.step()
    return d_loss, real_logits


@torch.no_grad()
def recalibrate_bn(net: cgan.Generator, batches: int = 50, batch_size: int = 100, seed: int = 0) -> None:
    """Recompute BN running statistics of ``net`` as a cumulative average over fresh samples ("standing stats").

    The EMA weights never produced the running statistics it carries; a few hundred forward passes in train mode
    with momentum=None give statistics that match the weights actually served.
    """
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    rng = torch.Generator().manual_seed(seed)
    device = net.fc.weight.device
    net.train()
    for _ in range(batches):
        z = torch.randn(batch_size, net.cfg.z_dim, generator=rng).to(device)
        y = torch.randint(0, net.cfg.num_classes, (batch_size,), generator=rng).to(device)
        net(z, y)
    net.eval()
    for m, momentum in zip(bns, saved, strict=True):
        m.momentum = momentum


def save_checkpoint(path: Path, state: TrainState, model_cfg: cgan.CGANConfig, cfg: TrainConfig) -> None:
    """Write the whole training state as safetensors (tensors) + JSON metadata (step, configs, param groups)."""
    write_state(path, state, {"model": model_cfg.to_json(), "train": asdict(cfg)})


def write_state(path: Path, state: TrainState, header: dict[str, Any]) -> None:
    """Write G, D, EMA G, both Adam states, the RNG and the step, with ``header`` (configs) as JSON metadata."""
    write_checkpoint(
        path,
        modules={"g": state.g, "d": state.d, "ema": state.ema},
        optimizers={"opt_g": state.opt_g, "opt_d": state.opt_d},
        rng=state.rng,
        header={"step": state.step, **header},
    )


def restore_state(state: TrainState, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint read by :func:`models.checkpoint.read_checkpoint` into a freshly built ``state``."""
    restore(
        header,
        tensors,
        modules={"g": state.g, "d": state.d, "ema": state.ema},
        optimizers={"opt_g": state.opt_g, "opt_d": state.opt_d},
        rng=state.rng,
    )
    state.step = int(header["step"])


def load_checkpoint(path: Path, cfg: TrainConfig) -> tuple[TrainState, cgan.CGANConfig]:
    """Rebuild a :class:`TrainState` saved by :func:`save_checkpoint`, strictly (every key must match)."""
    header, tensors = read_checkpoint(path)
    model_cfg = cgan.CGANConfig.from_json(header["model"])
    state = new_state(model_cfg, cfg)
    restore_state(state, header, tensors)
    return state, model_cfg


def warm_start(state: TrainState, model_cfg: cgan.CGANConfig, directory: Path) -> None:
    """Start G and its EMA from a published cGAN's weights (and D too where the export has one).

    The optimisers stay fresh. Raises InvalidModelConfig when ``directory`` holds another architecture or other
    dimensions than ``model_cfg``, WeightsError when its files are missing or do not match.
    """
    base = read_config(directory)
    if base.get("arch") != cgan.ARCH or cgan.CGANConfig.from_json(base) != model_cfg:
        raise InvalidModelConfig(f"{directory} is not a cgan with this configuration: {base}")
    load_weights(state.g, directory / WEIGHTS_FILE)
    state.ema.load_state_dict(state.g.state_dict())
    if (directory / DISCRIMINATOR_FILE).is_file():
        load_weights(state.d, directory / DISCRIMINATOR_FILE)


def export(state: TrainState, model_cfg: cgan.CGANConfig, directory: Path, bn_batches: int = 50) -> None:
    """Save the EMA generator, with recalibrated BN statistics, as a servable model directory.

    The discriminator goes beside it as ``discriminator.safetensors``: fine-tuning (models.finetune) resumes G
    and D, as StyleGAN2-ADA's transfer learning does.
    """
    net = copy.deepcopy(state.ema)
    recalibrate_bn(net, batches=bn_batches)
    save_generator(directory, model_cfg, net)
    save_model(state.d, str(directory / DISCRIMINATOR_FILE), metadata={"arch": model_cfg.arch})


def train(
    data: LabelledImages,
    out: Path,
    cfg: TrainConfig,
    model_cfg: cgan.CGANConfig | None = None,
    resume: bool = True,
    on_step: Callable[[StepStats], None] | None = None,
    on_log: Callable[[str], None] | None = None,
    init_from: Path | None = None,
    scorer: Callable[[Path], dict[str, float]] | None = None,
) -> TrainState:
    """Train (or resume training) a cGAN on ``data`` until ``cfg.steps``; write checkpoints, grids and an export.

    ``out`` receives ``checkpoint.safetensors``, ``samples/step-XXXXXX.png`` (one row per class) and
    ``export/`` (weights.safetensors + config.json, servable by :func:`models.generator.load_generator`).
    ``init_from``: a published cGAN folder whose G (and D, if exported) a fresh run starts from (its config is the
    model's; ``model_cfg`` is then ignored); a resumed run continues its checkpoint and ignores it.
    ``scorer``: scores an export folder (e.g. :func:`models.evaluate.reference_scores` of its generator) every
    ``cfg.eval_every`` steps and at the end. With ``tensorboard`` installed, ``out`` also gets TensorBoard event
    files (:mod:`models.events`): losses, learning rates, EMA decay and speed every step, the sample grids, scores.
    """
    log = on_log or (lambda _msg: None)
    if len(data) < cfg.batch_size:
        raise DatasetError(f"{len(data)} images is fewer than one batch of {cfg.batch_size}")
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT_FILE
    if resume and ckpt.exists():
        state, model_cfg = load_checkpoint(ckpt, cfg)
        log(f"resuming from step {state.step}: {cfg.steps - state.step} of {cfg.steps} steps remaining")
    elif init_from is not None:
        model_cfg = cgan.CGANConfig.from_json(read_config(init_from))
        state = new_state(model_cfg, cfg)
        warm_start(state, model_cfg, init_from)
        log(f"training from {init_from}'s weights: {cfg.steps} steps")
    else:
        model_cfg = model_cfg or cgan.CGANConfig(class_names=data.class_names)
        state = new_state(model_cfg, cfg)
        log(f"training from scratch: {cfg.steps} steps")
    if model_cfg.num_classes != len(data.class_names):
        raise DatasetError(f"model has {model_cfg.num_classes} classes, data has {len(data.class_names)}")
    state.g.train()
    state.d.train()
    augment = _augmenter(cfg.augment, state.rng)
    shift = _augmenter(("translation",), state.rng) if cfg.consistency > 0 else None
    # the first step this process logs: an earlier process's events from there on were redone after its checkpoint
    events = RunEvents.open(out, purge_step=state.step + 1 if state.step else None)
    try:
        _loop(data, out, cfg, model_cfg, state, augment, events, on_step, log, scorer, shift)
    finally:
        events.close()
    return state


def _loop(
    data: LabelledImages,
    out: Path,
    cfg: TrainConfig,
    model_cfg: cgan.CGANConfig,
    state: TrainState,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
    events: RunEvents,
    on_step: Callable[[StepStats], None] | None,
    log: Callable[[str], None],
    scorer: Callable[[Path], dict[str, float]] | None,
    shift: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """:func:`train`'s steps from ``state.step`` to ``cfg.steps``, with its grids, checkpoints, exports and events."""
    ckpt = out / CHECKPOINT_FILE
    grid_seeds = list(range(10))
    started, started_step = time.perf_counter(), state.step
    while state.step < cfg.steps:
        batches = [_real_batch(data, cfg.batch_size, state.rng) for _ in range(cfg.d_steps)]
        set_learning_rates(state, cfg)
        update_g = state.step >= cfg.d_warmup_steps
        real, labels = batches[-1]
        result = train_step_aug(
            state, real, labels, cfg, augment=augment, update_g=update_g, extra_d=batches[:-1], shift=shift
        )
        rate = (state.step - started_step) / max(time.perf_counter() - started, 1e-9)
        if on_step is not None:
            on_step(StepStats(state.step, cfg.steps, result.d_loss, result.g_loss, rate))
        lr = state.opt_g.param_groups[0]["lr"]
        events.scalars(state.step, step_scalars(state, cfg, result, rate))
        last = state.step == cfg.steps
        if state.step % cfg.sample_every == 0 or last:
            grid = class_grid(sample_grid_images(state.ema, model_cfg, grid_seeds), len(grid_seeds))
            save_png(grid, out / "samples" / f"step-{state.step:06d}.png")
            events.image(state.step, "samples", grid)
        evaluate_now = scorer is not None and cfg.eval_every > 0 and (state.step % cfg.eval_every == 0 or last)
        if state.step % cfg.checkpoint_every == 0 or last or evaluate_now:
            export(state, model_cfg, out / EXPORT_DIR, cfg.bn_recalibration_batches)
        if evaluate_now and scorer is not None:
            scores = scorer(out / EXPORT_DIR)
            events.scalars(state.step, {f"eval/{name}": value for name, value in scores.items()})
            log(f"step {state.step}/{cfg.steps}: " + " ".join(f"{k}={v:.4f}" for k, v in scores.items()))
        if state.step % cfg.checkpoint_every == 0 or last:
            events.flush()  # a checkpoint's step is where a resumed run's events pick up
            save_checkpoint(ckpt, state, model_cfg, cfg)
            log(
                f"step {state.step}/{cfg.steps}: d={result.d_loss:.3f} g={result.g_loss:.3f} "
                f"lr_g={lr:.2e} {rate:.2f} steps/s; checkpoint and export written"
            )


def _real_batch(data: LabelledImages, b: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """b training images (B, C, H, W) in [-1, 1] drawn with replacement from ``rng``, and their labels (B,)."""
    idx = torch.randint(0, len(data), (b,), generator=rng)
    return data.images[idx].float() / 127.5 - 1.0, data.labels[idx]


def step_scalars(state: TrainState, cfg: TrainConfig, result: StepResult, rate: float) -> dict[str, float | None]:
    """What TensorBoard plots after each step: both losses, D's sign on reals, both learning rates, EMA decay, speed."""
    return {
        "loss/d": result.d_loss,
        "loss/g": result.g_loss,
        "d/real_sign": result.real_sign,
        "lr/g": state.opt_g.param_groups[0]["lr"],
        "lr/d": state.opt_d.param_groups[0]["lr"],
        "ema/decay": ema_decay_at(state.step, cfg),
        "speed/steps_per_s": rate,
    }


@torch.no_grad()
def sample_grid_images(net: cgan.Generator, model_cfg: cgan.CGANConfig, seeds: list[int]) -> torch.Tensor:
    """uint8 images (num_classes * len(seeds), C, H, W), class-major: one row per class in a grid."""
    labels = [c for c in range(model_cfg.num_classes) for _ in seeds]
    z = cgan.latents_for_seeds(seeds * model_cfg.num_classes, model_cfg.z_dim).to(net.fc.weight.device)
    was_training = net.training
    net.eval()
    images = to_uint8(net(z, torch.tensor(labels, device=z.device))).cpu()
    net.train(was_training)
    return images


def _augmenter(policy: tuple[str, ...], rng: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """DiffAugment with every op on every image (p = 1), drawing from the training RNG (exact resume); None if off."""
    if not policy:
        return None
    AugmentConfig(policy=tuple(policy))  # refuses unknown operations, naming them
    return lambda x: diff_augment(x, tuple(policy), 1.0, rng)
