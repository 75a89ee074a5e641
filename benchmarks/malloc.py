"""What glibc malloc's handling of freed memory costs a CPU worker, per GENQ_MALLOC_POLICY, measured in one run.

    python -m benchmarks.malloc [--quick] [--redis redis://127.0.0.1:6379/14] [--images 6000] [--max-batch 8]
    python -m benchmarks.malloc --sweep      # max_batch 8..64 under keep, the 28x28 and the 64x64 model

For each policy (keep, glibc, release), in a fresh process that applied it the way `genq worker` does:
(1) the raw 64x64 generator's images/s and minor page faults per image at batch 1 to 128;
(2) cGAN training steps/s and page faults per step (28x28, batch 64, random data: the work of a fine-tune);
(3) one webdataset job of ``--images`` images end to end (Redis -> `genq worker` -> moto S3) at ``--max-batch``:
    images/s and the worker's peak RSS.
Prints one table, then one `name=value` line per figure. Nothing here is asserted.

--sweep instead runs one webdataset job per max_batch (8, 16, 32, 64) under ``keep``, a fresh worker each, for the
shipped 28x28 model (20,000 images) and the 64x64 configuration (6,000): images/s and peak RSS, to choose max_batch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.throughput import bulk_images_per_s, make_model, peak_rss_mib, start_s3, worker
from producer.client import Client
from worker.memory import MallocPolicy, tune_malloc

BATCHES = [1, 8, 32, 64, 128]


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def probe_raw(seconds: float) -> dict[str, float]:
    """images/s and page faults per image of the raw generator at each batch size, in this process."""
    from models.generator import load_generator

    _, directory = make_model(64, Path(tempfile.mkdtemp(prefix="genq-malloc-")))
    model = load_generator(directory, "cpu")
    out: dict[str, float] = {}
    for bs in BATCHES:
        model.sample([0] * bs, list(range(bs)))  # warm-up
        n, f0, started = 0, faults(), time.perf_counter()
        while time.perf_counter() - started < seconds or n == 0:
            model.sample([i % 10 for i in range(bs)], list(range(n, n + bs)))
            n += bs
        out[f"raw_b{bs}_images_per_s"] = n / (time.perf_counter() - started)
        out[f"raw_b{bs}_faults_per_image"] = (faults() - f0) / n
    return out


def probe_train(seconds: float) -> dict[str, float]:
    """Training steps/s and page faults per step of the 28x28 cGAN at batch 64, in this process."""
    from models import cgan
    from models.data import FASHION_MNIST_CLASSES
    from models.train import TrainConfig, new_state, train_step

    cfg = TrainConfig(batch_size=64)
    state = new_state(cgan.CGANConfig(class_names=FASHION_MNIST_CLASSES), cfg)
    real, labels = torch.rand(64, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (64,))
    for _ in range(3):
        train_step(state, real, labels, cfg)
    n, f0, started = 0, faults(), time.perf_counter()
    while time.perf_counter() - started < seconds or n == 0:
        train_step(state, real, labels, cfg)
        n += 1
    return {"train_steps_per_s": n / (time.perf_counter() - started), "train_faults_per_step": (faults() - f0) / n}


def in_child(policy: MallocPolicy, seconds: float) -> dict[str, float]:
    """Run both probes in a fresh process under ``policy`` (this process's heap has its own history)."""
    code = f"import json; from benchmarks.malloc import child; print(json.dumps(child({policy.value!r}, {seconds})))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {policy.value} probe failed:\n{done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def child(policy: str, seconds: float) -> dict[str, float]:
    tune_malloc(2, MallocPolicy(policy))  # as `genq worker` does at start-up, before any tensor is allocated
    return probe_raw(seconds) | probe_train(seconds * 4)


def sweep(client: Client, redis_url: str, endpoint: str, bucket: str, root: Path) -> None:
    """One webdataset job per max_batch under ``keep``, per model; prints images/s and the worker's peak RSS."""
    sizes = {28: 20_000, 64: 6_000}
    batches = [8, 16, 32, 64]
    rows: dict[int, list[tuple[float, float]]] = {}
    for size, images in sizes.items():
        model, _ = make_model(size, root)
        rows[size] = []
        for max_batch in batches:
            conf = {"malloc_policy": "keep", "batching__max_batch": str(max_batch)}
            with worker(redis_url, endpoint, bucket, root, **conf) as proc:
                rate = bulk_images_per_s(client, model, images, "webdataset")
                rows[size].append((rate, peak_rss_mib(proc.pid)))
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}; malloc keep; webdataset jobs\n")
    print(f"{'model (images/s / worker peak RSS MiB)':<44}" + "".join(f"{f'max_batch {b}':>16}" for b in batches))
    for size, images in sizes.items():
        cells = "".join(f"{f'{rate:.1f} / {rss:.0f}':>16}" for rate, rss in rows[size])
        print(f"{f'{size}x{size}, {images}-image job':<44}{cells}")
    print()
    for size in sizes:
        for max_batch, (rate, rss) in zip(batches, rows[size], strict=True):
            print(f"sweep_{size}px_b{max_batch}_images_per_s={rate:.3f}")
            print(f"sweep_{size}px_b{max_batch}_peak_rss_mib={rss:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter probes and a 1,000-image job")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14", help="a Redis DB this benchmark may flush")
    parser.add_argument("--images", type=int, default=6000, help="images in the end-to-end job (a multiple of 10)")
    parser.add_argument("--max-batch", type=int, default=8, help="GENQ_BATCHING__MAX_BATCH of the workers")
    parser.add_argument("--sweep", action="store_true", help="max_batch 8..64 under keep instead (about 10 min)")
    args = parser.parse_args()
    seconds, images = (1.0, 1000) if args.quick else (3.0, args.images)
    policies = list(MallocPolicy)

    from producer.core.settings import Limits, RedisSettings, S3Settings
    from producer.settings import ClientSettings

    results = {} if args.sweep else {policy: in_child(policy, seconds) for policy in policies}
    bucket = "bench"
    server, endpoint = start_s3(bucket)
    root = Path(tempfile.mkdtemp(prefix="genq-bench-models-"))
    model, _ = make_model(64, root)
    client = Client(
        ClientSettings(
            redis=RedisSettings(url=args.redis),
            s3=S3Settings(bucket=bucket),
            limits=Limits(max_images_per_job=max(images, 20_000)),
        )
    )
    if args.sweep:
        try:
            sweep(client, args.redis, endpoint, bucket, root)
        finally:
            server.stop()
        return
    try:
        for policy in policies:
            conf = {"malloc_policy": policy.value, "batching__max_batch": str(args.max_batch)}
            with worker(args.redis, endpoint, bucket, root, **conf) as proc:
                results[policy]["job_images_per_s"] = bulk_images_per_s(client, model, images, "webdataset")
                results[policy]["job_peak_rss_mib"] = peak_rss_mib(proc.pid)
    finally:
        server.stop()

    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads")
    print(f"job: {images} images, webdataset, max_batch {args.max_batch}; quick={args.quick}\n")
    print(f"{'figure':<44}" + "".join(f"{p.value:>10}" for p in policies) + f"{'keep/glibc':>12}")
    rows = [(f"raw batch {bs} (images/s)", f"raw_b{bs}_images_per_s") for bs in BATCHES]
    rows += [(f"raw batch {bs} (page faults per image)", f"raw_b{bs}_faults_per_image") for bs in BATCHES]
    rows += [
        ("training steps/s (28x28, batch 64)", "train_steps_per_s"),
        ("training page faults per step", "train_faults_per_step"),
        (f"{images}-image job (images/s)", "job_images_per_s"),
        (f"{images}-image job, worker peak RSS (MiB)", "job_peak_rss_mib"),
    ]
    for label, key in rows:
        values = [results[p][key] for p in policies]
        glibc = results[MallocPolicy.GLIBC][key]
        ratio = f"{results[MallocPolicy.KEEP][key] / glibc:>12.2f}" if glibc else ""
        print(f"{label:<44}" + "".join(f"{v:>10.1f}" for v in values) + ratio)
    print()
    for policy in policies:
        for key, value in results[policy].items():
            print(f"{policy.value}_{key}={value:.3f}")


if __name__ == "__main__":
    main()
