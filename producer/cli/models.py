"""``genq model``: the operator's hand on system models (Redis + S3, no HTTP API, no tenant).

System models are the ones every tenant sees and none may change: the shipped zoo, ``GENQ_MODEL_DIRS`` and what
operators publish here. A tenant's fine-tunes are its own models and never land here. torch and the worker are
imported inside the command.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from producer.cli import exits

console = Console(stderr=True)

app = typer.Typer(help="System models: publish (operators; Redis + S3).", no_args_is_help=True)


@app.callback()
def main() -> None:
    """System models (shipped and operator-published, read-only to tenants): publish new versions."""


@app.command("publish")
def publish(
    folder: Path = typer.Argument(
        ...,
        exists=True,
        file_okay=False,
        help="An exported model: config.json + weights.safetensors (e.g. a `genq train` run's export/).",
    ),
    name: str = typer.Option(..., "--name", help="System model to publish FOLDER as the next version of."),
    alias: list[str] = typer.Option(  # noqa: B008 - typer reads its options from the defaults
        [], "--alias", help="Also move this alias to the new version (repeatable), e.g. --alias production."
    ),
) -> None:
    """Publish FOLDER as the next version of the system model NAME; `latest` and each --alias move to it.

    Every tenant sees the new version at once (the catalogue in Redis is refreshed); none can publish over it or
    move its aliases. Prints name@version on stdout.
    """
    from producer.contract import ModelRef

    try:
        ref = ModelRef.parse(name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--name") from None
    if ref.version is not None or ref.alias is not None:
        raise typer.BadParameter("give the model's name alone (the version is the next one)", param_hint="--name")
    for each in alias:
        try:
            ModelRef.parse(f"{ref.name}:{each}")
        except ValueError:
            raise typer.BadParameter(f"invalid alias {each!r}", param_hint="--alias") from None

    import redis

    from worker.runtime import make_registry
    from worker.settings import WorkerSettings

    settings = exits.load(WorkerSettings)
    if settings.redis.url is None:
        console.print("[red]error[/]: publishing takes a version number from Redis: set GENQ_REDIS__URL")
        raise typer.Exit(2)
    client = redis.Redis.from_url(settings.redis.url)
    with exits.reported(settings):
        _, store, registry = make_registry(settings)
        try:
            version, aliases = store.publish_folder(client, ref.name, folder, alias)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="FOLDER") from None
        registry.refresh(client)  # clients validate against the catalogue: announce the version now
    moved = ", ".join(sorted(a for a, v in aliases.items() if v == version))
    console.print(f"[green]published[/] system model {ref.name}@{version} (aliases: {moved})")
    print(f"{ref.name}@{version}")
