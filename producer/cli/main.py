"""The ``genq`` command: submit and watch jobs, run the embedded pipeline, train models, start workers.

Heavy imports (torch, Celery, the worker) happen inside the commands that need them, so ``import producer`` stays
light for backends that only use the client.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from producer.cli import exits, finetune, keys, models, training, worker
from producer.cli.views import summary
from producer.contract import GenerateRequest, JobStatus, JobView, OutputFormat
from producer.core.settings import dev_mode_problem
from producer.errors import GenqError
from producer.settings import ClientSettings

app = typer.Typer(
    help="genq: asynchronous image generation on Celery + Redis + S3.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # a traceback's locals would print settings: secrets and credentials
)
console = Console(stderr=True)


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Print the traceback of an error above its one-line message."),
) -> None:
    """genq: asynchronous image generation on Celery + Redis + S3.

    Exit codes: 0 done; 1 the job failed, or another error; 2 a bad request, option or setting; 3 Redis or S3
    could not be reached or refused genq (the message names the setting to check).
    """
    exits.set_debug(debug)


app.command("train")(training.train)
app.command("eval")(training.evaluate)
app.command("finetune")(finetune.finetune)
app.add_typer(keys.app, name="keys")
app.add_typer(models.app, name="model")
app.command("worker")(worker.worker)


def _parse_counts(spec: str) -> dict[str, int]:
    """'sneaker=3,bag=2' -> {'sneaker': 3, 'bag': 2}."""
    counts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        label, sep, number = part.partition("=")
        if not sep or not number.strip().lstrip("-").isdigit():
            raise typer.BadParameter(f"expected label=count, got {part!r}", param_hint="--counts")
        counts[label.strip()] = int(number)
    return counts


_RENDITION_HELP = (
    "A post-processed output of every sample, repeatable: NAME=WxH (or NAME=SIDE, a square) then "
    ",fit=contain|cover|pad ,background=#rrggbb ,resample=lanczos|bicubic|bilinear|nearest and "
    ",op=NAME[:PARAM=VALUE...] per enhancement step (autocontrast, unsharp_mask, contrast, sharpness); or the "
    "rendition as a JSON object. Stored as <index>-NAME.<ext>."
)


def _parse_rendition(spec: str) -> dict[str, Any]:
    """'square=1080x1080,fit=cover,op=unsharp_mask:radius=2' -> the rendition's fields (validated by the request)."""
    if spec.lstrip().startswith("{"):
        try:
            parsed = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--rendition") from exc
        if not isinstance(parsed, dict):
            raise typer.BadParameter("a JSON rendition is an object", param_hint="--rendition")
        return parsed
    head, *options = (part.strip() for part in spec.split(","))
    name, sep, box = head.partition("=")
    if not sep:
        raise typer.BadParameter(f"expected NAME=WxH or NAME=SIDE, got {head!r}", param_hint="--rendition")
    fields: dict[str, Any] = {"name": name.strip()}
    width, x, height = box.strip().lower().partition("x")
    if not x:
        fields["size"] = _side(width)
    else:
        fields |= {k: _side(v) for k, v in (("width", width), ("height", height)) if v}
    ops: list[dict[str, str]] = []
    for option in filter(None, options):
        key, sep, value = option.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected KEY=VALUE, got {option!r}", param_hint="--rendition")
        if key.strip() == "op":
            op_name, *params = value.split(":")
            op: dict[str, str] = {"op": op_name.strip()}
            for param in params:
                param_name, sep, param_value = param.partition("=")
                if not sep:
                    raise typer.BadParameter(f"expected PARAM=VALUE, got {param!r}", param_hint="--rendition")
                op[param_name.strip()] = param_value.strip()
            ops.append(op)
        else:
            fields[key.strip()] = value.strip()
    return fields | ({"ops": ops} if ops else {})


def _side(text: str) -> int | str:
    return int(text) if text.strip().isdecimal() else text  # anything else: the request names the field


def _build_request(**fields: Any) -> GenerateRequest:
    return exits.build(GenerateRequest, fields)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


@app.command()
def generate(
    model: str = typer.Option("fmnist-cgan", "--model", "-m", help="name, name@version or name:alias"),
    label: str | None = typer.Option(None, "--label", "-l", help="Class name or index."),
    count: int | None = typer.Option(None, "--count", "-n", help="Images of --label (default 1)."),
    counts: str | None = typer.Option(None, "--counts", help="Per-label counts: sneaker=3,bag=2"),
    per_class: int | None = typer.Option(
        None, "--per-class", help="This many images of every class (a balanced data set); instead of --label."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Job seed (random and recorded when absent)."),
    fmt: OutputFormat = typer.Option(OutputFormat.PNG, "--format", help="Output image format."),
    callback: str | None = typer.Option(None, "--callback", help="URL receiving signed webhook events."),
    metadata: str | None = typer.Option(None, "--metadata", help="JSON object echoed back in the job."),
    idempotency_key: str | None = typer.Option(None, "--idempotency-key"),
    priority: str = typer.Option("normal", "--priority", help="high, normal or low: which queue the job waits in."),
    output: str = typer.Option(
        "objects",
        "--output",
        help="objects (one object per image) or webdataset (one tar per shard: <index>.<ext> + <index>.json).",
    ),
    renditions: list[str] | None = typer.Option(None, "--rendition", "-r", help=_RENDITION_HELP),
    sheet: Path | None = typer.Option(
        None, "--sheet", help="Write the job's contact sheet (a captioned grid of its first outputs) to this file."
    ),
    provenance: str = typer.Option(
        "xmp",
        "--provenance",
        help="xmp (IPTC XMP and text fields; reruns byte-identical) or c2pa (also signed Content Credentials: the "
        "worker, or this process in embedded mode, needs GENQ_C2PA__* signing settings).",
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Embedded mode: write images here, no Redis/S3."),
    embedded: bool = typer.Option(False, "--embedded", help="Run in-process even if GENQ_REDIS__URL is set."),
    wait: bool = typer.Option(False, "--wait", help="Queue mode: follow the job to its end with a progress bar."),
    download: Path | None = typer.Option(
        None, "--download", help="Queue mode: download outputs here (implies --wait)."
    ),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds --wait waits before giving up."),
    as_json: bool = typer.Option(
        False, "--json", help="Queue mode: print the job's whole view as JSON instead of its id or its summary line."
    ),
) -> None:
    """Generate images: in-process into --out (no broker needed), or as a queued job through Redis.

    Queue mode prints the job id, or with --wait one line when it ends: id, status, images, manifest, time taken.
    """
    try:
        meta = json.loads(metadata) if metadata else None
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="--metadata") from exc
    request = _build_request(
        model=model,
        label=int(label) if label is not None and label.isdecimal() else label,
        count=count,
        counts=_parse_counts(counts) if counts else None,
        per_class=per_class,
        seed=seed,
        format=fmt,
        callback={"url": callback} if callback else None,
        metadata=meta,
        idempotency_key=idempotency_key,
        priority=priority,
        output=output,
        renditions=[_parse_rendition(spec) for spec in renditions] if renditions else None,
        provenance=provenance,
    )
    settings = exits.load(ClientSettings)
    with exits.reported(settings):
        if embedded or settings.redis.url is None:
            _generate_embedded(request, out or Path("./out"), sheet)
        else:
            if out is not None:
                console.print("[yellow]--out is for embedded mode; use --download DIR in queue mode[/]")
            follow = wait or download is not None or sheet is not None
            _generate_queued(request, settings, follow, download, timeout, as_json, sheet)


def _generate_embedded(request: GenerateRequest, out: Path, sheet: Path | None) -> None:
    from worker.embedded import run_embedded  # the CLI reaches into the worker only here, lazily
    from worker.settings import WorkerSettings

    with _progress() as progress:
        task = progress.add_task("generate", total=request.total_images)
        job, result = run_embedded(
            request,
            out,
            WorkerSettings(),
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    tars = len({o.key for o in result.outputs}) if request.output == "webdataset" else 0
    packed = f" in {tars} tar{'' if tars == 1 else 's'}" if tars else ""
    kinds = len(job.renditions or ())
    each = f" ({kinds} rendition{'' if kinds == 1 else 's'} each)" if kinds else ""
    signed = ", signed with Content Credentials," if job.provenance == "c2pa" else ""
    sheet_name = result.sheet_key
    console.print(
        f"[green]wrote {len(result.outputs)} images[/]{each}{packed}{signed} of {job.model_name}@{job.model_version} "
        f"(seed {job.seed}), {result.manifest_key}{' and ' + sheet_name if sheet_name else ''} to {out}/"
    )
    if sheet is not None:
        if sheet_name is None:
            console.print("[yellow]no contact sheet was made (a job of one image has none; or GENQ_SHEET_IMAGES=0)[/]")
        else:
            sheet.parent.mkdir(parents=True, exist_ok=True)
            sheet.write_bytes((out / sheet_name).read_bytes())
            console.print(f"contact sheet: {sheet}")


def _generate_queued(
    request: GenerateRequest,
    settings: ClientSettings,
    wait: bool,
    download: Path | None,
    timeout: float,
    as_json: bool,
    sheet: Path | None = None,
) -> None:
    from producer.client import Client

    client = Client(settings)
    view = client.submit(request)
    console.print(f"job [bold]{view.id}[/] queued ({view.model_version}, seed {view.seed})")
    if not wait:
        print(view.model_dump_json(indent=2) if as_json else view.id)
        return
    view = _follow(client, view.id, timeout)
    if download is not None and view.status is JobStatus.SUCCEEDED:
        paths = client.download(view, download)
        console.print(f"downloaded {len(paths)} files to {download}/")
    if sheet is not None and view.status is JobStatus.SUCCEEDED and view.sheet_key is not None:
        console.print(f"contact sheet: {client.download_sheet(view, sheet)}")
    _show(view, as_json)
    if view.status is not JobStatus.SUCCEEDED:
        raise typer.Exit(exits.FAILED)


def _show(view: JobView, as_json: bool) -> None:
    """The job a command followed, on stdout: its whole view as JSON, or one summary line."""
    print(view.model_dump_json(indent=2) if as_json else summary(view))


def _follow(client: Any, job_id: str, timeout: float) -> JobView:
    first: JobView = client.status(job_id)  # an unknown id or no Redis is said before a progress bar is drawn
    with _progress() as progress:
        task = progress.add_task(first.status.value, total=first.progress.total or None)

        def update(view: JobView) -> None:
            progress.update(
                task, description=view.status.value, completed=view.progress.done, total=view.progress.total or None
            )

        view: JobView = client.wait(job_id, timeout=timeout, on_update=update)
    if view.error is not None:
        console.print(f"[red]job {view.status.value}[/]: {view.error.type}: {view.error.message}")
    return view


@app.command()
def status(job_id: str) -> None:
    """Print a job's current view as JSON."""
    from producer.client import Client

    settings = exits.load(ClientSettings)
    with exits.reported(settings):
        print(Client(settings).status(job_id).model_dump_json(indent=2))


@app.command("wait")
def wait_cmd(
    job_id: str,
    timeout: float = typer.Option(600.0, "--timeout"),
    as_json: bool = typer.Option(False, "--json", help="Print the job's whole view as JSON instead of one line."),
) -> None:
    """Follow a job to its end with a progress bar, then print one line (id, status, images, manifest, time taken);
    exit 0 only if it succeeded."""
    from producer.client import Client

    settings = exits.load(ClientSettings)
    with exits.reported(settings):
        view = _follow(Client(settings), job_id, timeout)
    _show(view, as_json)
    raise typer.Exit(0 if view.status is JobStatus.SUCCEEDED else exits.FAILED)


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a queued or running job and print its view as JSON (exit 1 if it is unknown or already ended)."""
    from producer.client import Client

    settings = exits.load(ClientSettings)
    with exits.reported(settings):
        print(Client(settings).cancel(job_id).model_dump_json(indent=2))


@app.command("models")
def models_cmd() -> None:
    """List models, versions, aliases and classes (from Redis, or the local model folders in embedded mode)."""
    settings = exits.load(ClientSettings)
    if settings.redis.url is None:
        from worker.catalog.registry import ModelRegistry
        from worker.runtime import model_roots
        from worker.settings import WorkerSettings

        worker_settings = exits.load(WorkerSettings)
        catalog = ModelRegistry(model_roots(worker_settings), worker_settings.device).catalog()
    else:
        from producer.client import Client

        with exits.reported(settings):
            catalog = Client(settings).models()
    table = Table("model", "version", "aliases", "arch", "size", "metrics", "classes")
    for name, entry in sorted(catalog.items()):
        for version, info in sorted(entry.versions.items()):
            aliases = ", ".join(a for a, v in sorted(entry.aliases.items()) if v == version)
            size = f"{info.resolution}px x{info.channels}"
            scores = ", ".join(f"{k} {v:.3g}" for k, v in info.metrics.items())
            table.add_row(name, version, aliases, info.arch, size, scores, ", ".join(info.class_names))
    Console().print(table)


@app.command()
def api(
    host: str | None = typer.Option(None, "--host", help="Address to listen on (default GENQ_API__HOST, 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", min=0, max=65535, help="Port (default GENQ_API__PORT, 8000)."),
    loglevel: str = typer.Option("info", "--loglevel"),
) -> None:
    """Serve the HTTP API (uvicorn) on the configured Redis (GENQ_REDIS__URL)."""
    import uvicorn  # lazily: only this command serves HTTP

    from producer.api import create_app

    settings = exits.load(ClientSettings)
    problem = dev_mode_problem(settings, bind_host=host or settings.api.host)
    if problem is not None:  # the placeholder webhook secret is public: never serve it beyond this machine
        exits.fail(problem, exits.INVALID)
    try:
        application = create_app(settings)
    except GenqError as exc:
        exits.fail(str(exc), exits.INVALID, exc)
    uvicorn.run(
        application,
        host=host or settings.api.host,
        port=settings.api.port if port is None else port,
        log_level=loglevel.lower(),
    )
