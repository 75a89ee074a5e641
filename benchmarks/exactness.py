"""Does an image depend on the batch it rides in, on this device, under each forward-pass option? And how fast is each?

    python -m benchmarks.exactness [--device cuda] [--batch 256] [--size 64]

genq promises that the same (model version, label, seed) gives the same image whatever batch it rides in: exactly
in the default mode (fp32, eager, contiguous), within a grey level or two under the accelerated options. The tests
prove it on the CPU; this checks it where kernels differ — on a GPU, cuDNN may pick another convolution algorithm
for another batch size. For the shipped Fashion-MNIST cGAN and cVAE and the 64x64 benchmark configuration of the
cGAN (random weights), under each option set, it samples ``--batch`` images at once and again in chunks of 1, 7 and
64, then reports how many images differ from the one-batch run and by how much at most, how far the option set's
images are from fp32 eager's, and its images/s at the full batch. Prints one table, then one ``name=value`` line
per figure. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.throughput import make_model
from models.generator import Acceleration, load_generator
from worker.catalog.registry import ZOO_DIR
from worker.memory import MallocPolicy, tune_malloc

OPTIONS = {
    "fp32": Acceleration(),
    "channels_last": Acceleration(channels_last=True),
    "bf16+channels_last": Acceleration(bf16=True, channels_last=True),
    "bf16+channels_last+compile": Acceleration(bf16=True, channels_last=True, compile_backend="inductor"),
}
CHUNKS = (1, 7, 64)


def models(root: Path, size: int) -> dict[str, Path]:
    """The shipped generators and the benchmark configuration at ``size`` px (random weights, written to ``root``)."""
    bench, directory = make_model(size, root)
    shipped = {name: ZOO_DIR / name for name in ("fmnist-cgan/1", "fmnist-cvae/2")}
    return {**shipped, bench: directory}


def check(directory: Path, device: str, accel: Acceleration, batch: int, seconds: float) -> dict[str, float]:
    """Per-batch stability, distance from fp32 eager (on the same device) and images/s of one option set."""
    labels, seeds = [i % 10 for i in range(batch)], list(range(1000, 1000 + batch))
    model = load_generator(directory, device, accel)
    whole = model.sample(labels, seeds).int()  # (B, C, H, W); also the warm-up of the full batch's graph
    differ, worst = 0, 0
    for chunk in CHUNKS:
        parts = [model.sample(labels[i : i + chunk], seeds[i : i + chunk]) for i in range(0, batch, chunk)]
        diff = (torch.cat(parts).int() - whole).abs().flatten(1).amax(dim=1)  # (B,) worst pixel per image
        differ, worst = max(differ, int((diff > 0).sum())), max(worst, int(diff.max()))
    exact = load_generator(directory, device).sample(labels, seeds).int()
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or n == 0:
        model.sample(labels, seeds)  # returns on the CPU: the device has finished
        n += batch
    return {
        "images_differing_across_batches": differ,
        "max_grey_levels_across_batches": worst,
        "mean_grey_levels_from_fp32": float((whole - exact).abs().float().mean()),
        "max_grey_levels_from_fp32": int((whole - exact).abs().max()),
        "images_per_s": n / (time.perf_counter() - started),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device (cuda on a GPU)")
    parser.add_argument("--batch", type=int, default=256, help="images sampled at once, then again in chunks")
    parser.add_argument("--size", type=int, default=64, choices=[32, 64], help="side of the benchmark configuration")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per (model, option set)")
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    args = parser.parse_args()
    tune_malloc(2, MallocPolicy.KEEP)  # as a worker runs: CPU forward passes are as fast as the allocator lets them
    if args.device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(args.device)
    else:
        device_name = f"{platform.machine()}, {torch.get_num_threads()} torch threads"
    print(f"device: {args.device} ({device_name}), torch {torch.__version__}, batch {args.batch}, chunks {CHUNKS}")
    rows: list[tuple[str, str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="genq-exactness-") as tmp:
        for name, directory in models(Path(tmp), args.size).items():
            for option in args.options:
                rows.append((name, option, check(directory, args.device, OPTIONS[option], args.batch, args.seconds)))
                figures = rows[-1][2]
                print(
                    f"{name:<16}{option:<28}{figures['images_differing_across_batches']:>6.0f} differ across batches"
                    f" (max {figures['max_grey_levels_across_batches']:.0f} grey levels); from fp32: mean "
                    f"{figures['mean_grey_levels_from_fp32']:.3f}, max {figures['max_grey_levels_from_fp32']:.0f};"
                    f" {figures['images_per_s']:>10.1f} images/s",
                    flush=True,
                )
    print()
    for name, option, figures in rows:
        for figure, value in figures.items():
            key = f"{name}_{option}_{figure}".replace("/", "_v").replace("-", "_").replace("+", "_")
            print(f"{key}={value:.3f}")


if __name__ == "__main__":
    main()
