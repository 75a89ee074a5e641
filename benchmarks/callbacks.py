"""Callbacks against generation: 1-image jobs/s without callbacks, and with a receiver that answers 200 at once, one
that fails three times before 200, and one that hangs; then the CPU one delivery costs with a new HTTP client per
attempt (what genq did before) and with the delivery thread's reused one.

    python -m benchmarks.callbacks [--jobs 120] [--rounds 3] [-c 16] [--inline-callbacks] [--redis URL]
                                   [--scenarios none,ok,failing,hanging]

Each round submits ``--jobs`` 1-image jobs of the shipped fmnist-cgan at once (every event: ``queued``, ``running`` and
``succeeded``, 3 per job; a 1-image job's only chunk has no ``progress`` event of its own; scenario ``ok_terminal``
subscribes the healthy receiver to the terminal events only, ``callback.events``: 1 per job) and measures
jobs/s from the first job's creation to the last one's end, from the job records. Starts its own moto S3 server,
the receivers (HTTP/1.1 on loopback, in a process of their own at nice 10: they stand in for receivers on other
machines) and one `genq worker -c 16` (which delivers callbacks from a callbacks worker of its own, unless
--inline-callbacks); claims the Redis DB of --redis (flushed; refused while a test run holds it). The hanging rounds
run last: their deliveries stay in flight (cut off at GENQ_WEBHOOK__ATTEMPT_DEADLINE_S) and deferred after them.
Prints one table, then one ``name=value`` line per figure. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import boto3
import httpx

from benchmarks.uploads import claimed_db
from producer.client import Client
from producer.contract import EventType, GenerateRequest, JobStatus, JobView, Progress, WebhookEvent
from producer.core.callbacks.send import WebhookClient, deliver
from producer.core.settings import DEV_WEBHOOK_SECRET, RedisSettings, S3Settings, WebhookSettings
from producer.settings import ClientSettings

# Pinned: docs/benchmarks.md's figures are of this network's widths (versions 1 and 2; 3 costs 3x per image).
MODEL = "fmnist-cgan@2"
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
HANG_S = 30.0  # the hanging receiver answers after this long (as in issue 17)
SCHEDULE = [0, 0.5, 0.5, 0.5]  # four attempts, half a second apart: the failing receiver's events all get through
EVENTS_PER_JOB = 3  # queued, running, succeeded
TERMINAL = ["succeeded", "failed", "canceled"]  # ok_terminal's subscription: a job's end only, 1 event per job


class Receiver:
    """An HTTP/1.1 receiver on loopback: ``ok`` answers 200 at once, ``failing`` 500 to the first three attempts of
    each event (by ``webhook-id``) then 200, ``hanging`` 200 after :data:`HANG_S`."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.attempts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def status_for(self, msg_id: str) -> int:
        with self.lock:
            self.attempts[msg_id] += 1
            seen = self.attempts[msg_id]
        if self.mode == "failing" and seen <= 3:
            return 500
        if self.mode == "hanging":
            time.sleep(HANG_S)
        return 200


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            status = receiver.status_for(self.headers.get("webhook-id", ""))
            try:
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()
            except OSError:
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def _serve_receivers(urls: Connection) -> None:
    # A process of its own, at a lower CPU priority: it stands in for receivers on other machines, so it takes
    # neither this process's interpreter lock (which moto's S3 server needs) nor the cores the worker needs.
    os.nice(10)
    receivers = {mode: Receiver(mode) for mode in ("ok", "failing", "hanging")}
    urls.send({mode: receiver.url for mode, receiver in receivers.items()})
    threading.Event().wait()


@contextmanager
def receivers() -> Iterator[dict[str, str]]:
    """The three receivers in a process of their own; yields their URLs by mode."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_serve_receivers, args=(theirs,), daemon=True)
    process.start()
    try:
        yield ours.recv()
    finally:
        process.terminate()
        process.join(10)


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def worker(env: dict[str, str], concurrency: int, inline: bool) -> Iterator[tuple[int, int | None]]:
    """`genq worker` with default queues, ready; yields (its pid, its callbacks worker's pid or None)."""
    log = tempfile.NamedTemporaryFile(prefix="genq-bench-callbacks-", suffix=".log", delete=False)  # noqa: SIM115
    argv = [sys.executable, "-m", "producer.cli", "worker", "-c", str(concurrency)]
    proc = subprocess.Popen(argv + (["--inline-callbacks"] if inline else []), env=env, stdout=log, stderr=log)
    ready = "worker ready: models" if inline else "worker ready: callbacks only"
    try:
        deadline = time.monotonic() + 180
        while ready not in Path(log.name).read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start; see {log.name}")
            time.sleep(0.2)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        yield proc.pid, int(children[0]) if children else None
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_round(client: Client, jobs: int, url: str | None, events: list[str] | None = None) -> tuple[float, list[str]]:
    """Submit ``jobs`` 1-image jobs at once, their callbacks (if ``url``) subscribed to ``events`` (default: all);
    (jobs/s from the first's creation to the last's end, their ids)."""
    callback = None if url is None else {"url": url, **({"events": events} if events else {})}
    ids = []
    for i in range(jobs):
        request = {"model": MODEL, "label": "sneaker", "count": 1, "seed": i, "callback": callback}
        ids.append(client.submit(GenerateRequest.model_validate(request)).id)
    views = [client.wait(job_id, timeout=300, poll_s=0.05) for job_id in ids]
    bad = [v for v in views if v.status is not JobStatus.SUCCEEDED]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs did not succeed, e.g. {bad[0].status.value}: {bad[0].error}")
    first = min(v.created_at for v in views)
    last = max(v.finished_at or datetime.now(UTC) for v in views)
    return jobs / (last - first).total_seconds(), ids


def delivery_state(client: Client, ids: list[str]) -> dict[str, int]:
    """Events delivered, dead-lettered, and neither yet, over the jobs' delivery records."""
    delivered = dead = attempted = 0
    for job_id in ids:
        by_event: dict[str, list[dict[str, Any]]] = {}
        for record in client.deliveries(job_id):
            by_event.setdefault(record["msg_id"], []).append(record)
        attempted += len(by_event)
        delivered += sum(any(r["ok"] for r in rs) for rs in by_event.values())
        dead += sum(any(r["dead_lettered"] for r in rs) for rs in by_event.values())
    return {"delivered": delivered, "dead_lettered": dead, "attempted": attempted}


def settle(client: Client, ids: list[str], events: int, timeout: float) -> tuple[dict[str, int], float]:
    """Wait (up to ``timeout``) for every event to be delivered or dead-lettered; (the state, seconds waited)."""
    started = time.monotonic()
    while True:
        state = delivery_state(client, ids)
        if state["delivered"] + state["dead_lettered"] >= events or time.monotonic() - started > timeout:
            return state, time.monotonic() - started
        time.sleep(0.25)


def delivery_cpu_ms(url: str, n: int) -> dict[str, float]:
    """CPU ms of the delivering thread per delivery to a loopback receiver: a new httpx client per attempt (as
    genq did), a new WebhookClient per attempt (the process's TLS context shared), and one reused client."""
    view = JobView(
        id="bench",
        status=JobStatus.SUCCEEDED,
        model=MODEL.partition("@")[0],
        model_version="1",
        seed=1,
        progress=Progress(done=1, total=1),
        created_at=datetime.now(UTC),
    )
    event = WebhookEvent(type=EventType.SUCCEEDED, timestamp=datetime.now(UTC), data=view)
    options: dict[str, Any] = {"secret": DEV_WEBHOOK_SECRET, "msg_id": "msg_bench", "timeout_s": 5.0}

    def old_way() -> None:  # the client genq built for every attempt before (CA bundle loaded each time)
        with httpx.Client(follow_redirects=False) as http:
            http.post(url, content=event.model_dump_json().encode()).raise_for_status()

    def measure(attempt: Any) -> float:
        attempt()  # warm-up
        started = time.thread_time()
        for _ in range(n):
            attempt()
        return 1000 * (time.thread_time() - started) / n

    with WebhookClient() as reused:
        return {
            "new_httpx_client": measure(old_way),
            "new_webhook_client": measure(lambda: deliver(url, event, **options)),
            "reused_client": measure(lambda: deliver(url, event, client=reused, **options)),
        }


SCENARIOS = (
    "none",
    "ok",
    "ok_terminal",
    "failing",
    "hanging",
)  # --scenarios; "hanging" brings its own rounds without callbacks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each scenario (medians are reported)")
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    parser.add_argument("--inline-callbacks", action="store_true", help="callbacks from the generation pool")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14", help="a Redis DB this benchmark may flush")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of {', '.join(SCENARIOS)} (none always runs: the base of every ratio)",
    )
    args = parser.parse_args()
    wanted = {"none", *(name.strip() for name in args.scenarios.split(",") if name.strip())}
    if unknown := wanted - set(SCENARIOS):
        parser.error(f"--scenarios: unknown {', '.join(sorted(unknown))} (choose from {', '.join(SCENARIOS)})")

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint, bucket = f"http://{host}:{port}", "bench"
    os.environ.update(AWS, AWS_ENDPOINT_URL=endpoint)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    allow = ["127.0.0.1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(
        GENQ_REDIS__URL=args.redis,
        GENQ_S3__BUCKET=bucket,
        GENQ_WEBHOOK__ALLOW_HOSTS=json.dumps(allow),
        GENQ_WEBHOOK__RETRY_SCHEDULE_S=json.dumps(SCHEDULE),
    )
    settings = ClientSettings(
        redis=RedisSettings(url=args.redis), s3=S3Settings(bucket=bucket), webhook=WebhookSettings(allow_hosts=allow)
    )
    client = Client(settings)
    events = {name: EVENTS_PER_JOB * args.jobs for name in SCENARIOS} | {"ok_terminal": args.jobs}
    # "none_hanging": rounds without callbacks between the hanging ones (that receiver's events in flight meanwhile)
    rates: dict[str, list[float]] = {
        name: [] for name in ("none", "ok", "ok_terminal", "failing", "none_hanging", "hanging")
    }
    cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in rates}
    states: dict[str, dict[str, int]] = {}
    settled_s: dict[str, float] = {}
    try:
        with (
            claimed_db(args.redis),
            receivers() as urls,
            worker(env, args.concurrency, args.inline_callbacks) as (worker_pid, callbacks_pid),
        ):
            run_round(client, 16, None)  # warm-up: first forward passes, connections
            order = [name for name in ("none", "ok", "ok_terminal", "failing") if name in wanted] * args.rounds
            order += ["none_hanging", "hanging"] * args.rounds if "hanging" in wanted else []
            for scenario in order:
                url = urls.get("ok" if scenario == "ok_terminal" else scenario)
                before = (_cpu_s(worker_pid), _cpu_s(callbacks_pid))
                rate, ids = run_round(client, args.jobs, url, TERMINAL if scenario == "ok_terminal" else None)
                after = (_cpu_s(worker_pid), _cpu_s(callbacks_pid))
                rates[scenario].append(rate)
                cpu[scenario].append((after[0] - before[0], after[1] - before[1]))
                if scenario in ("ok", "ok_terminal", "failing"):  # let them finish before the next round measures
                    states[scenario], settled_s[scenario] = settle(client, ids, events[scenario], timeout=120)
                elif scenario == "hanging":
                    states[scenario] = delivery_state(client, ids)
            cpu_per_delivery = delivery_cpu_ms(urls["ok"], 200)
    finally:
        server.stop()

    median = {name: statistics.median(values) for name, values in rates.items() if values}
    base = median["none"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    mode = "inline (--inline-callbacks)" if args.inline_callbacks else "a callbacks worker beside it"
    print(f"worker: genq worker -c {args.concurrency}, callbacks from {mode}; {args.jobs} 1-image jobs per round")
    print(f"rounds per scenario: {args.rounds} (medians); retry schedule {SCHEDULE}; hanging receiver: {HANG_S:g} s")
    print()
    print(f"{'scenario':<42}{'jobs/s':>8}{'ratio':>8}{'worker cpu ms/job':>19}{'callbacks cpu ms/job':>22}")
    labels = {
        "none": "no callbacks",
        "ok": "receiver answers 200",
        "ok_terminal": "receiver answers 200, terminal events only",
        "failing": "receiver fails 3x, then 200",
        "none_hanging": "no callbacks, between the hanging rounds",
        "hanging": "receiver hangs 30 s",
    }
    labels = {name: label for name, label in labels.items() if name in median}
    for name, label in labels.items():
        w_cpu = 1000 * statistics.median(c[0] for c in cpu[name]) / args.jobs
        cb_cpu = 1000 * statistics.median(c[1] for c in cpu[name]) / args.jobs
        print(f"{label:<42}{median[name]:>8.1f}{median[name] / base:>8.2f}{w_cpu:>19.2f}{cb_cpu:>22.2f}")
    print()
    for name, label in labels.items():
        print(f"rounds, {label}: " + " / ".join(f"{rate:.1f}" for rate in rates[name]))
    for name, state in states.items():
        waited = f", all settled {settled_s[name]:.1f} s after the round" if name in settled_s else ""
        done = f"{state['delivered']} delivered, {state['dead_lettered']} dead-lettered"
        print(f"events ({labels[name]}, last round): {events[name]} sent, {done}{waited}")
    print("CPU ms per delivery (delivering thread): " + ", ".join(f"{k} {v:.2f}" for k, v in cpu_per_delivery.items()))
    print()
    print(f"jobs_per_s_no_callbacks={base:.1f}")
    worker_cpu = {name: statistics.median(c[0] for c in cpu[name]) for name in labels}
    callbacks_cpu = {name: statistics.median(c[1] for c in cpu[name]) for name in labels}
    for name in [name for name in ("ok", "ok_terminal", "failing", "none_hanging", "hanging") if name in labels]:
        print(f"jobs_per_s_{name}={median[name]:.1f}")
        print(f"ratio_{name}={median[name] / base:.2f}")
        # The generation worker's own CPU per job without callbacks over with them: the jobs/s ratio where the
        # deliveries run on CPU of their own (another core, another machine, a GPU box's idle cores).
        print(f"worker_cpu_ratio_{name}={worker_cpu['none'] / worker_cpu[name]:.2f}")
    # What bounds jobs/s on a machine whose cores are all busy: generation and deliveries share them.
    for name in [name for name in ("ok", "ok_terminal", "hanging") if name in labels]:
        shared = (worker_cpu["none"] + callbacks_cpu["none"]) / (worker_cpu[name] + callbacks_cpu[name])
        print(f"shared_cores_cpu_ratio_{name}={shared:.2f}")
    for key, value in cpu_per_delivery.items():
        print(f"cpu_ms_per_delivery_{key}={value:.2f}")


if __name__ == "__main__":
    main()
