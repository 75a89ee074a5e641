"""Training the class-conditional VAE: Bernoulli reconstruction + warmed-up beta * KL, exact resume from safetensors.

The run folder has the layout of :mod:`models.train`: ``checkpoint.safetensors`` (encoder, decoder, Adam state and
the data/noise RNG, with the step and configs as JSON metadata; nothing is unpickled), ``samples/step-XXXXXX.png``
(one row per class) and ``export/`` (the decoder, servable by :func:`models.generator.load_generator`).

Run it directly for a progress bar: ``python -m models.train_cvae --out runs/fmnist-cvae --steps 6000``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models import cvae
from models.checkpoint import read_checkpoint, restore, write_checkpoint
from models.data import LabelledImages
from models.errors import DatasetError, InvalidModelConfig, WeightsError
from models.generator import save_generator, to_uint8
from models.grid import class_grid, save_png
from models.train import CHECKPOINT_FILE, EXPORT_DIR, StepStats

SAMPLES_FILE = "samples.png"  # the export's own grid, one row per class


@dataclass(frozen=True)
class CVAETrainConfig:
    """Optimisation settings: plain Adam at 1e-3 (the usual VAE setting), KL weight warmed up linearly."""

    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    kl_beta: float = 1.0  # KL weight after warm-up; 1 is the true ELBO
    kl_warmup_steps: int = 1000  # the KL weight rises linearly from 0 to kl_beta over these steps
    seed: int = 0
    sample_every: int = 500
    checkpoint_every: int = 500


@dataclass
class CVAETrainState:
    """Everything that changes during training; saved whole in a checkpoint."""

    encoder: cvae.Encoder
    decoder: cvae.Decoder
    opt: torch.optim.Adam
    rng: torch.Generator
    step: int = 0


def new_state(model_cfg: cvae.CVAEConfig, cfg: CVAETrainConfig) -> CVAETrainState:
    """Fresh networks and optimiser, seeded from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    encoder, decoder = cvae.Encoder(model_cfg), cvae.Decoder(model_cfg)
    return CVAETrainState(
        encoder=encoder,
        decoder=decoder,
        opt=torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=cfg.lr),
        rng=torch.Generator().manual_seed(cfg.seed),
    )


def train_step(
    state: CVAETrainState, images: torch.Tensor, labels: torch.Tensor, cfg: CVAETrainConfig
) -> tuple[float, float]:
    """One Adam update on the warmed-up negative ELBO; returns (loss, KL), both in nats per image.

    images: float (B, C, H, W) in [0, 1]; labels: (B,) class indices.
    """
    weight = cvae.kl_weight(state.step, cfg.kl_beta, cfg.kl_warmup_steps)
    mu, logvar = state.encoder(images, labels)  # (B, z_dim) each
    z = cvae.reparameterise(mu, logvar, state.rng)  # (B, z_dim)
    recon = cvae.reconstruction_loss(state.decoder.logits(z, labels), images).mean()
    kl = cvae.kl_divergence(mu, logvar).mean()
    loss = recon + weight * kl
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    state.opt.step()
    state.step += 1
    return float(loss.detach()), float(kl.detach())


def save_checkpoint(path: Path, state: CVAETrainState, model_cfg: cvae.CVAEConfig, cfg: CVAETrainConfig) -> None:
    """Write the whole training state as safetensors (tensors) + JSON metadata (step, configs, param groups)."""
    write_checkpoint(
        path,
        modules={"encoder": state.encoder, "decoder": state.decoder},
        optimizers={"opt": state.opt},
        rng=state.rng,
        header={"step": state.step, "model": model_cfg.to_json(), "train": asdict(cfg)},
    )


def load_checkpoint(path: Path, cfg: CVAETrainConfig) -> tuple[CVAETrainState, cvae.CVAEConfig]:
    """Rebuild a :class:`CVAETrainState` saved by :func:`save_checkpoint`, strictly (every key must match).

    Raises:
        WeightsError: the file is unreadable, belongs to another architecture, or its tensors do not fit.
    """
    header, tensors = read_checkpoint(path)
    try:
        model_cfg = cvae.CVAEConfig.from_json(header["model"])
    except InvalidModelConfig as exc:
        raise WeightsError(f"{path} is not a cvae checkpoint ({exc}); train into a fresh --out folder") from exc
    state = new_state(model_cfg, cfg)
    try:
        restore(
            header,
            tensors,
            modules={"encoder": state.encoder, "decoder": state.decoder},
            optimizers={"opt": state.opt},
            rng=state.rng,
        )
    except (RuntimeError, ValueError, KeyError) as exc:
        raise WeightsError(f"checkpoint {path} does not match its own config: {exc}") from exc
    state.step = int(header["step"])
    return state, model_cfg


def sample_grid_images(decoder: cvae.Decoder, seeds: list[int]) -> torch.Tensor:
    """uint8 images (num_classes * len(seeds), C, H, W), class-major: one row per class in a grid."""
    num_classes = decoder.cfg.num_classes
    labels = [c for c in range(num_classes) for _ in seeds]
    return to_uint8(cvae.sample_images(decoder, labels, seeds * num_classes))


# The class-gaussian prior is fitted on at most this many training images (a 16-d Gaussian per class needs far
# fewer; more only costs encoder passes at every export).
PRIOR_FIT_IMAGES = 10_000


def export(
    state: CVAETrainState, model_cfg: cvae.CVAEConfig, directory: Path, grid_seeds: list[int], data: LabelledImages
) -> None:
    """Save the decoder as a servable model directory, with its sample grid as ``samples.png``; a class-gaussian
    prior is first fitted to the encoder's posteriors on (an evenly spaced subset of) ``data``."""
    if model_cfg.prior == "class-gaussian":
        every = max(1, len(data) // PRIOR_FIT_IMAGES)
        images, labels = data.images[::every].float() / 255.0, data.labels[::every]  # (N, C, H, W) in [0, 1]
        cvae.fit_class_prior(state.encoder, state.decoder, images, labels)
    save_generator(directory, model_cfg, state.decoder)
    save_png(class_grid(sample_grid_images(state.decoder, grid_seeds), len(grid_seeds)), directory / SAMPLES_FILE)


def train_cvae(
    data: LabelledImages,
    out: Path,
    cfg: CVAETrainConfig,
    model_cfg: cvae.CVAEConfig | None = None,
    resume: bool = True,
    on_step: Callable[[StepStats], None] | None = None,
    on_log: Callable[[str], None] | None = None,
) -> CVAETrainState:
    """Train (or resume training) a cVAE on ``data`` until ``cfg.steps``; write checkpoints, grids and an export.

    ``on_step`` gets :class:`models.train.StepStats` with ``g_loss`` = the loss optimised (reconstruction +
    warmed-up beta * KL) and ``d_loss`` = the KL term, both in nats per image. Without ``model_cfg`` the
    resolution and channels are read off the data.

    Raises:
        DatasetError: fewer images than one batch, or images / classes that do not fit the model.
        WeightsError: ``out`` holds a checkpoint that cannot be resumed.
    """
    log = on_log or (lambda _msg: None)
    if len(data) < cfg.batch_size:
        raise DatasetError(f"{len(data)} images is fewer than one batch of {cfg.batch_size}")
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT_FILE
    if resume and ckpt.exists():
        state, model_cfg = load_checkpoint(ckpt, cfg)
        log(f"resuming from step {state.step}: {cfg.steps - state.step} of {cfg.steps} steps remaining")
    else:
        _, c, _, r = data.images.shape
        model_cfg = model_cfg or cvae.CVAEConfig(class_names=data.class_names, resolution=r, channels=c)
        state = new_state(model_cfg, cfg)
        log(f"training from scratch: {cfg.steps} steps")
    if model_cfg.num_classes != len(data.class_names):
        raise DatasetError(f"model has {model_cfg.num_classes} classes, data has {len(data.class_names)}")
    expected = (model_cfg.channels, model_cfg.resolution, model_cfg.resolution)
    if tuple(data.images.shape[1:]) != expected:
        raise DatasetError(f"images are {tuple(data.images.shape[1:])} but the model makes (C, H, W) = {expected}")
    state.encoder.train()
    state.decoder.train()
    grid_seeds = list(range(10))
    started, started_step = time.perf_counter(), state.step
    while state.step < cfg.steps:
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=state.rng)
        images = data.images[idx].float() / 255.0  # (B, C, H, W) in [0, 1]
        loss, kl = train_step(state, images, data.labels[idx], cfg)
        if on_step is not None:
            rate = (state.step - started_step) / max(time.perf_counter() - started, 1e-9)
            on_step(StepStats(state.step, cfg.steps, d_loss=kl, g_loss=loss, steps_per_s=rate))
        last = state.step == cfg.steps
        if state.step % cfg.sample_every == 0 or last:
            grid = class_grid(sample_grid_images(state.decoder, grid_seeds), len(grid_seeds))
            save_png(grid, out / "samples" / f"step-{state.step:06d}.png")
        if state.step % cfg.checkpoint_every == 0 or last:
            save_checkpoint(ckpt, state, model_cfg, cfg)
            export(state, model_cfg, out / EXPORT_DIR, grid_seeds, data)
    return state


def main(argv: list[str] | None = None) -> None:
    """``python -m models.train_cvae``: train on the Fashion-MNIST train split with a progress bar."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from models.data import load_fashion_mnist

    defaults = CVAETrainConfig()
    parser = argparse.ArgumentParser(prog="python -m models.train_cvae", description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, sample grids, export/")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--kl-beta", type=float, default=defaults.kl_beta)
    parser.add_argument("--kl-warmup-steps", type=int, default=defaults.kl_warmup_steps)
    parser.add_argument("--width", type=int, default=cvae.CVAEConfig.width, help="conv width at full resolution")
    parser.add_argument("--z-dim", type=int, default=cvae.CVAEConfig.z_dim)
    parser.add_argument(
        "--prior", choices=cvae.PRIORS, default="class-gaussian", help="where served samples draw z (docs/models.md)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--sample-every", type=int, default=defaults.sample_every)
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-resume", action="store_true", help="ignore out/checkpoint.safetensors")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_fashion_mnist("train")
    model_cfg = cvae.CVAEConfig(class_names=data.class_names, width=args.width, z_dim=args.z_dim, prior=args.prior)
    cfg = CVAETrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        kl_beta=args.kl_beta,
        kl_warmup_steps=args.kl_warmup_steps,
        seed=args.seed,
        sample_every=args.sample_every,
        checkpoint_every=args.checkpoint_every,
    )
    columns = (
        TextColumn("[bold]train cvae[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss={task.fields[loss]:.1f} kl={task.fields[kl]:.1f} {task.fields[rate]:.2f} it/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("train", total=cfg.steps, loss=0.0, kl=0.0, rate=0.0)

        def on_step(s: StepStats) -> None:
            progress.update(task, completed=s.step, loss=s.g_loss, kl=s.d_loss, rate=s.steps_per_s)

        train_cvae(data, args.out, cfg, model_cfg, resume=not args.no_resume, on_step=on_step, on_log=progress.print)
    print(f"exported decoder to {args.out / EXPORT_DIR}")


if __name__ == "__main__":
    main()
