"""Spine throughput: the raw generator in-process vs a 1,000-image job embedded and through Redis + S3.

    python -m benchmarks.spine [--images 1000] [--redis redis://127.0.0.1:6379/14]

Starts its own moto S3 server on loopback and one `genq worker` subprocess; needs a Redis it may flush (a
dedicated DB). Prints one table and then one `name=value` line per figure. Timings are measured, never asserted.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import redis
import torch

from producer.client import Client
from producer.contract import GenerateRequest, JobStatus, JobView
from producer.core.settings import RedisSettings, S3Settings
from producer.settings import ClientSettings
from worker.catalog.registry import ZOO_DIR, ModelRegistry
from worker.embedded import run_embedded
from worker.settings import WorkerSettings

# Pinned: docs/benchmarks.md's figures are of this network's widths (versions 1 and 2; 3 costs 3x per image).
MODEL, VERSION = "fmnist-cgan", "2"
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def raw_generator(batch_sizes: list[int], images: int) -> dict[int, float]:
    """images/s of sample() alone (latents, forward pass, uint8) at each batch size."""
    registry = ModelRegistry([ZOO_DIR])
    model = registry.load(MODEL, VERSION)
    model.sample([0] * 8, list(range(8)))  # warm-up
    rates = {}
    for bs in batch_sizes:
        n = max(images // bs, 3) * bs
        started = time.perf_counter()
        for start in range(0, n, bs):
            model.sample([7] * bs, list(range(start, start + bs)))
        rates[bs] = n / (time.perf_counter() - started)
    return rates


def embedded_job(images: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        request = GenerateRequest(model=f"{MODEL}@{VERSION}", label="sneaker", count=images, seed=1)
        started = time.perf_counter()
        run_embedded(request, Path(out), WorkerSettings())
        return images / (time.perf_counter() - started)


def s3_put_ceiling(endpoint: str, bucket: str, n: int = 300) -> float:
    """PUT/s of the S3 server alone for objects of the output size (a ~1 kB PNG), one client, sequential."""
    s3 = boto3.client("s3", endpoint_url=endpoint, **_boto())
    body = b"x" * 1100
    started = time.perf_counter()
    for i in range(n):
        s3.put_object(Bucket=bucket, Key=f"ceiling/{i}", Body=body)
    return n / (time.perf_counter() - started)


def queued_job(images: int, redis_url: str, endpoint: str, bucket: str) -> tuple[float, float]:
    """(images/s from submit to succeeded, seconds to first stored image) through Redis, a worker and S3."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "AWS_"))}
    env.update(AWS, AWS_ENDPOINT_URL=endpoint, GENQ_REDIS__URL=redis_url, GENQ_S3__BUCKET=bucket)
    log = tempfile.NamedTemporaryFile(prefix="genq-bench-worker-", suffix=".log", delete=False)  # noqa: SIM115
    worker = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "worker", "-c", "2"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120
        while "worker ready:" not in Path(log.name).read_text(errors="replace"):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start; see {log.name}")
            time.sleep(0.2)
        os.environ.update(AWS, AWS_ENDPOINT_URL=endpoint)
        client = Client(ClientSettings(redis=RedisSettings(url=redis_url), s3=S3Settings(bucket=bucket)))
        started = time.perf_counter()
        job = client.submit(GenerateRequest(model=f"{MODEL}@{VERSION}", label="sneaker", count=images, seed=2))
        first: list[float] = []

        def note_first(view: JobView) -> None:
            if not first and view.progress.done > 0:
                first.append(time.perf_counter() - started)

        view = client.wait(job.id, timeout=600, poll_s=0.05, on_update=note_first)
        elapsed = time.perf_counter() - started
        if view.status is not JobStatus.SUCCEEDED:
            raise RuntimeError(f"benchmark job {view.status.value}: {view.error}")
        return images / elapsed, first[0] if first else elapsed
    finally:
        worker.terminate()
        worker.wait(30)


def _boto() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS["AWS_DEFAULT_REGION"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14", help="a Redis DB this benchmark may flush")
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request otherwise
    redis.Redis.from_url(args.redis).flushdb()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint, bucket = f"http://{host}:{port}", "bench"
    boto3.client("s3", endpoint_url=endpoint, **_boto()).create_bucket(Bucket=bucket)
    try:
        rates = raw_generator([1, 8, 32, 64, 128, 256], args.images)
        best_bs = max(rates, key=lambda bs: rates[bs])
        embedded = embedded_job(args.images)
        put_ceiling = s3_put_ceiling(endpoint, bucket)
        queued, first_s = queued_job(args.images, args.redis, endpoint, bucket)
    finally:
        server.stop()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"model: {MODEL}@{VERSION} (shipped zoo), job: {args.images} images of one label, PNG\n")
    print(f"{'figure':<44}{'value':>12}")
    for bs, rate in rates.items():
        print(f"{f'raw generator, batch {bs} (images/s)':<44}{rate:>12.0f}")
    rows = [
        ("embedded 1,000-image job (images/s)", embedded),
        ("S3 server PUT ceiling (PUT/s, sequential)", put_ceiling),
        ("Redis+worker+S3 1,000-image job (images/s)", queued),
        ("  first image stored after (s)", first_s),
        ("embedded / raw best batch", embedded / rates[best_bs]),
        ("queued / S3 PUT ceiling", queued / put_ceiling),
    ]
    for name, value in rows:
        print(f"{name:<44}{value:>12.2f}")
    print()
    print(f"raw_best_batch={best_bs}")
    print(f"raw_images_per_s_batch1={rates[1]:.0f}")
    print(f"raw_images_per_s_best={rates[best_bs]:.0f}")
    print(f"embedded_job_images_per_s={embedded:.0f}")
    print(f"s3_put_per_s={put_ceiling:.0f}")
    print(f"queued_job_images_per_s={queued:.0f}")
    print(f"queued_first_image_s={first_s:.2f}")


if __name__ == "__main__":
    main()
