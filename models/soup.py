"""Weight averaging of two cGANs trained from one another (a "model soup", Wortsman et al. 2022; WiSE-FT).

A run that continues a published model moves its weights a short way from that model's; the two then lie in one
basin, and the generator with weights ``w * A + (1 - w) * B`` can score better than either (``fmnist-cgan@5`` covers
more of the real variety than both its halves, docs/models.md). BN running statistics are not averaged: they are
recomputed for the averaged weights (:func:`models.train.recalibrate_bn`, the same recalibration every export
gets). Discriminators are averaged the same way when both models ship one, so a fine-tune of the soup starts from a
matching critic.

Reproduce the shipped ``fmnist-cgan@5`` with::

    python -m models.soup models/zoo/fmnist-cgan/4 runs/dat/export --weight 0.5 --out runs/fmnist-cgan-v5 --threads 1

(one thread: BN recalibration's sums round differently with more, in the last bits of the statistics).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from models import cgan
from models.errors import InvalidModelConfig, WeightsError
from models.generator import WEIGHTS_FILE, read_config, save_generator
from models.grid import class_grid, save_png
from models.train import DISCRIMINATOR_FILE, recalibrate_bn, sample_grid_images

SAMPLES_FILE = "samples.png"  # the soup's own grid: one row per class, seeds 0-9


def average_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    """``weight * a + (1 - weight) * b`` for every float tensor; others (BN's batch count) are ``a``'s.

    Raises:
        WeightsError: the two hold different tensor names or shapes (not one architecture).
    """
    if a.keys() != b.keys():
        raise WeightsError(f"the two models hold different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    mixed = {}
    for name, left in a.items():
        right = b[name]
        if left.shape != right.shape:
            raise WeightsError(f"{name}: shape {tuple(left.shape)} against {tuple(right.shape)}")
        mixed[name] = weight * left + (1.0 - weight) * right if left.is_floating_point() else left.clone()
    return mixed


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"no {path.name} in {path.parent}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"cannot read {path}: {exc}") from exc


def soup(a: Path, b: Path, weight: float, out: Path, bn_batches: int = 50) -> None:
    """Write to ``out`` the cGAN whose weights are ``weight`` of ``a``'s and ``1 - weight`` of ``b``'s, with BN
    statistics recalibrated, and its sample grid (``samples.png``); and their averaged discriminators when both
    folders have one.

    Raises:
        InvalidModelConfig: ``weight`` is outside [0, 1], or the two configs differ (another architecture, width,
            class list): only networks of one configuration average.
        WeightsError: a folder lacks its config or weights, or they cannot be read.
    """
    if not 0.0 <= weight <= 1.0:
        raise InvalidModelConfig(f"weight must be between 0 and 1, got {weight}")
    config_a, config_b = read_config(a), read_config(b)
    if config_a.get("arch") != cgan.ARCH:
        raise InvalidModelConfig(f"{a} is a {config_a.get('arch')!r}, not a {cgan.ARCH}: only cGANs are averaged")
    if config_a != config_b:
        differ = sorted(k for k in config_a.keys() | config_b.keys() if config_a.get(k) != config_b.get(k))
        raise InvalidModelConfig(f"{a} and {b} differ in {', '.join(differ)}: only one configuration averages")
    model_cfg = cgan.CGANConfig.from_json(config_a)
    net = cgan.Generator(model_cfg)
    mixed = average_state(_tensors(a / WEIGHTS_FILE), _tensors(b / WEIGHTS_FILE), weight)
    _load(net, mixed, a / WEIGHTS_FILE)
    recalibrate_bn(net, batches=bn_batches)  # replaces the averaged statistics: the mix never produced them
    save_generator(out, model_cfg, net)
    seeds = list(range(10))
    save_png(class_grid(sample_grid_images(net, model_cfg, seeds), len(seeds)), out / SAMPLES_FILE)
    if (a / DISCRIMINATOR_FILE).is_file() and (b / DISCRIMINATOR_FILE).is_file():
        d = cgan.Discriminator(model_cfg)
        d_mixed = average_state(_tensors(a / DISCRIMINATOR_FILE), _tensors(b / DISCRIMINATOR_FILE), weight)
        _load(d, d_mixed, a / DISCRIMINATOR_FILE)
        save_model(d, str(out / DISCRIMINATOR_FILE), metadata={"arch": model_cfg.arch})


def _load(net: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{source} does not fit its config: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> None:
    """Average two cGAN folders of one configuration into a servable model folder."""
    parser = argparse.ArgumentParser(prog="python -m models.soup", description=main.__doc__)
    parser.add_argument("a", type=Path, help="model folder (config.json + weights.safetensors)")
    parser.add_argument("b", type=Path, help="model folder of the same configuration")
    parser.add_argument("--weight", type=float, default=0.5, help="share of A's weights (default 0.5)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        soup(args.a, args.b, args.weight, args.out)
    except (InvalidModelConfig, WeightsError) as exc:
        parser.exit(2, f"error: {exc}\n")
    command = shlex.join(["python", "-m", "models.soup", *(argv if argv is not None else sys.argv[1:])])
    print(f"wrote {args.out} ({command})")


if __name__ == "__main__":
    main()
