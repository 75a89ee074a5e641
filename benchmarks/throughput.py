"""Throughput of genq against the ceilings of its own hardware, measured in one run.

    python -m benchmarks.throughput [--quick] [--redis redis://127.0.0.1:6379/14] [--size 64] [--max-batch 32]
    python -m benchmarks.throughput --device cuda --bf16 --channels-last --compile inductor    # on a GPU

(a) ceilings: the raw generator in-process at batch 1 and at its best batch; the S3 server's own PUT/s.
(b) 1-image jobs through Redis -> worker -> S3 with dynamic batching on (max_batch: the smallest raw batch above 1
    within 5% of the fastest), then off (max_batch=1), same worker.
(d) submit-to-terminal latency of 1-image jobs, one at a time, on an idle worker.
(c) one bulk job (20,000 images) as webdataset tar shards vs the compute ceiling, and as objects vs the PUT ceiling.
(e) N images the naive way (N one-image jobs, batch 1, one upload thread) vs the same N as one genq job.
(f) the worker's peak RSS over one 10,000-image and one 100,000-image webdataset job, each on a fresh worker (with
    --quick: 200 then 600 images on one worker): flat in job size when shards and the bounded pipeline do their work.
(g) where the CPU of a 1-image job goes (worker, this process's client and S3 server, Redis), against the CPU the
    job cannot do without (one forward pass and one PUT, each at its full-machine best). Where compute and storage
    share the same cores (this CPU-only machine) their ceilings add up instead of the tighter one binding: the
    shared-cores ceiling is cores / that essential CPU, and `small_job_efficiency_shared_cores` is measured
    against it. On a GPU the forward pass leaves the cores and the figure approaches the PUT-bound one.
(h) genq against what a team would run instead (issue 19): a plain Celery task per image (benchmarks.plain_task, a
    `celery worker` of its own), beside genq's 1-image jobs, 4-image jobs and one bulk job as PNG objects and as
    WebDataset, all on the shipped fmnist-cgan, threads pool, the same -c (--concurrency) on both sides: images/s,
    worker CPU per image (the worker process and its children, genq's callbacks worker included), this process's CPU
    (moto's server and the client), S3 requests per job counted at moto, and moto's PUT ceiling at that concurrency.
The model is the shipped cGAN architecture at 64x64 RGB with random weights (compute visible on a CPU); --size 28
uses the shipped Fashion-MNIST weights instead ((h) always does). Starts its own moto S3 server, `genq worker` and
`celery worker` subprocesses; claims the Redis DB of --redis for the run (refused while a test run holds it) and
flushes it. Prints the tables, then one `name=value` line per figure. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import boto3
import redis
import torch
from botocore.config import Config

from benchmarks import plain_task
from benchmarks.s3_servers import AWS, S3RVER_BIN, S3RVER_INSTALL, s3rver, use_endpoint
from models import cgan
from models.data import FASHION_MNIST_CLASSES
from models.generator import Acceleration, load_generator, save_generator
from producer.client import Client
from producer.contract import GenerateRequest, JobStatus
from producer.core.settings import Limits, RedisSettings, S3Settings
from producer.settings import ClientSettings
from worker.catalog.registry import ZOO_DIR
from worker.memory import MallocPolicy, tune_malloc
from worker.settings import InferenceSettings

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from celery import Celery
    from moto.server import ThreadedMotoServer
    from mypy_boto3_s3 import S3Client


def make_model(size: int, root: Path) -> tuple[str, Path]:
    """(model name, version folder): the 64x64 RGB configuration with random weights, or the shipped 28 px model."""
    if size == 28:
        return "fmnist-cgan", ZOO_DIR / "fmnist-cgan" / "1"
    config = cgan.CGANConfig(class_names=FASHION_MNIST_CLASSES, resolution=size, channels=3, g_ch=32)
    torch.manual_seed(0)
    directory = root / f"bench-{size}" / "1"
    save_generator(directory, config, cgan.Generator(config))
    return f"bench-{size}", directory


def raw_ceiling(
    model_dir: Path, batch_sizes: list[int], seconds: float, device: str = "cpu", accel: Acceleration | None = None
) -> tuple[dict[int, float], dict[int, float]]:
    """images/s of sample() alone at each batch size (each measured for about ``seconds``), as the worker runs it,
    and the CPU milliseconds per image it took (every thread of this process: torch's intra-op threads too)."""
    model = load_generator(model_dir, device, accel)
    for bs in batch_sizes:  # warm-up: CUDA context, cuDNN autotuning, one compiled graph per bucket
        model.sample([0] * bs, list(range(bs)))
    rates: dict[int, float] = {}
    cpu_ms: dict[int, float] = {}
    for bs in batch_sizes:
        n, started, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - started < seconds or n == 0:
            model.sample([n % 10 for n in range(bs)], list(range(n, n + bs)))
            n += bs
        rates[bs] = n / (time.perf_counter() - started)
        cpu_ms[bs] = 1000 * (time.process_time() - cpu) / n
    return rates, cpu_ms


def s3_client(endpoint: str, config: Config | None = None) -> S3Client:
    """A boto3 S3 client of the benchmark's credentials at ``endpoint``."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"],
        region_name=AWS["AWS_DEFAULT_REGION"],
        config=config,
    )


def start_s3(bucket: str) -> tuple[ThreadedMotoServer, str]:
    """A moto S3 server on a free loopback port holding ``bucket``, and its endpoint (also set for boto3 in this
    process's environment). Stop it when done."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3_client(endpoint).create_bucket(Bucket=bucket)
    use_endpoint(endpoint)
    return server, endpoint


def put_ceiling(
    endpoint: str, bucket: str, size: int, n: int, threads: int = 8, server_pid: int | None = None
) -> tuple[float, float, float | None]:
    """PUT/s of the S3 server for objects of the output's size: ``threads`` client threads (8, like a worker's
    uploads); the CPU milliseconds per PUT of this process, which runs the boto3 client (and moto's server); and
    those of the server process ``server_pid`` (None for moto, counted in this process)."""
    from concurrent.futures import ThreadPoolExecutor

    s3 = s3_client(endpoint, Config(max_pool_connections=max(10, threads)))
    body = os.urandom(size)
    s3.put_object(Bucket=bucket, Key="ceiling/warm-up", Body=body)  # the connection and the client's first call
    started, cpu = time.perf_counter(), time.process_time()
    server_cpu = process_cpu_s(server_pid) if server_pid else 0.0
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"ceiling/{i}", Body=body), range(n)))
    rate, client_ms = n / (time.perf_counter() - started), 1000 * (time.process_time() - cpu) / n
    return rate, client_ms, 1000 * (process_cpu_s(server_pid) - server_cpu) / n if server_pid else None


class RequestCounter:
    """A WSGI middleware counting the requests an S3 server answers, by HTTP method (PUT: an object stored)."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        with self._lock:
            self._counts[environ["REQUEST_METHOD"]] += 1
        return self.app(environ, start_response)

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)


def count_requests(server: ThreadedMotoServer) -> RequestCounter:
    """Count every request ``server`` (started) answers from now on: the counter wraps its WSGI application."""
    wsgi = server._server  # moto keeps its werkzeug server private; its handler reads .app on every request
    if wsgi is None:
        raise RuntimeError("start the server first")
    counter = RequestCounter(wsgi.app)
    wsgi.app = counter
    return counter


class CpuMeter:
    """CPU seconds used by the worker, by this process (client and moto) and by Redis (when it runs on this
    machine) between :meth:`start` and :meth:`stop`; with ``children``, also by the worker's child processes
    (``genq worker``'s callbacks worker), as "worker's children"."""

    def __init__(self, worker_pid: int, client: redis.Redis, children: bool = False, s3_pid: int | None = None) -> None:
        pid = int(client.info("server").get("process_id", 0))
        self.pids = {"worker": worker_pid, "redis": pid if Path(f"/proc/{pid}/stat").exists() else None}
        if s3_pid is not None:  # an S3 server of its own (s3rver); moto's runs in this process
            self.pids["s3 server"] = s3_pid
        self.children = children
        self._start: dict[str, float | None] = {}
        self._start_children: dict[int, float] = {}
        self.used: dict[str, float | None] = {}

    def _now(self) -> dict[str, float | None]:
        return {
            "this process": time.process_time(),
            **{name: None if pid is None else process_cpu_s(pid) for name, pid in self.pids.items()},
        }

    def _children_now(self) -> dict[int, float]:
        return tree_cpu_s(self.pids["worker"] or 0, itself=False) if self.children else {}

    def start(self) -> None:
        self._start_children = self._children_now()
        self._start = self._now()

    def stop(self) -> None:
        end = self._now()
        end_children = self._children_now()
        self.used = {k: None if (a := self._start[k]) is None or (b := end[k]) is None else b - a for k in end}
        if self.children:  # a child started inside the window counts whole; one that ended in it is lost
            self.used["worker's children"] = sum(
                cpu - self._start_children.get(pid, 0.0) for pid, cpu in end_children.items()
            )


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (every thread) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int, itself: bool = True) -> dict[int, float]:
    """CPU seconds so far of process ``pid`` (unless not ``itself``) and of each live descendant, by pid."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = ([pid] if itself else []), [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    used = {}
    for each in found:
        try:
            used[each] = process_cpu_s(each)
        except OSError:
            continue
    return used


@contextmanager
def worker(
    redis_url: str,
    endpoint: str,
    bucket: str,
    model_root: Path,
    *,
    concurrency: int = 64,
    log: Path | None = None,
    **settings: str,
) -> Iterator[subprocess.Popen[bytes]]:
    """A `genq worker` subprocess (threads pool, ``concurrency`` threads) with the given GENQ_* settings, its output
    in ``log`` (a new temporary file if not given), ready when entered. Its callbacks worker starts after it is
    ready: wait for "worker ready: callbacks only" in ``log`` where that start must not overlap a measurement."""
    redis.Redis.from_url(redis_url).flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "AWS_"))}
    env.update(AWS, AWS_ENDPOINT_URL=endpoint, GENQ_REDIS__URL=redis_url, GENQ_S3__BUCKET=bucket)
    env["GENQ_MODEL_DIRS"] = json.dumps([str(model_root)])
    env.update({f"GENQ_{k.upper()}": v for k, v in settings.items()})
    log = log or Path(tempfile.mkstemp(prefix="genq-bench-", suffix=".log")[1])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "worker", "-c", str(concurrency)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_logged(log, "worker ready:", proc)
        yield proc
    finally:
        proc.terminate()
        proc.wait(60)


def wait_logged(log: Path, line: str, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    """Wait until ``log``, the output of ``proc``, holds ``line``.

    Raises:
        RuntimeError: ``proc`` ended or ``timeout_s`` passed first.
    """
    deadline = time.monotonic() + timeout_s
    while line not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{line!r} not logged by process {proc.pid}; see {log}")
        time.sleep(0.2)


@contextmanager
def plain_worker(
    redis_url: str, endpoint: str, bucket: str, model_dir: Path, concurrency: int, device: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A `celery worker` of :mod:`benchmarks.plain_task` (threads pool, ``concurrency`` threads), ready when
    entered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "AWS_", "PLAIN_"))}
    env.update(AWS, AWS_ENDPOINT_URL=endpoint, PLAIN_REDIS_URL=redis_url, PLAIN_BUCKET=bucket)
    env.update(PLAIN_MODEL_DIR=str(model_dir), PLAIN_DEVICE=device)
    argv = [sys.executable, "-m", "celery", "-A", "benchmarks.plain_task", "worker", "-Q", plain_task.QUEUE]
    argv += ["--pool", "threads", "-c", str(concurrency), "--loglevel", "info"]
    log = Path(tempfile.mkstemp(prefix="genq-bench-plain-", suffix=".log")[1])
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    try:
        wait_logged(log, " ready.", proc)  # Celery's "celery@<host> ready."
        yield proc
    finally:
        proc.terminate()
        proc.wait(60)


def plain_images_per_s(sender: Celery, n: int, first_seed: int) -> float:
    """Send ``n`` plain tasks (one image each) at once; images/s from the first send to the last result."""
    started = time.perf_counter()
    results = [
        sender.send_task(plain_task.TASK, args=(i % 10, first_seed + i), queue=plain_task.QUEUE) for i in range(n)
    ]
    for result in results:
        result.get(timeout=1800)  # the Redis backend's pub/sub: no polling interval; a task's error is raised here
    return n / (time.perf_counter() - started)


@dataclass(frozen=True)
class PeerRow:
    """One path of (h) over its measured window: its rate, CPU by process, and the S3 requests moto answered."""

    name: str
    images_per_s: float
    images: int
    jobs: int
    cpu_s: dict[str, float | None]
    requests: Counter[str] | None  # None: not counted (s3rver)

    def cpu_ms_per_image(self, *names: str) -> float | None:
        used = [self.cpu_s.get(name) for name in names]
        if any(u is None for u in used):
            return None
        return 1000 * sum(u for u in used if u is not None) / self.images

    @property
    def worker_ms(self) -> float:
        """The worker's CPU per image, its child processes included."""
        return self.cpu_ms_per_image("worker", "worker's children") or 0.0

    def per_job(self, *methods: str) -> float | None:
        if self.requests is None:
            return None
        return sum(n for method, n in self.requests.items() if method in methods) / self.jobs


def peer_row(
    name: str, meter: CpuMeter, counter: RequestCounter | None, images: int, jobs: int, run: Callable[[], float]
) -> PeerRow:
    """Run one path of (h) (``run`` returns its images/s), metered; S3 requests counted where ``counter`` can."""
    before = counter.snapshot() if counter is not None else Counter[str]()
    meter.start()
    rate = run()
    meter.stop()
    requests = counter.snapshot() - before if counter is not None else None
    return PeerRow(name, rate, images, jobs, dict(meter.used), requests)


@contextmanager
def claim_renewed(redis_url: str) -> Iterator[None]:
    """The DB of ``redis_url`` claimed (:func:`benchmarks.uploads.claimed_db`) and flushed, and the claim renewed
    while the run lasts: a full run outlasts the claim's TTL, and a test run must not take the DB meanwhile."""
    from benchmarks.uploads import _CLAIM_KEY, _CLAIM_TTL_S, claimed_db  # lazily: uploads imports this module

    db = int(redis.Redis.from_url(redis_url).connection_pool.connection_kwargs.get("db", 0))
    admin = redis.Redis.from_url(redis_url, db=0)
    # claimed_db's token: renew the claim only while it is still this process's
    key, token, stop = _CLAIM_KEY.format(db=db), f"bench-{os.getpid()}".encode(), threading.Event()

    def renew() -> None:
        while not stop.wait(_CLAIM_TTL_S / 4):
            if admin.get(key) == token:
                admin.expire(key, _CLAIM_TTL_S)

    with claimed_db(redis_url):
        renewer = threading.Thread(target=renew, name="bench-claim", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set size so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def jobs_per_s(client: Client, model: str, jobs: int, count: int = 1) -> float:
    """Submit ``jobs`` jobs of ``count`` images at once; jobs/s from the first submit to the last success."""
    started = time.perf_counter()
    ids = [client.submit(GenerateRequest(model=model, label=i % 10, count=count, seed=i)).id for i in range(jobs)]
    for job_id in ids:
        view = client.wait(job_id, timeout=1800, poll_s=0.02)
        if view.status is not JobStatus.SUCCEEDED:
            raise RuntimeError(f"job {job_id} {view.status.value}: {view.error}")
    return jobs / (time.perf_counter() - started)


def bulk_images_per_s(client: Client, model: str, images: int, output: Literal["objects", "webdataset"]) -> float:
    """images/s of one job of ``images`` images, from submit to success (shards shared by the worker's threads)."""
    started = time.perf_counter()
    request = GenerateRequest(model=model, counts={str(c): images // 10 for c in range(10)}, seed=1, output=output)
    view = client.wait(client.submit(request).id, timeout=3600, poll_s=0.05)
    if view.status is not JobStatus.SUCCEEDED:
        raise RuntimeError(f"bulk job {view.status.value}: {view.error}")
    return images / (time.perf_counter() - started)


def latencies_ms(client: Client, model: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        view = client.wait(client.submit(GenerateRequest(model=model, label=i % 10, seed=i)).id, 60, poll_s=0.002)
        if view.status is not JobStatus.SUCCEEDED:
            raise RuntimeError(f"latency job {view.status.value}: {view.error}")
        out.append(1000 * (time.perf_counter() - started))
    return out


@dataclass(frozen=True)
class Ceiling:
    """The S3 server's PUT ceiling at (h)'s concurrency: PUT/s, and CPU ms per PUT of the client (with moto: and its
    server) and of the server process (s3rver)."""

    server: str
    puts_per_s: float
    client_ms: float
    server_ms: float | None
    body: int


def print_peers(rows: list[PeerRow], concurrency: int, ceiling: Ceiling, puts_per_job: list[float | None]) -> None:
    """The (h) table: each path beside the plain task, and the S3 server's PUT ceiling under it. ``puts_per_job``:
    each row's PUTs per job, as counted (here, or against moto where this server cannot count them)."""
    plain = rows[0]
    print(
        f"(h) genq against a plain Celery task (issue 19), S3 server {ceiling.server}: fmnist-cgan 28x28, threads pool "
        f"-c {concurrency} on both sides, {plain.images} images per path"
    )
    head = ["images/s", "vs plain", "worker", "children", "bench", "S3 srv", "Redis", "PUT/job", "other/job"]
    widths = [10, 10, 9, 10, 8, 8, 8, 10, 11]
    print(f"{'path':<42}" + "".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)) + f"{'S3-bound':>10}")

    def cell(value: float | None, width: int, digits: int = 2) -> str:
        return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    for row, puts in zip(rows, puts_per_job, strict=True):
        put_per_image = None if puts is None else puts * row.jobs / row.images
        other = None if row.requests is None or puts is None else sum(row.requests.values()) / row.jobs - puts
        values = [
            cell(row.images_per_s, widths[0], 1),
            cell(row.images_per_s / plain.images_per_s, widths[1]),
            cell(row.worker_ms, widths[2]),
            cell(row.cpu_ms_per_image("worker's children"), widths[3]),
            cell(row.cpu_ms_per_image("this process"), widths[4]),
            cell(row.cpu_ms_per_image("s3 server"), widths[5]),
            cell(row.cpu_ms_per_image("redis"), widths[6]),
            cell(puts, widths[7]),
            cell(other, widths[8]),
            cell(ceiling.puts_per_s / put_per_image if put_per_image else None, 10, 1),
        ]
        print(f"{row.name:<42}" + "".join(values))
    name = f"{ceiling.server} PUT ceiling, {concurrency} threads, {ceiling.body} B"
    print(
        f"{name:<42}{ceiling.puts_per_s:>10.1f}{'':>10}{'':>9}{'':>10}{ceiling.client_ms:>8.2f}"
        f"{cell(ceiling.server_ms, 8)}   (PUT/s; CPU ms per PUT)"
    )
    print(
        "images/s from the first submit to the last result; CPU in ms per image over that window (user + system, "
        "/proc):\n"
        "  worker: the worker process and its children; children: of it, the child processes (genq's callbacks\n"
        "  worker, counted in; the plain worker has none); bench: the benchmark process: the client's submits and\n"
        "  waits, and moto's S3 server when it is moto; S3 srv: s3rver's process; Redis: the whole server.\n"
        "  PUT/job, other/job: S3 requests per job counted at moto (s3rver's rows show moto's count); S3-bound: the\n"
        "  server's PUT ceiling / PUTs per image.\n"
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def own_ceilings(
    args: argparse.Namespace,
    client: Client,
    endpoint: str,
    bucket: str,
    root: Path,
    device_env: dict[str, Any],
    malloc: dict[str, int],
) -> list[tuple[str, float]]:
    """Sections (a)-(g): genq against its own hardware's ceilings; prints their table and returns their figures."""
    accel = Acceleration(bf16=args.bf16, channels_last=args.channels_last, compile_backend=args.compile)
    model, model_dir = make_model(args.size, root)
    small_jobs, naive_n, latency_n, seconds = (128, 100, 20, 0.3) if args.quick else (1024, 2000, 100, 3.0)
    bulk_n = 300 if args.quick else 20_000
    rss_sizes = (200, 600) if args.quick else (10_000, 100_000)
    max_wait_ms = 5.0
    batches = args.batches or [1, 8, 32, 64, 128, 256, *([] if args.device == "cpu" else [512, 1024, 2048])]
    batches = sorted({1, *batches, args.max_batch or 1})  # batch 1 and a pinned "on" batch are always measured
    rates, raw_cpu_ms = raw_ceiling(model_dir, batches, seconds, args.device, accel)
    best = max(rates, key=lambda bs: rates[bs])
    # "Batching on" must batch: its max_batch is the smallest size above 1 within 5% of the fastest above 1 (on
    # a CPU batch 1 can win outright, and max_batch=1 would make "on" the same worker as "off"). Where the curve
    # is flat the fastest is noise, and a bigger batch costs memory and pipeline granularity for nothing.
    fastest = max(rate for bs, rate in rates.items() if bs > 1)
    batched = args.max_batch or min(bs for bs, rate in rates.items() if bs > 1 and rate >= 0.95 * fastest)
    sample = load_generator(model_dir).sample([7], [1])[0].numpy()
    from producer.contract import OutputFormat
    from worker.generate.encode import encode_image, provenance

    png_size = len(encode_image(sample, OutputFormat.PNG, provenance(generator=model, version="1", label="x", seed=1)))
    puts, put_cpu_ms, _ = put_ceiling(endpoint, bucket, png_size, 150 if args.quick else 1000)

    on = {"batching__max_batch": str(batched), "batching__max_wait_ms": str(max_wait_ms), **device_env}
    # Each worker first runs a full batch of jobs unmeasured: a fresh process grows its heap to a batch's
    # activations on its first forward passes (page faults), which a short measured run would otherwise carry.
    warm_up = 2 * batched
    with worker(args.redis, endpoint, bucket, root, **on) as proc:
        jobs_per_s(client, model, warm_up)
        meter = CpuMeter(proc.pid, redis.Redis.from_url(args.redis))
        meter.start()
        jobs_on = jobs_per_s(client, model, small_jobs)
        meter.stop()
        lat = latencies_ms(client, model, latency_n)
        one_job = naive_n * jobs_per_s(client, model, 1, count=naive_n)  # images/s
        shards = bulk_images_per_s(client, model, bulk_n, "webdataset")
        objects = bulk_images_per_s(client, model, bulk_n, "objects")
    with worker(args.redis, endpoint, bucket, root, batching__max_batch="1", **device_env):
        jobs_per_s(client, model, warm_up)
        jobs_off = jobs_per_s(client, model, small_jobs)
    naive_conf = {"batching__max_batch": "1", "batching__upload_workers": "1", **device_env}
    with worker(args.redis, endpoint, bucket, root, **naive_conf):
        jobs_per_s(client, model, warm_up)
        naive = jobs_per_s(client, model, naive_n)  # jobs of one image = images/s
    rss: dict[int, float] = {}
    if args.quick:  # one worker, the small job first: its peak after the large job is the larger of the two
        with worker(args.redis, endpoint, bucket, root, **on) as proc:
            for n in rss_sizes:
                bulk_images_per_s(client, model, n, "webdataset")
                rss[n] = peak_rss_mib(proc.pid)
    else:
        for n in rss_sizes:  # a fresh worker per size: VmHWM is the peak since the process started
            with worker(args.redis, endpoint, bucket, root, **on) as proc:
                bulk_images_per_s(client, model, n, "webdataset")
                rss[n] = peak_rss_mib(proc.pid)
    compute_gain = rates[batched] / rates[1]  # what the hardware offers "on" over "off"; below 1 if batching slows it
    batching_efficiency = (jobs_on / jobs_off) / compute_gain
    small_job_ceiling = min(rates[best], puts)  # 1 PUT per 1-image job: the image (its manifest is in its record)
    small_job_efficiency = jobs_on / small_job_ceiling
    naive_speedup = one_job / naive
    shard_efficiency = shards / rates[best]
    object_efficiency = objects / puts
    object_bound = min(rates[best], puts)  # on a CPU the generator, not the store, may be the tighter ceiling
    p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
    # (g) The CPU a 1-image job cannot do without: its share of a forward pass at "on"'s batch (on a GPU the
    # forward pass's CPU is the launch work alone) and one PUT, client and server side.
    essential_ms = raw_cpu_ms[batched] + put_cpu_ms
    cores = os.cpu_count() or 1
    shared_ceiling = 1000 * cores / essential_ms
    job_cpu_ms = {name: None if used is None else 1000 * used / small_jobs for name, used in meter.used.items()}

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(f"model: {model} ({args.size}x{args.size}), output PNG ~{png_size} B, quick={args.quick}")
    print(f"device: {args.device}, {accel}")
    options = ", ".join(f"{k}={v}" for k, v in malloc.items()) or "glibc defaults"
    print(f"malloc: {args.malloc_policy.value} ({options}), workers and ceilings alike\n")
    print(f"{'figure':<58}{'measured':>12}{'ceiling':>12}{'ratio':>8}")
    for bs, rate in rates.items():
        print(f"{f'(a) raw generator, batch {bs} (images/s)':<58}{rate:>12.1f}")
    print(f"{'(a) S3 server PUT/s (8 threads)':<58}{puts:>12.1f}")
    table = [
        ("(b) 1-image jobs/s, batching on", jobs_on, small_job_ceiling, small_job_efficiency),
        ("(b) 1-image jobs/s, batching off (max_batch=1)", jobs_off, None, None),
        (
            f"(b) on/off vs raw batch-{batched}/batch-1 compute gain",
            jobs_on / jobs_off,
            compute_gain,
            batching_efficiency,
        ),
        ("(d) latency p50 of 1-image jobs, idle worker (ms)", p50, max_wait_ms + 50, None),
        ("(d) latency p99 (ms)", p99, None, None),
        (f"(e) {naive_n} images as one job (images/s)", one_job, None, None),
        (f"(e) {naive_n} images naively: 1-image jobs, batch 1, 1 upload thread", naive, None, None),
        ("(e) one job vs naive", naive_speedup, 10.0, None),
        (f"(c) one {bulk_n}-image job as webdataset shards (images/s)", shards, rates[best], shard_efficiency),
        (f"(c) one {bulk_n}-image job as objects (images/s)", objects, puts, object_efficiency),
        ("(c) the same vs min(compute, PUT) ceilings", objects, object_bound, objects / object_bound),
    ]
    for name, value, ceiling, ratio in table:
        c = f"{ceiling:>12.1f}" if ceiling is not None else f"{'':>12}"
        r = f"{ratio:>8.2f}" if ratio is not None else ""
        print(f"{name:<58}{value:>12.1f}{c}{r}")
    small, large = rss_sizes
    print(f"{f'(f) worker peak RSS, one {large}-image webdataset job (MiB)':<58}{rss[large]:>12.1f}")
    print(f"{f'(f) worker peak RSS, one {small}-image webdataset job (MiB)':<58}{rss[small]:>12.1f}")
    print(f"{'(f) peak RSS ratio, large / small job':<58}{rss[large] / rss[small]:>12.2f}")
    print(f"{f'(g) essential CPU of a 1-image job (ms): forward at batch {batched}':<58}{raw_cpu_ms[batched]:>12.2f}")
    print(f"{'(g) essential CPU of a 1-image job (ms): 1 PUT':<58}{put_cpu_ms:>12.2f}")
    for name, ms in job_cpu_ms.items():
        shown = f"{ms:>12.2f}" if ms is not None else f"{'n/a':>12}"
        print(f"{f'(g) CPU per 1-image job, batching on (ms): {name}':<58}{shown}")
    total_ms = sum(ms for ms in job_cpu_ms.values() if ms is not None)
    print(
        f"{'(g) CPU per 1-image job, all measured vs essential (ms)':<58}{total_ms:>12.2f}{essential_ms:>12.2f}"
        f"{essential_ms / total_ms:>8.2f}"
    )
    print(
        f"{f'(g) 1-image jobs/s vs shared-cores ceiling ({cores} cores)':<58}{jobs_on:>12.1f}"
        f"{shared_ceiling:>12.1f}{jobs_on / shared_ceiling:>8.2f}\n"
    )
    return [
        ("raw_images_per_s_batch1", rates[1]),
        ("raw_images_per_s_best", rates[best]),
        ("raw_best_batch", best),
        ("max_batch_on", batched),
        ("s3_put_per_s", puts),
        ("jobs_per_s_batching_on", jobs_on),
        ("jobs_per_s_batching_off", jobs_off),
        ("batching_efficiency", batching_efficiency),
        ("small_job_efficiency", small_job_efficiency),
        ("latency_p50_ms", p50),
        ("latency_p99_ms", p99),
        ("peak_rss_mib", rss[large]),
        (f"peak_rss_mib_{small}", rss[small]),
        ("naive_speedup", naive_speedup),
        ("shard_efficiency", shard_efficiency),
        ("object_efficiency", object_efficiency),
        ("object_efficiency_vs_binding_ceiling", objects / object_bound),
        ("essential_cpu_ms_per_job", essential_ms),
        ("measured_cpu_ms_per_job", total_ms),
        *((f"cpu_ms_per_job_{name.replace(' ', '_')}", ms) for name, ms in job_cpu_ms.items() if ms is not None),
        ("shared_cores_ceiling_jobs_per_s", shared_ceiling),
        ("small_job_efficiency_shared_cores", jobs_on / shared_ceiling),
    ]


def peer_figures(
    args: argparse.Namespace,
    client: Client,
    server: tuple[str, str, int | None],
    bucket: str,
    root: Path,
    requests: RequestCounter | None,
    device_env: dict[str, Any],
    puts_counted: list[float | None] | None = None,
) -> tuple[list[tuple[str, float]], list[float | None]]:
    """Section (h) against one S3 server (name, endpoint, its pid when it is a process of its own): genq against a
    plain Celery task, both on the shipped 28 px model, the same -c. Prints its table; returns its figures (named
    with a ``_<server>`` suffix except moto's) and the PUTs per job of each row (None where not counted:
    ``puts_counted``, moto's, stand in for them in the table)."""
    name, endpoint, server_pid = server
    use_endpoint(endpoint)
    conc = args.concurrency
    peer_n, peer_put_n = (100, 100) if args.quick else (1000, 1000)  # images per path, PUTs of the ceiling
    peer_model, peer_dir = make_model(28, root)
    plain_png = len(plain_task.render_png(load_generator(peer_dir), 7, 1))
    ceiling = Ceiling(name, *put_ceiling(endpoint, bucket, plain_png, peer_put_n, conc, server_pid), plain_png)
    peer_warm = 2 * conc  # every thread's first forward pass and connections, unmeasured
    rows: list[PeerRow] = []
    with plain_worker(args.redis, endpoint, bucket, peer_dir, conc, args.device) as proc:
        sender = plain_task.create_app(args.redis)
        plain_images_per_s(sender, peer_warm, first_seed=peer_n)
        peer_meter = CpuMeter(proc.pid, redis.Redis.from_url(args.redis), children=True, s3_pid=server_pid)
        rows.append(
            peer_row(
                "plain Celery task, one per image",
                peer_meter,
                requests,
                peer_n,
                peer_n,
                lambda: plain_images_per_s(sender, peer_n, first_seed=0),
            )
        )
        sender.close()
    log = Path(tempfile.mkstemp(prefix="genq-bench-", suffix=".log")[1])
    with worker(args.redis, endpoint, bucket, root, concurrency=conc, log=log, **device_env) as proc:
        jobs_per_s(client, peer_model, peer_warm)
        wait_logged(log, "worker ready: callbacks only", proc)  # its start stays out of the windows
        peer_meter = CpuMeter(proc.pid, redis.Redis.from_url(args.redis), children=True, s3_pid=server_pid)
        paths: list[tuple[str, int, Callable[[], float]]] = [
            ("genq, 1-image jobs", peer_n, lambda: jobs_per_s(client, peer_model, peer_n)),
            ("genq, 4-image jobs", peer_n // 4, lambda: 4 * jobs_per_s(client, peer_model, peer_n // 4, 4)),
            (
                f"genq, one {peer_n}-image job, PNG objects",
                1,
                lambda: bulk_images_per_s(client, peer_model, peer_n, "objects"),
            ),
            (
                f"genq, one {peer_n}-image job, WebDataset",
                1,
                lambda: bulk_images_per_s(client, peer_model, peer_n, "webdataset"),
            ),
        ]
        for path, jobs, run in paths:
            rows.append(peer_row(path, peer_meter, requests, peer_n, jobs, run))
    counted = [row.per_job("PUT") for row in rows]
    shown = [c if c is not None else p for c, p in zip(counted, puts_counted or counted, strict=True)]
    print_peers(rows, conc, ceiling, shown)
    plain = rows[0]
    short = ["plain", "small", "four", "bulk", "webdataset"]  # the rows' names in the figures below
    genq = list(zip(short[1:], rows[1:], strict=True))
    tail = "" if name == "moto" else f"_{name}"
    figures = [
        ("plain_images_per_s", plain.images_per_s),
        ("plain_worker_cpu_ms_per_image", plain.worker_ms),
        *((f"{key}_vs_plain", row.images_per_s / plain.images_per_s) for key, row in genq),
        *((f"{key}_cpu_vs_plain", row.worker_ms / plain.worker_ms) for key, row in genq),
        *((f"{key}_worker_cpu_ms_per_image", row.worker_ms) for key, row in genq),
        *((f"{key}_puts_per_job", puts) for key, puts in zip(short, counted, strict=True) if puts is not None),
        (f"{name}_put_per_s_{conc}_threads", ceiling.puts_per_s),
        (f"{name}_client_cpu_ms_per_put", ceiling.client_ms),
        *([(f"{name}_server_cpu_ms_per_put", ceiling.server_ms)] if ceiling.server_ms is not None else []),
    ]
    return [(f"{figure}{tail}" if not figure.startswith(name) else figure, value) for figure, value in figures], counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced counts: finishes in about a minute")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14", help="a Redis DB this benchmark may flush")
    parser.add_argument("--size", type=int, default=64, choices=[28, 32, 64])
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="max_batch of 'batching on' (default: the smallest raw batch within 5%% of the fastest); pins it "
        "where the raw curve is flat and run-to-run noise would pick another size",
    )
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="raw-generator batch sizes of (a) (default: 1 8 32 64 128 256 on the CPU; up to 2048 on another device, "
        "where the best batch is larger)",
    )
    parser.add_argument("--device", default="cpu", help="torch device of the generator and the worker (e.g. cuda)")
    parser.add_argument("--bf16", action="store_true", help="autocast forward passes to bfloat16 (GPU)")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=InferenceSettings().channels_last,
        help="NHWC layout (the worker's default)",
    )
    parser.add_argument("--compile", default=None, metavar="BACKEND", help="torch.compile backend, e.g. inductor")
    parser.add_argument(
        "--malloc-policy",
        type=MallocPolicy,
        default=MallocPolicy.KEEP,
        choices=list(MallocPolicy),
        help="glibc malloc policy of the workers and of this process's raw-generator ceilings (GENQ_MALLOC_POLICY)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="threads of the plain worker and of genq's worker in (h) (threads pool on both sides), and the client "
        "threads of (h)'s PUT ceiling",
    )
    parser.add_argument("--peers-only", action="store_true", help="section (h) alone: genq against a plain Celery task")
    args = parser.parse_args()
    run_started = time.perf_counter()
    # The ceilings are measured under the workers' allocator: page faults on freed-and-remapped activations cost
    # a CPU forward pass as much as the arithmetic, so a ceiling under another policy would compare apples to pears.
    malloc = tune_malloc(2, args.malloc_policy)
    # The same device and forward-pass options for every worker this run starts.
    device_env = {
        "malloc_policy": args.malloc_policy.value,
        "device": args.device,
        "inference__bf16": str(args.bf16).lower(),
        "inference__channels_last": str(args.channels_last).lower(),
        **({"inference__compile_backend": args.compile} if args.compile else {}),
    }
    bucket = "bench"
    server, endpoint = start_s3(bucket)
    requests = count_requests(server)
    root = Path(tempfile.mkdtemp(prefix="genq-bench-models-"))
    client = Client(
        ClientSettings(
            redis=RedisSettings(url=args.redis),
            s3=S3Settings(bucket=bucket),
            limits=Limits(max_images_per_job=100_000),  # (f)'s largest job
        )
    )
    try:
        with claim_renewed(args.redis):
            figures = [] if args.peers_only else own_ceilings(args, client, endpoint, bucket, root, device_env, malloc)
            moto = ("moto", endpoint, None)
            found, counted = peer_figures(args, client, moto, bucket, root, requests, device_env)
            figures += found
            if args.quick:
                print("(h) against s3rver: skipped with --quick (a smoke test)\n")
            elif not S3RVER_BIN.exists():
                print(f"(h) against s3rver: skipped, not installed (`{S3RVER_INSTALL}` installs it)\n")
            else:
                with s3rver(bucket) as other:
                    served = ("s3rver", other.endpoint, other.pid)
                    figures += peer_figures(args, client, served, bucket, root, None, device_env, counted)[0]
    finally:
        server.stop()
    for name, value in [*figures, ("run_wall_s", time.perf_counter() - run_started)]:
        print(f"{name}={value:.3f}")


if __name__ == "__main__":
    main()
