"""``genq finetune``: upload a data set, queue a fine-tune, and follow it to the published model version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from producer.cli import exits
from producer.contract import FineTuneRequest, JobStatus, JobView
from producer.settings import ClientSettings

console = Console(stderr=True)


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value is not None else None


def finetune(
    base: str = typer.Option("fmnist-cgan", "--base", help="cGAN to start from: name, name@version or name:alias."),
    data: Path = typer.Option(
        ..., "--data", help="Folder with one sub-folder of images per class, or a .zip/.tar.gz/.npz archive."
    ),
    name: str = typer.Option(..., "--name", help="Model name to publish the new version under."),
    classes: str | None = typer.Option(
        None, "--classes", help="Class names in label order, comma-separated (default: the sub-folders, sorted)."
    ),
    steps: int = typer.Option(
        FineTuneRequest.model_fields["steps"].default, "--steps", min=1, help="Optimisation steps (batch draws)."
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=2),
    lr_g: float = typer.Option(2e-4, "--lr-g"),
    lr_d: float = typer.Option(2e-4, "--lr-d"),
    augment: str = typer.Option(
        "translation,cutout", "--augment", help="DiffAugment policy: translation, cutout, color ('' for none)."
    ),
    ada_target: float | None = typer.Option(None, "--ada-target", help="Adapt augmentation strength (ADA), e.g. 0.6."),
    freeze_d: int = typer.Option(0, "--freeze-d", min=0, help="Discriminator blocks kept frozen (FreezeD)."),
    eval_every: int | None = typer.Option(None, "--eval-every", min=1, help="Steps between evaluations."),
    sample_every: int = typer.Option(200, "--sample-every", min=1),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", min=1),
    gate_label_consistency: float | None = typer.Option(
        None, "--gate-label-consistency", help="Promote to 'production' only at this label consistency or more."
    ),
    gate_max_fid: float | None = typer.Option(None, "--gate-max-fid", help="... and at this FID or less."),
    seed: int | None = typer.Option(None, "--seed"),
    callback: str | None = typer.Option(None, "--callback", help="URL receiving signed webhook events."),
    wait: bool = typer.Option(False, "--wait", help="Follow the job: steps, losses, ETA, then the published version."),
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds --wait waits (default: no limit)."),
) -> None:
    """Fine-tune a cGAN on your own images and publish it as a new model version (queue mode: Redis + S3)."""
    from producer.client import Client

    settings = exits.load(ClientSettings)
    if settings.redis.url is None:
        console.print("[red]error[/]: fine-tuning runs on training workers: set GENQ_REDIS__URL (and S3 settings)")
        raise typer.Exit(2)
    gate: dict[str, Any] | None = None
    if gate_label_consistency is not None or gate_max_fid is not None:
        gate = {"min_label_consistency": gate_label_consistency, "max_fid": gate_max_fid}
    fields: dict[str, Any] = {
        "base": base,
        "dataset": "pending/",  # replaced by the upload's reference below; validated now so errors come first
        "name": name,
        "classes": _split(classes),
        "steps": steps,
        "batch_size": batch_size,
        "lr_g": lr_g,
        "lr_d": lr_d,
        "augment": {"policy": _split(augment) or [], "ada_target": ada_target},
        "freeze_d": freeze_d,
        "eval_every": eval_every,
        "sample_every": sample_every,
        "checkpoint_every": checkpoint_every,
        "gate": gate,
        "seed": seed,
        "callback": {"url": callback} if callback else None,
    }
    request = exits.build(FineTuneRequest, fields)
    with exits.reported(settings):
        client = Client(settings)
        upload = _upload(client, data)
        view = client.submit_finetune(request.model_copy(update={"dataset": upload.dataset}))
        console.print(f"queued fine-tune [bold]{view.id}[/] of {base} on {upload.files} files -> {name}")
        if wait:
            view = _follow(client, view.id, timeout)
    print(view.model_dump_json(indent=2, exclude_none=True))
    if wait and view.status is not JobStatus.SUCCEEDED:
        raise typer.Exit(1)


def _upload(client: Any, data: Path) -> Any:
    columns = (
        TextColumn("[bold]upload[/]"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("upload", total=None)
        return client.upload_dataset(
            data, on_progress=lambda done, total: progress.update(task, completed=done, total=total)
        )


def _follow(client: Any, job_id: str, timeout: float | None) -> JobView:
    columns = (
        TextColumn("[bold]fine-tune[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[losses]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    grids: set[str] = set()
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=None, losses="")

        def update(view: JobView) -> None:
            t = view.training
            if t is None:
                progress.update(task, description=view.status.value)
                return
            losses = f"d={t.d_loss:.3f} g={t.g_loss:.3f} {t.steps_per_s or 0:.2f} it/s" if t.d_loss is not None else ""
            progress.update(task, completed=t.step, total=t.total_steps, losses=losses)
            if t.samples_key and t.samples_key not in grids:
                grids.add(t.samples_key)
                progress.console.print(f"samples at step {t.step}: {t.samples_url or t.samples_key}")

        view: JobView = client.wait(job_id, timeout=timeout, poll_s=1.0, on_update=update)
    if view.status is JobStatus.SUCCEEDED and view.training is not None and view.training.model:
        t = view.training
        console.print(
            f"[green]published[/] {t.model} (aliases: {', '.join(t.aliases)}); metrics: "
            + ", ".join(f"{k}={v:.3f}" for k, v in t.metrics.items())
        )
        console.print(f"try: genq generate --model {t.model} --label {next(iter(t.dataset), '0')} --wait")
    elif view.error is not None:
        console.print(f"[red]{view.status.value}[/]: {view.error.type}: {view.error.message}")
    return view
