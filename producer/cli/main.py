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

from producer.cli import exits, finetune, keys, models, training
from producer.contract import GenerateRequest, JobStatus, JobView, OutputFormat
from producer.core import constants
from producer.core.settings import dev_mode_problem
from producer.errors import GenqError
from producer.settings import ClientSettings

app = typer.Typer(help="genq: asynchronous image generation on Celery + Redis + S3.", no_args_is_help=True)
console = Console(stderr=True)


@app.callback()
def main() -> None:
    """genq: asynchronous image generation on Celery + Redis + S3."""


app.command("train")(training.train)
app.command("eval")(training.evaluate)
app.command("finetune")(finetune.finetune)
app.add_typer(keys.app, name="keys")
app.add_typer(models.app, name="model")


def _parse_counts(spec: str) -> dict[str, int]:
    """'sneaker=3,bag=2' -> {'sneaker': 3, 'bag': 2}."""
    counts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        label, sep, number = part.partition("=")
        if not sep or not number.strip().lstrip("-").isdigit():
            raise typer.BadParameter(f"expected label=count, got {part!r}", param_hint="--counts")
        counts[label.strip()] = int(number)
    return counts


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
    out: Path | None = typer.Option(None, "--out", "-o", help="Embedded mode: write images here, no Redis/S3."),
    embedded: bool = typer.Option(False, "--embedded", help="Run in-process even if GENQ_REDIS__URL is set."),
    wait: bool = typer.Option(False, "--wait", help="Queue mode: follow the job to its end with a progress bar."),
    download: Path | None = typer.Option(
        None, "--download", help="Queue mode: download outputs here (implies --wait)."
    ),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds --wait waits before giving up."),
) -> None:
    """Generate images: in-process into --out (no broker needed), or as a queued job through Redis."""
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
    )
    settings = ClientSettings()
    with exits.reported():
        if embedded or settings.redis.url is None:
            _generate_embedded(request, out or Path("./out"))
        else:
            if out is not None:
                console.print("[yellow]--out is for embedded mode; use --download DIR in queue mode[/]")
            _generate_queued(request, settings, wait or download is not None, download, timeout)


def _generate_embedded(request: GenerateRequest, out: Path) -> None:
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
    console.print(
        f"[green]wrote {len(result.outputs)} images[/] of {job.model_name}@{job.model_version} "
        f"(seed {job.seed}) and {result.manifest_key} to {out}/"
    )


def _generate_queued(
    request: GenerateRequest, settings: ClientSettings, wait: bool, download: Path | None, timeout: float
) -> None:
    from producer.client import Client

    client = Client(settings)
    view = client.submit(request)
    console.print(f"job [bold]{view.id}[/] queued ({view.model_version}, seed {view.seed})")
    if not wait:
        print(view.id)
        return
    view = _follow(client, view.id, timeout)
    if download is not None and view.status is JobStatus.SUCCEEDED:
        paths = client.download(view, download)
        console.print(f"downloaded {len(paths)} files to {download}/")
    print(view.model_dump_json(indent=2))
    if view.status is not JobStatus.SUCCEEDED:
        raise typer.Exit(1)


def _follow(client: Any, job_id: str, timeout: float) -> JobView:
    with _progress() as progress:
        task = progress.add_task("queued", total=None)

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

    with exits.reported():
        print(Client().status(job_id).model_dump_json(indent=2))


@app.command("wait")
def wait_cmd(job_id: str, timeout: float = typer.Option(600.0, "--timeout")) -> None:
    """Follow a job to its end with a progress bar; exit 0 only if it succeeded."""
    from producer.client import Client

    with exits.reported():
        view = _follow(Client(), job_id, timeout)
    print(view.model_dump_json(indent=2))
    raise typer.Exit(0 if view.status is JobStatus.SUCCEEDED else 1)


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a queued or running job and print its view as JSON (exit 1 if it is unknown or already ended)."""
    from producer.client import Client

    with exits.reported():
        print(Client().cancel(job_id).model_dump_json(indent=2))


@app.command("models")
def models_cmd() -> None:
    """List models, versions, aliases and classes (from Redis, or the local model folders in embedded mode)."""
    settings = ClientSettings()
    if settings.redis.url is None:
        from worker.catalog.registry import ModelRegistry
        from worker.runtime import model_roots
        from worker.settings import WorkerSettings

        worker_settings = WorkerSettings()
        catalog = ModelRegistry(model_roots(worker_settings), worker_settings.device).catalog()
    else:
        from producer.client import Client

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
def worker(
    queues: str = typer.Option(
        ",".join(constants.WORKER_QUEUES),
        "--queues",
        "-Q",
        help="Comma-separated queues to consume, served strictly in this order (first non-empty queue first); "
        "'-Q train' makes a fine-tuning worker (one job at a time). 'callbacks' among other queues is served by a "
        "callbacks worker this one starts beside itself (see --inline-callbacks).",
    ),
    concurrency: int | None = typer.Option(
        None,
        "--concurrency",
        "-c",
        min=1,
        help="Jobs run at once (default: 16 threads, whose samples share forward passes; prefork: one per core; "
        "-Q callbacks: GENQ_WEBHOOK__CONCURRENCY deliveries).",
    ),
    pool: str = typer.Option(
        "threads", "--pool", help="threads (default: one process, models loaded once), prefork or solo."
    ),
    loglevel: str = typer.Option("INFO", "--loglevel"),
    log_json: bool = typer.Option(False, "--log-json", help="One JSON object per log line, with job_id."),
    hostname: str | None = typer.Option(None, "--hostname", "-n"),
    inline_callbacks: bool = typer.Option(
        False,
        "--inline-callbacks",
        help="Deliver callbacks from this worker's own pool, before its jobs, instead of a callbacks worker "
        "process beside it: a slow receiver then holds job threads.",
    ),
    callbacks_concurrency: int | None = typer.Option(
        None,
        "--callbacks-concurrency",
        min=1,
        help="Delivery threads of the callbacks worker started beside this one (default GENQ_WEBHOOK__CONCURRENCY).",
    ),
    beside: int | None = typer.Option(None, "--beside", hidden=True, help="PID of the worker that started this one."),
) -> None:
    """Start a Celery worker on the configured Redis (GENQ_REDIS__URL).

    Given the callbacks queue and others (the default), it serves the others and starts a callbacks worker
    (``genq worker -Q callbacks``, threads pool, lower CPU priority) as a child process, started again if it dies
    and stopped with this one: deliveries never take a job's thread, and a receiver that hangs delays only its own
    events.
    """
    import os

    from producer.core.logs import configure_logging
    from worker.app import app as celery_app  # lazily: only this command needs the worker runtime
    from worker.app import settings_of

    if pool not in ("threads", "prefork", "solo"):
        raise typer.BadParameter("choose threads, prefork or solo", param_hint="--pool")
    if ClientSettings().redis.url is None:
        console.print("[red]error[/]: a worker needs Redis: set GENQ_REDIS__URL (e.g. redis://127.0.0.1:6379/0)")
        raise typer.Exit(2)
    configure_logging(loglevel, json_lines=log_json)
    settings = settings_of(celery_app)
    served = [q for q in (part.strip() for part in queues.split(",")) if q]
    callbacks_beside = constants.CALLBACK_QUEUE in served and len(served) > 1 and not inline_callbacks
    if callbacks_beside:
        served.remove(constants.CALLBACK_QUEUE)
    if concurrency is None:
        if served == [constants.TRAIN_QUEUE]:
            concurrency = 1  # a training worker: one fine-tune per GPU
        elif served == [constants.CALLBACK_QUEUE]:
            concurrency = callbacks_concurrency or settings.webhook.concurrency  # waiting on receivers, not cores
        else:
            concurrency = 16 if pool == "threads" else os.cpu_count() or 1
    if beside is not None:
        _serve_beside(beside)
    argv = [
        "worker",
        f"--queues={','.join(served)}",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--loglevel={loglevel}",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    if not callbacks_beside:
        celery_app.worker_main(argv=argv)
        return
    callbacks = _CallbacksProcess(
        _callbacks_argv(callbacks_concurrency or settings.webhook.concurrency, loglevel, log_json, hostname),
        _callbacks_env(settings.metrics_port),
    )
    callbacks.start()
    try:
        celery_app.worker_main(argv=argv)
    finally:
        # In-flight deliveries end within their attempt deadline; give them that and a margin.
        callbacks.stop(grace_s=settings.webhook.attempt_deadline_s + 15)


CALLBACKS_NICE = 10  # the callbacks worker beside a generation worker yields the CPU to it: deliveries can wait
CALLBACKS_RESTART_MAX_S = 30.0  # longest pause before starting a callbacks worker that keeps dying again


def _callbacks_argv(concurrency: int, loglevel: str, log_json: bool, hostname: str | None) -> list[str]:
    import os
    import sys

    name = "callbacks@%h"
    if hostname:
        node, at, host = hostname.partition("@")
        name = f"callbacks-{node}@{host}" if at else f"callbacks@{hostname}"
    argv = [sys.executable, "-m", "producer.cli", "worker", "-Q", constants.CALLBACK_QUEUE, "--pool", "threads"]
    argv += ["-c", str(concurrency), "--loglevel", loglevel, "--hostname", name, "--beside", str(os.getpid())]
    return [*argv, "--log-json"] if log_json else argv


def _callbacks_env(metrics_port: int | None) -> dict[str, str]:
    import os

    env = dict(os.environ)
    if metrics_port is not None:  # the port is this worker's: the callbacks worker serves its metrics on the next
        env["GENQ_METRICS_PORT"] = str(metrics_port + 1)
    return env


def _serve_beside(parent: int) -> None:
    """In a callbacks worker started by another worker: yield the CPU to it, and stop (warm) when it is gone."""
    import os
    import signal
    import threading
    import time

    os.nice(CALLBACKS_NICE)

    def watch() -> None:
        while os.getppid() == parent:  # a dead parent's children are adopted: the parent id changes
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)  # warm shutdown: deliveries in flight finish or hit their deadline

    threading.Thread(target=watch, name="genq-parent-watch", daemon=True).start()


class _CallbacksProcess:
    """The callbacks worker a generation worker runs beside itself: started again if it dies, stopped with it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        import subprocess
        import threading

        self._argv = argv
        self._env = env
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._run, name="genq-callbacks-process", daemon=True)

    def start(self) -> None:
        """Start the callbacks worker once this worker is ready (its catalogue published, its models loaded)."""
        from celery import signals

        # Connected from worker_init, after worker.tasks (imported before it) connected its own worker_ready
        # handler: the callbacks worker starts after "worker ready: models ..." is logged, so whoever waits for
        # that line waits for this worker, not for the callbacks worker.
        signals.worker_init.connect(self._on_init, weak=False)
        # A SIGTERM or Ctrl-C to this worker: stop the callbacks worker at once, so that both drain together.
        signals.worker_shutting_down.connect(self._shutting_down, weak=False)

    def _on_init(self, **_: Any) -> None:
        from celery import signals

        signals.worker_ready.connect(self._on_ready, weak=False)

    def _on_ready(self, **_: Any) -> None:
        self._thread.start()

    def stop(self, grace_s: float) -> None:
        """Stop the callbacks worker (warm: SIGTERM), and kill it if it is still running after ``grace_s``."""
        import subprocess

        proc = self._signal_stop()
        if proc is None:
            return
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def _shutting_down(self, **_: Any) -> None:
        self._signal_stop()

    def _signal_stop(self) -> Any:
        import signal

        with self._lock:
            self._stopping.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return proc

    def _run(self) -> None:
        import logging
        import subprocess
        import time

        log = logging.getLogger("genq.worker")
        pause = 1.0
        while True:
            with self._lock:
                if self._stopping.is_set():
                    return
                proc = self._proc = subprocess.Popen(self._argv, env=self._env)
            started = time.monotonic()
            code = proc.wait()
            if time.monotonic() - started > 60:
                pause = 1.0  # it had been running: not one that dies at start
            if self._stopping.wait(pause):  # this worker is stopping too (a signal to the whole process group)
                return
            log.error("the callbacks worker exited with %s; starting it again", code)
            pause = min(pause * 2, CALLBACKS_RESTART_MAX_S)


@app.command()
def api(
    host: str | None = typer.Option(None, "--host", help="Address to listen on (default GENQ_API__HOST, 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", min=0, max=65535, help="Port (default GENQ_API__PORT, 8000)."),
    loglevel: str = typer.Option("info", "--loglevel"),
) -> None:
    """Serve the HTTP API (uvicorn) on the configured Redis (GENQ_REDIS__URL)."""
    import uvicorn  # lazily: only this command serves HTTP

    from producer.api import create_app

    settings = ClientSettings()
    problem = dev_mode_problem(settings, bind_host=host or settings.api.host)
    if problem is not None:  # the placeholder webhook secret is public: never serve it beyond this machine
        console.print(f"[red]error[/]: {problem}")
        raise typer.Exit(2)
    try:
        application = create_app(settings)
    except GenqError as exc:
        console.print(f"[red]error[/]: {exc}")
        raise typer.Exit(2) from None
    uvicorn.run(
        application,
        host=host or settings.api.host,
        port=settings.api.port if port is None else port,
        log_level=loglevel.lower(),
    )
