"""What renditions and the contact sheet cost: one embedded-mode job (the whole pipeline, local folder) per case.

    python -m benchmarks.renditions [--count 64] [--repeats 3]

Runs ``--count`` sneakers of the shipped ``fmnist-cgan`` in-process into a temporary folder, as ``genq generate
--out`` does, once per case: the model's own 28 x 28 PNGs, then the square post, the 4:5 feed and the white product
tile of docs/outputs.md alone and all three at once, each with and without the contact sheet. Reports the best of
``--repeats`` wall times per case, milliseconds per sample and per stored image, and what the sheet adds. Prints one
table, then one ``name=value`` line per figure. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from producer.contract import GenerateRequest
from worker.embedded import run_embedded
from worker.settings import WorkerSettings

POST = {
    "name": "post",
    "size": 1080,
    "fit": "cover",
    "ops": [{"op": "autocontrast", "cutoff": 1}, {"op": "unsharp_mask", "radius": 2, "percent": 120}],
}
FEED = {"name": "feed", "width": 1080, "height": 1350, "fit": "pad", "background": "#000000"}
TILE = {"name": "tile", "width": 1200, "height": 900, "fit": "pad", "background": "#ffffff"}
CASES: dict[str, list[dict[str, Any]] | None] = {
    "native 28x28": None,
    "post 1080x1080": [POST],
    "feed 1080x1350": [FEED],
    "tile 1200x900": [TILE],
    "post+feed+tile": [POST, FEED, TILE],
}


def run(count: int, renditions: list[dict[str, Any]] | None, sheet: int, repeats: int) -> float:
    """Best wall time in seconds of ``repeats`` embedded jobs of ``count`` sneakers."""
    request = GenerateRequest.model_validate(
        {"model": "fmnist-cgan@2", "label": "sneaker", "count": count, "seed": 42, "renditions": renditions}
    )
    settings = WorkerSettings(sheet_images=sheet)
    best = float("inf")
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            run_embedded(request, Path(out), settings)
            best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {args.count} samples"
    )
    print(
        f"{'case':<16} {'images':>6} {'no sheet s':>10} {'ms/sample':>9} {'ms/image':>8} "
        f"{'sheet s':>8} {'sheet adds':>10}"
    )
    figures: dict[str, float] = {}
    for name, renditions in CASES.items():
        images = args.count * len(renditions or [None])
        plain = run(args.count, renditions, 0, args.repeats)
        with_sheet = run(args.count, renditions, 64, args.repeats)
        key = name.split()[0]
        figures |= {
            f"{key}_ms_per_sample": 1000 * plain / args.count,
            f"{key}_ms_per_image": 1000 * plain / images,
            f"{key}_sheet_adds_s": with_sheet - plain,
        }
        print(
            f"{name:<16} {images:>6} {plain:>10.2f} {1000 * plain / args.count:>9.1f} {1000 * plain / images:>8.1f} "
            f"{with_sheet:>8.2f} {with_sheet - plain:>+10.2f}"
        )
    for name, value in figures.items():
        print(f"{name}={value:.3f}")


if __name__ == "__main__":
    main()
