"""``genq keys``: create, list and revoke the HTTP API's keys (``producer.api.auth``), in the configured Redis; and
make webhook signing secrets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from producer.cli import exits
from producer.settings import ClientSettings

if TYPE_CHECKING:
    from producer.api.auth import KeyStore

console = Console(stderr=True)

app = typer.Typer(help="API keys of the HTTP API, and webhook signing secrets.", no_args_is_help=True)


@app.command("create")
def keys_create(
    tenant: str = typer.Option(..., "--tenant", help="Tenant the key acts for: it owns the jobs made with it."),
    name: str = typer.Option("", "--name", help="A note for humans (who or what uses the key)."),
    max_queued: int | None = typer.Option(None, "--max-queued", min=1, help="Jobs queued or running at once."),
    images_per_day: int | None = typer.Option(None, "--images-per-day", min=1, help="Images per UTC day."),
    max_priority: str | None = typer.Option(
        None, "--max-priority", help="Highest priority its jobs may ask for: low, normal (the default) or high."
    ),
    train_images_per_day: int | None = typer.Option(
        None, "--train-images-per-day", min=1, help="Training images (fine-tune steps x batch size) per UTC day."
    ),
    max_finetunes: int | None = typer.Option(None, "--max-finetunes", min=1, help="Fine-tunes queued or running."),
    dataset_bytes: int | None = typer.Option(
        None, "--dataset-bytes", min=1, help="Bytes of uploaded data sets stored at once (expired ones free theirs)."
    ),
    provenance: str | None = typer.Option(
        None, "--provenance", help="c2pa: every job of the key carries signed Content Credentials."
    ),
) -> None:
    """Create an API key and print it once (only its sha256 is stored)."""
    from pydantic import ValidationError

    from producer.api.auth import KeyQuotas
    from producer.core.callbacks.secrets import TenantSecrets

    with _key_store() as store:
        try:
            quotas = KeyQuotas.model_validate(
                {
                    "max_queued": max_queued,
                    "images_per_day": images_per_day,
                    "max_priority": max_priority,
                    "train_images_per_day": train_images_per_day,
                    "max_finetunes": max_finetunes,
                    "dataset_bytes": dataset_bytes,
                    "provenance": provenance,
                }
            )
            secret, record = store.create(tenant, name, quotas)
        except ValidationError as exc:
            for err in exc.errors():
                console.print(f"[red]invalid[/]: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}")
            raise typer.Exit(2) from None
        console.print(f"API key for tenant [bold]{record.tenant}[/]; it is shown only now, store it safely:")
        print(secret)
        webhook = TenantSecrets(store.redis).ensure(record.tenant)
    if webhook is not None:  # the tenant's first key: its callbacks are signed with a secret of its own
        console.print(
            f"webhook signing secret of tenant [bold]{record.tenant}[/] (verify its callbacks with it; shown only "
            f"now, rotate with `genq keys rotate-webhook-secret`): {webhook}"
        )


@app.command("list")
def keys_list(
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant's keys."),
) -> None:
    """List API keys, revoked ones too: id prefix, tenant, name, created, quotas (never a secret)."""
    with _key_store() as store:
        keys = store.list(tenant)
    if not keys:
        console.print(f"no API keys{f' for tenant {tenant!r}' if tenant else ''} (create one with `genq keys create`)")
        return
    table = Table("key id", "tenant", "name", "created (UTC)", "quotas", "revoked (UTC)")
    for stored in keys:
        record = stored.key
        quotas = ", ".join(f"{name} {value}" for name, value in record.quotas.model_dump().items() if value is not None)
        revoked = f"[red]{_utc_minute(record.revoked_at)}[/]" if record.revoked_at else ""
        table.add_row(
            stored.short_id,
            record.tenant,
            escape(record.name),  # a name is free text: "[red]" in it is not markup
            _utc_minute(record.created_at),
            quotas or "defaults",
            revoked,
        )
    Console().print(table)


@app.command("revoke")
def keys_revoke(
    key_id: str = typer.Argument(..., help="The key's id, or its first characters (at least 6; `genq keys list`)."),
) -> None:
    """Revoke an API key: the API refuses it (401) from its next request on; `genq keys list` still shows it."""
    from producer.errors import KeyNotFound

    with _key_store() as store:
        try:
            stored, revoked = store.revoke(key_id)
        except ValueError as exc:
            console.print(f"[red]invalid[/]: {escape(str(exc))}")
            raise typer.Exit(2) from None
        except KeyNotFound as exc:
            console.print(f"[red]error[/]: {escape(str(exc))}")  # it may quote key names
            raise typer.Exit(1) from None
    what = f"API key {stored.short_id} (tenant {stored.key.tenant}, {escape(repr(stored.key.name))})"
    if revoked:
        console.print(f"{what} revoked; requests with it are refused from now on")
    else:
        console.print(f"{what} was already revoked at {_utc_minute(stored.key.revoked_at)} UTC")


@app.command("rotate-webhook-secret")
def keys_rotate_webhook_secret(
    tenant: str = typer.Option(..., "--tenant", help="The tenant whose callbacks the new secret signs."),
    overlap_hours: float = typer.Option(
        24.0, "--overlap-hours", min=0, help="How long the old secret keeps signing too (both signatures are sent)."
    ),
) -> None:
    """Give a tenant a new webhook signing secret and print it once; the old one signs alongside for the overlap."""
    from datetime import timedelta

    from producer.core.callbacks.secrets import TenantSecrets

    with _key_store() as store:
        if not store.list(tenant):
            console.print(
                f"[red]error[/]: no API key of tenant {escape(repr(tenant))} (create one with `genq keys create`)"
            )
            raise typer.Exit(1)
        rotated = TenantSecrets(store.redis).rotate(tenant, timedelta(hours=overlap_hours))
    until = f"; the old one signs too until {_utc_minute(rotated.previous_until)} UTC" if rotated.previous_until else ""
    console.print(f"new webhook signing secret of tenant [bold]{escape(tenant)}[/], shown only now{until}:")
    print(rotated.current)


@app.command("webhook-secret")
def keys_webhook_secret() -> None:
    """Print a new webhook signing secret for GENQ_WEBHOOK__SECRET: 'whsec_' + base64 of 32 random bytes (Standard
    Webhooks). Nothing is stored; give the same value to every worker and to your callback receivers."""
    from producer.webhooks import generate_secret

    print(generate_secret())


@contextmanager
def _key_store() -> Iterator[KeyStore]:
    """The API key store on the configured Redis, errors reported in one line (:func:`exits.reported`); exits 2
    without Redis."""
    import redis

    from producer.api.auth import KeyStore

    settings = exits.load(ClientSettings)
    if settings.redis.url is None:
        console.print("[red]error[/]: API keys live in Redis: set GENQ_REDIS__URL")
        raise typer.Exit(2)
    with exits.reported(settings):
        yield KeyStore(redis.Redis.from_url(settings.redis.url))


def _utc_minute(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
