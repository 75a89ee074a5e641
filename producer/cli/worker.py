"""``genq worker``: a Celery worker on the configured Redis, and the callbacks worker it starts beside itself.

Callback deliveries run in a process of their own by default, so a slow or hanging receiver never holds the threads
that run jobs. The worker runtime is imported inside the command: the rest of ``genq`` never loads it.

Before Celery starts, the command checks what a worker cannot run without and says what is wrong in one line: its
settings (a malformed webhook secret), Redis, and for a worker that stores outputs S3 and its bucket (created when
``GENQ_S3__CREATE_BUCKET`` says so).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from producer.cli import exits
from producer.core import constants
from producer.settings import ClientSettings

if TYPE_CHECKING:
    from worker.settings import WorkerSettings

console = Console(stderr=True)


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
    from worker.settings import WorkerSettings

    if pool not in ("threads", "prefork", "solo"):
        raise typer.BadParameter("choose threads, prefork or solo", param_hint="--pool")
    if exits.load(ClientSettings).redis.url is None:
        console.print("[red]error[/]: a worker needs Redis: set GENQ_REDIS__URL (e.g. redis://127.0.0.1:6379/0)")
        raise typer.Exit(2)
    checked = exits.load(WorkerSettings)  # worker.app builds them on import: a bad one is a line, not a traceback
    served = [q for q in (part.strip() for part in queues.split(",")) if q]
    if beside is None:  # a callbacks worker beside another: that one checked, and Celery waits out an outage
        check_services(checked, served)
        if set(served) - {constants.CALLBACK_QUEUE, constants.TRAIN_QUEUE}:  # it runs generate jobs
            say_signing(checked)

    from worker.app import app as celery_app  # lazily: only this command needs the worker runtime
    from worker.app import settings_of

    configure_logging(loglevel, json_lines=log_json)
    settings = settings_of(celery_app)
    for missing in unpaired_queues(served):
        console.print(f"[yellow]warning[/]: {missing}")
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


def check_services(settings: WorkerSettings, served: list[str]) -> None:
    """Fail in one line (exit 3, :mod:`producer.cli.exits`) unless Redis answers and, for a worker that stores
    outputs (any queue but ``callbacks``, S3 storage), the bucket exists at the S3 endpoint, or was just created
    (``GENQ_S3__CREATE_BUCKET``); a missing bucket it may not create exits 2, naming it and the setting, and so does
    development mode with real S3 (:func:`producer.core.settings.dev_mode_problem`, checked first).

    One try each, a few seconds at most: a worker that cannot reach them would only log retries.
    """
    import os

    import redis

    from producer.core.settings import dev_mode_problem

    if settings.storage == "s3":  # worker.tasks checks it again at worker_init, for `celery -A worker.app worker`
        problem = dev_mode_problem(settings, s3_endpoint=os.environ.get("AWS_ENDPOINT_URL", ""))
        if problem is not None:  # the placeholder webhook secret is public: never sign real outputs' callbacks
            exits.fail(f"refusing to start: {problem}", exits.INVALID)
    with exits.reported(settings):
        client = redis.Redis.from_url(settings.redis.url or "", socket_connect_timeout=5, socket_timeout=5)
        try:
            client.ping()
        finally:
            client.close()
        if settings.storage != "s3" or not set(served) - {constants.CALLBACK_QUEUE}:
            return
        from worker.settings import StorageRetrySettings
        from worker.storage.s3 import S3Storage

        storage = S3Storage(settings.s3.bucket, StorageRetrySettings(window_s=0), max_pool_connections=1)
        if storage.ensure_bucket(create=settings.s3.creates_bucket(storage.endpoint)):
            console.print(f"created bucket {settings.s3.bucket!r} at {storage.endpoint} (GENQ_S3__CREATE_BUCKET)")


def say_signing(settings: WorkerSettings) -> None:
    """Say in one line whether this worker signs Content Credentials (jobs with ``provenance: c2pa``); a key or chain
    that is set but does not load or sign stops the start (exit 2), saying why."""
    from worker.generate.credentials import ContentSigner, NoSigner, load_signer

    signer = load_signer(settings.c2pa)
    if isinstance(signer, ContentSigner):
        console.print(signer.describe())
    elif isinstance(signer, NoSigner) and settings.c2pa.configured:
        exits.fail(f"refusing to start: {signer.reason}", exits.INVALID)
    else:
        console.print("C2PA signing not configured: jobs asking for provenance c2pa fail (GENQ_C2PA__KEY_FILE)")


def unpaired_queues(served: list[str]) -> list[str]:
    """What a worker serving ``served`` leaves waiting: a generate priority's small queue without its bulk queue (or
    the reverse) serves only part of that priority's jobs."""
    problems = []
    for priority, small in constants.GENERATE_QUEUES.items():
        bulk = constants.GENERATE_BULK_QUEUES[priority]
        if (small in served) != (bulk in served):
            has, lacks = (small, bulk) if small in served else (bulk, small)
            what = "jobs of more than" if lacks == bulk else "jobs of at most"
            problems.append(
                f"-Q names {has!r} but not {lacks!r}: {priority} {what} {constants.SMALL_JOB_MAX_IMAGES} images "
                f"wait there for another worker (serve them in the order {small},{bulk})"
            )
    return problems


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
