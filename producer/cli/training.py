"""``genq train`` and ``genq eval``: the model side of the command line. torch is imported inside each command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# Soft wrap: a log line or a path longer than the terminal (80 columns when stderr is a file) stays one line, so a
# run's log can be read back with grep and a printed path copied whole.
console = Console(stderr=True, soft_wrap=True)


def train(
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoint, sample grids, export/."),
    arch: str = typer.Option("cgan", "--arch", help="Architecture: cgan or cvae."),
    data: str = typer.Option(
        "fashion-mnist",
        "--data",
        help="fashion-mnist, a folder with one sub-folder of images per class (ImageFolder), or an .npz file.",
    ),
    resolution: int = typer.Option(28, "--resolution", help="Folder/.npz data: side in pixels (28, 32 or 64)."),
    channels: int = typer.Option(1, "--channels", help="Folder/.npz data: 1 (grey) or 3 (RGB)."),
    augment: str = typer.Option(
        "", "--augment", help="cgan: DiffAugment policy for small data sets, e.g. translation,cutout,color."
    ),
    classes: str | None = typer.Option(
        None, "--classes", help="Train on these classes only: comma-separated names or indices (e.g. 0,1,2,3,4)."
    ),
    steps: int = typer.Option(8000, "--steps", min=1, help="Total optimisation steps (resume counts toward it)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    g_ch: int = typer.Option(32, "--g-ch", min=4, help="cgan: generator width at the output resolution."),
    d_ch: int = typer.Option(32, "--d-ch", min=4, help="cgan: discriminator width at the input resolution."),
    attention: int = typer.Option(
        0, "--attention", min=0, help="cgan: side (px) of the feature maps given a self-attention block; 0: none."
    ),
    width: int = typer.Option(32, "--width", min=1, help="cvae: conv width at full resolution."),
    z_dim: int = typer.Option(16, "--z-dim", min=1, help="cvae: latent size."),
    kl_beta: float = typer.Option(1.0, "--kl-beta", min=0.0, help="cvae: weight of the KL term."),
    kl_warmup_steps: int = typer.Option(500, "--kl-warmup-steps", min=0, help="cvae: steps of linear KL warm-up."),
    prior: str = typer.Option(
        "class-gaussian",
        "--prior",
        help="cvae: where served samples draw z: class-gaussian (fitted to the encoder after training) or standard.",
    ),
    init_from: str | None = typer.Option(
        None,
        "--init-from",
        help="cgan: start G (and D, if exported) from this published model or folder; its widths are kept.",
    ),
    lr: float = typer.Option(2e-4, "--lr", min=0.0, help="cgan: Adam learning rate of G and D."),
    lr_decay_start: float = typer.Option(
        1.0, "--lr-decay-start", min=0.0, max=1.0, help="cgan: fraction of --steps after which lr decays linearly to 0."
    ),
    d_warmup_steps: int = typer.Option(
        0, "--d-warmup-steps", min=0, help="cgan: first steps update D only (a fresh D for a --init-from G)."
    ),
    ema_decay: float = typer.Option(0.999, "--ema-decay", min=0.0, max=0.99999, help="cgan: EMA decay of G."),
    d_steps: int = typer.Option(
        1, "--d-steps", min=1, help="cgan: D updates per G update, each on its own real batch (--steps counts G's)."
    ),
    mode_seeking: float = typer.Option(
        0.0,
        "--mode-seeking",
        min=0.0,
        help="cgan: weight of MSGAN's mode-seeking term, which rewards G for mapping two latents of one class to "
        "different images (variety; 1 in the paper); 0: off.",
    ),
    consistency: float = typer.Option(
        0.0,
        "--consistency",
        min=0.0,
        help="cgan: weight of balanced consistency regularisation (bCR): D's logits on each batch and on it shifted "
        "by up to 1/8 of the side are pulled together (10 in the paper); not with --augment; 0: off.",
    ),
    seed: int = typer.Option(0, "--seed"),
    sample_every: int = typer.Option(500, "--sample-every", min=1),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", min=1),
    eval_every: int = typer.Option(
        0,
        "--eval-every",
        min=0,
        help="cgan: steps between quick scores (label consistency, FID; 100 images a class vs the training data) "
        "in the log and TensorBoard; 0: none.",
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads (1 is fastest on a busy CPU)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from out/checkpoint.safetensors."),
) -> None:
    """Train a generator; progress shows step, losses, it/s and ETA; grids, checkpoints and export/ land in --out."""
    import torch
    from rich.progress import TimeRemainingColumn

    from models import cgan, cvae
    from models import train as training
    from models import train_cvae as training_cvae
    from models.augment import AugmentConfig
    from models.data import select_classes
    from models.errors import DatasetError, InvalidModelConfig

    if arch not in (cgan.ARCH, cvae.ARCH):
        raise typer.BadParameter(f"unknown architecture {arch!r} (known: cgan, cvae)", param_hint="--arch")
    if prior not in cvae.PRIORS:
        raise typer.BadParameter(f"unknown prior {prior!r} (known: {', '.join(cvae.PRIORS)})", param_hint="--prior")
    if init_from is not None and arch != cgan.ARCH:
        raise typer.BadParameter("only a cgan can start from a published model", param_hint="--init-from")
    if consistency > 0 and augment.strip():
        raise typer.BadParameter(
            "consistency regularisation and --augment both regularise D with shifted images: use one of them",
            param_hint="--consistency",
        )
    if mode_seeking > 0 and batch_size % 2:
        raise typer.BadParameter(
            f"mode seeking pairs G's batch: batch_size must be even, got {batch_size}", param_hint="--batch-size"
        )
    base_dir = _model_dir(init_from)[0] if init_from is not None else None
    if threads is not None:
        torch.set_num_threads(threads)
    dataset = _load_training_data(data, resolution, channels)
    policy = tuple(a.strip() for a in augment.split(",") if a.strip())
    try:
        AugmentConfig(policy=policy)
    except InvalidModelConfig as exc:
        raise typer.BadParameter(str(exc), param_hint="--augment") from None
    side = int(dataset.images.shape[-1])
    if attention and attention not in cgan.attention_sides(side):
        sides = ", ".join(map(str, cgan.attention_sides(side)))
        raise typer.BadParameter(
            f"no {attention} px feature maps at {side} px (choose {sides})", param_hint="--attention"
        )
    if classes is not None:
        try:
            dataset = select_classes(dataset, [c.strip() for c in classes.split(",") if c.strip()])
        except DatasetError as exc:
            raise typer.BadParameter(str(exc), param_hint="--classes") from None
    losses = (
        "d={task.fields[d]:.3f} g={task.fields[g]:.3f}"
        if arch == cgan.ARCH
        else "loss={task.fields[g]:.1f} kl={task.fields[d]:.1f}"
    )
    columns = (
        TextColumn(f"[bold]train {arch}[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn(losses + " {task.fields[rate]:.2f} it/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=steps, d=0.0, g=0.0, rate=0.0)

        def on_step(s: training.StepStats) -> None:
            progress.update(task, completed=s.step, d=s.d_loss, g=s.g_loss, rate=s.steps_per_s)

        log = progress.console.print
        if arch == cgan.ARCH:
            model_cfg = cgan.CGANConfig(
                class_names=dataset.class_names,
                resolution=int(dataset.images.shape[-1]),
                channels=int(dataset.images.shape[1]),
                g_ch=g_ch,
                d_ch=d_ch,
                attention=attention,
            )
            cfg = training.TrainConfig(
                augment=policy,
                steps=steps,
                batch_size=batch_size,
                lr_g=lr,
                lr_d=lr,
                ema_decay=ema_decay,
                lr_decay_start=lr_decay_start,
                d_warmup_steps=d_warmup_steps,
                d_steps=d_steps,
                mode_seeking=mode_seeking,
                consistency=consistency,
                seed=seed,
                sample_every=sample_every,
                checkpoint_every=checkpoint_every,
                eval_every=eval_every,
            )
            training.train(
                dataset,
                out,
                cfg,
                model_cfg,
                resume=resume,
                on_step=on_step,
                on_log=log,
                init_from=base_dir,
                scorer=_quick_scorer(dataset, seed) if eval_every else None,
            )
        else:
            vae_cfg = cvae.CVAEConfig(
                class_names=dataset.class_names,
                resolution=int(dataset.images.shape[-1]),
                channels=int(dataset.images.shape[1]),
                width=width,
                z_dim=z_dim,
                prior=prior,
            )
            vae_train = training_cvae.CVAETrainConfig(
                steps=steps,
                batch_size=batch_size,
                kl_beta=kl_beta,
                kl_warmup_steps=kl_warmup_steps,
                seed=seed,
                sample_every=sample_every,
                checkpoint_every=checkpoint_every,
            )
            training_cvae.train_cvae(dataset, out, vae_train, vae_cfg, resume=resume, on_step=on_step, on_log=log)
    console.print(f"exported generator to {out / training.EXPORT_DIR}")


def _quick_scorer(dataset: Any, seed: int) -> Any:
    """Scores of an export folder against the training images: what a fine-tune measures (reference_scores)."""
    from models.classifier import load_classifier
    from models.evaluate import reference_scores
    from models.generator import load_generator

    classifier, _card = load_classifier()

    def score(directory: Path) -> dict[str, float]:
        return reference_scores(load_generator(directory), dataset, classifier, 100, seed)

    return score


def _load_training_data(data: str, resolution: int, channels: int) -> Any:
    """Fashion-MNIST by name, or a folder / .npz read at ``resolution`` x ``channels`` (skipped files reported)."""
    from models.data import load_fashion_mnist
    from models.datasets import load_image_folder, load_npz
    from models.errors import DatasetError

    if data == "fashion-mnist":
        return load_fashion_mnist("train")
    path = Path(data)
    try:
        if path.is_dir():
            dataset, report = load_image_folder(path, resolution=resolution, channels=channels)
        elif path.suffix == ".npz" and path.is_file():
            dataset, report = load_npz(path, resolution=resolution, channels=channels)
        else:
            raise DatasetError(f"{data} is not fashion-mnist, a folder or an .npz file")
    except DatasetError as exc:
        raise typer.BadParameter(str(exc), param_hint="--data") from None
    console.print(report.summary())
    return dataset


def evaluate(
    model: str = typer.Argument(..., help="name, name@version or name:alias of a local model, or a model folder"),
    json_file: Path | None = typer.Option(None, "--json", help="Also write the report as JSON here."),
    n_per_class: int = typer.Option(1000, "--n-per-class", min=10, help="Generated images per class."),
    cas_epochs: int = typer.Option(10, "--cas-epochs", min=1, help="Epochs of the classifier trained for CAS."),
    seed: int = typer.Option(0, "--seed"),
    quick: bool = typer.Option(False, "--quick", help="Tiny counts: checks the wiring in seconds, not quality."),
) -> None:
    """Score a generator offline: label consistency, FID/KID, precision/recall/density/coverage, CAS, per-class FID.

    Features come from the in-domain Fashion-MNIST classifier shipped in models/zoo/_metrics (no downloads);
    each score is printed beside its real-vs-real reference.
    """
    from models.classifier import load_classifier
    from models.data import load_fashion_mnist
    from models.evaluate import QUICK_CAS_EPOCHS, QUICK_N_PER_CLASS, format_report
    from models.evaluate import evaluate as run_evaluation
    from models.generator import load_generator

    directory, name = _model_dir(model)
    generator = load_generator(directory)
    classifier, card = load_classifier()
    columns = (TextColumn("[bold]{task.description:<14}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("eval", total=None)
        report = run_evaluation(
            generator,
            classifier=classifier,
            real_train=load_fashion_mnist("train"),
            real_test=load_fashion_mnist("test"),
            n_per_class=QUICK_N_PER_CLASS if quick else n_per_class,
            seed=seed,
            cas_epochs=QUICK_CAS_EPOCHS if quick else cas_epochs,
            model_name=name,
            extractor_name=card.name,
            on_progress=lambda stage, done, total: progress.update(
                task, description=stage, completed=done, total=total
            ),
        )
    print(format_report(report))
    if json_file is not None:
        json_file.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        console.print(f"wrote {json_file}")


def _model_dir(model: str) -> tuple[Path, str]:
    """A model folder and a display name, from a folder path or a reference resolved in the local model roots."""
    path = Path(model)
    if path.is_dir():
        return path, str(path)
    from producer.contract import ModelRef
    from worker.catalog.registry import ModelRegistry
    from worker.runtime import model_roots
    from worker.settings import WorkerSettings

    try:
        ref = ModelRef.parse(model)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="MODEL") from None
    settings = WorkerSettings()
    registry = ModelRegistry(model_roots(settings), settings.device)
    entry = registry.catalog().get(ref.name)
    if entry is None:
        known = ", ".join(sorted(registry.catalog())) or "none"
        raise typer.BadParameter(f"unknown model {ref.name!r} (known: {known})", param_hint="MODEL")
    try:
        version = entry.resolve(ref)
    except KeyError as exc:
        raise typer.BadParameter(str(exc.args[0]), param_hint="MODEL") from None
    return registry.path(ref.name, version), f"{ref.name}@{version}"
