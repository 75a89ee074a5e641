"""Fairness between tenants on one worker: a small job of tenant B while tenant A's bulk work is queued.

    python -m benchmarks.fairness [--redis redis://127.0.0.1:6379/14] [--b-jobs 20] [--concurrency N]

One real `genq worker` subprocess (its default pool and concurrency unless --concurrency), the shipped fmnist-cgan
(28 px), a moto S3 server in this process. Tenant B submits ``--b-jobs`` 1-image jobs, one every 0.5 s; each job's
latency is its record's ``finished_at - created_at``. Four runs on the same worker:

(idle)  nothing else queued;
(bulk)  tenant A first queues 20,000 images at ``normal`` (the highest priority a key gets by default) the way the
        key's default limits allow in the fewest jobs: 2 jobs of 10,000 (GENQ_LIMITS__MAX_IMAGES_PER_JOB), 20 shards
        of 1,000 (GENQ_SHARD_SIZE), webdataset output;
(many)  tenant A first queues 20,000 images as 100 jobs of 200 (GENQ_API__MAX_QUEUED, 100 per key), webdataset;
(small) tenant A first queues 100 jobs of 64 images: the most work a key may queue in small jobs (at most 64
        images, SMALL_JOB_MAX_IMAGES), which wait in B's own queue (bulk jobs wait in the bulk queue behind it).

After B's jobs end, A's leftovers are canceled and the queue drained. Prints B's p50/p95 per run beside idle, the
ratios, and how much of A's work was still queued or running when B's last job finished (0 would mean B simply
waited for A to drain). Claims and flushes the Redis DB. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.throughput import AWS, percentile, start_s3
from benchmarks.uploads import claimed_db
from producer.client import Client
from producer.contract import GenerateRequest, JobStatus
from producer.core import constants
from producer.core.settings import RedisSettings, S3Settings
from producer.settings import ClientSettings

# Pinned: docs/benchmarks.md's figures are of this network's widths (versions 1 and 2; 3 costs 3x per image).
MODEL = "fmnist-cgan@2"
# Tenant A's work per run, (jobs, images per job), queued before B's first job: nothing; 20,000 images in the fewest
# jobs the default limits allow (GENQ_LIMITS__MAX_IMAGES_PER_JOB 10,000; GENQ_SHARD_SIZE 1,000) and in the most
# (GENQ_API__MAX_QUEUED, 100 per key); and the most small-job work a key may queue (100 jobs of SMALL_JOB_MAX_IMAGES,
# 64: they share B's queue, the bulk ones do not).
SCENARIOS = {"idle": (0, 0), "bulk": (2, 10_000), "many": (100, 200), "small": (100, 64)}
B_EVERY_S = 0.5


@contextmanager
def genq_worker(redis_url: str, endpoint: str, bucket: str, concurrency: int | None) -> Iterator[int]:
    """`python -m producer.cli worker` with its defaults (or ``-c concurrency``); yields its pid once ready."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "AWS_"))}
    env.update(AWS, AWS_ENDPOINT_URL=endpoint, GENQ_REDIS__URL=redis_url, GENQ_S3__BUCKET=bucket)
    env["GENQ_MODEL_DIRS"] = json.dumps([])
    log = Path(tempfile.mkstemp(prefix="genq-bench-fairness-", suffix=".log")[1])
    argv = [sys.executable, "-m", "producer.cli", "worker", *(["-c", str(concurrency)] if concurrency else [])]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "worker ready:" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start; see {log}")
            time.sleep(0.2)
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(60)


def submit_a(client: Client, jobs: int, per_job: int) -> list[str]:
    """Tenant A's ``jobs`` jobs of ``per_job`` images each at normal priority (webdataset output)."""
    ids = []
    for i in range(jobs):
        counts = {str(c): per_job // 10 + (c < per_job % 10) for c in range(10)}
        request = GenerateRequest(model=MODEL, counts=counts, seed=i, output="webdataset", priority="normal")
        ids.append(client.submit(request, tenant="a").id)
    return ids


def run_b(client: Client, n: int, a_ids: list[str]) -> tuple[list[float], int]:
    """B's ``n`` 1-image jobs, one every 0.5 s: their latencies (s), and A's images not done when the last ended."""
    ids = []
    for i in range(n):
        ids.append(client.submit(GenerateRequest(model=MODEL, label=i % 10, seed=i), tenant="b").id)
        time.sleep(B_EVERY_S)
    latencies = []
    for job_id in ids:
        view = client.wait(job_id, timeout=600, poll_s=0.05)
        if view.status is not JobStatus.SUCCEEDED or view.finished_at is None:
            raise RuntimeError(f"B's job {job_id} {view.status.value}: {view.error}")
        latencies.append((view.finished_at - view.created_at).total_seconds())
    a_left = 0
    for job_id in a_ids:
        view = client.status(job_id)
        a_left += view.progress.total - view.progress.done if not view.status.is_terminal() else 0
    return latencies, a_left


def drain(client: Client, a_ids: list[str]) -> None:
    """Cancel what is left of A's work and wait until the worker has nothing queued."""
    for job_id in a_ids:
        if not client.status(job_id).status.is_terminal():
            client.cancel(job_id)
    deadline = time.monotonic() + 120
    while any(client.redis.llen(q) for q in constants.JOB_QUEUES) and time.monotonic() < deadline:
        time.sleep(0.2)
    for job_id in a_ids:
        client.wait(job_id, timeout=120, poll_s=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14", help="a Redis DB this benchmark may flush")
    parser.add_argument("--b-jobs", type=int, default=20, help="tenant B's 1-image jobs per run")
    parser.add_argument("--concurrency", type=int, default=None, help="worker -c (default: genq worker's own)")
    args = parser.parse_args()

    bucket = "bench-fairness"
    server, endpoint = start_s3(bucket)
    client = Client(ClientSettings(redis=RedisSettings(url=args.redis), s3=S3Settings(bucket=bucket)))
    runs: dict[str, tuple[list[float], int, float]] = {}
    try:
        with claimed_db(args.redis), genq_worker(args.redis, endpoint, bucket, args.concurrency):
            run_b(client, 4, [])  # warm-up: the model loaded, connections open
            for name, (a_jobs, per_job) in SCENARIOS.items():
                a_ids = submit_a(client, a_jobs, per_job) if a_jobs else []
                started = time.perf_counter()
                latencies, a_left = run_b(client, args.b_jobs, a_ids)
                runs[name] = (latencies, a_left, time.perf_counter() - started)
                drain(client, a_ids)
    finally:
        server.stop()

    print(f"machine: {os.cpu_count()} cores; one `genq worker` (-c {args.concurrency or 'default'}), {MODEL}")
    print(f"tenant B: {args.b_jobs} 1-image jobs, one every {B_EVERY_S} s; tenant A's work queued first")
    print()
    idle_p50, idle_p95 = percentile(runs["idle"][0], 0.5), percentile(runs["idle"][0], 0.95)
    print(f"{'run':<44}{'B p50 s':>9}{'B p95 s':>9}{'p50/idle':>10}{'p95/idle':>10}{'A left':>8}")
    labels = {
        "idle": "idle: nothing else queued",
        "bulk": "bulk: A's 2 jobs x 10,000 (20 shards)",
        "many": "many: A's 100 jobs x 200",
        "small": "small: A's 100 jobs x 64",
    }
    figures: list[tuple[str, float]] = []
    for name, (latencies, a_left, _seconds) in runs.items():
        p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
        print(f"{labels[name]:<44}{p50:>9.2f}{p95:>9.2f}{p50 / idle_p50:>10.1f}{p95 / idle_p95:>10.1f}{a_left:>8}")
        figures += [(f"b_latency_p50_s_{name}", p50), (f"b_latency_p95_s_{name}", p95)]
        if name != "idle":
            figures += [
                (f"b_p50_over_idle_{name}", p50 / idle_p50),
                (f"b_p95_over_idle_{name}", p95 / idle_p95),
                (f"a_images_left_when_b_done_{name}", float(a_left)),
            ]
    print()
    for figure, value in figures:
        print(f"{figure}={value:.3f}")


if __name__ == "__main__":
    main()
