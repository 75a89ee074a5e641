"""A tiny randomly initialised cGAN (a few kB) laid out as a model root, for fast tests of the serving path."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models import cgan
from models.data import FASHION_MNIST_CLASSES
from models.generator import save_generator

TINY_NAME = "tiny-cgan"


def make_tiny_model(root: Path, name: str = TINY_NAME, version: str = "1", seed: int = 0) -> Path:
    """Write ``root/<name>/<version>/`` (weights + config) and ``aliases.json``; return the version folder."""
    torch.manual_seed(seed)
    config = cgan.CGANConfig(class_names=FASHION_MNIST_CLASSES, z_dim=8, g_ch=4, d_ch=4)
    net = cgan.Generator(config)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # eval mode must differ from train mode
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
            if isinstance(module, cgan.ConditionalBatchNorm2d):  # labels must change the image
                module.gain.weight.normal_(1.0, 0.5)
                module.bias.weight.normal_(0.0, 0.5)
    directory = root / name / version
    save_generator(directory, config, net)
    (root / name / "aliases.json").write_text(json.dumps({"latest": version}))
    return directory


def make_tiny_base(root: Path, name: str = "tiny-base", version: str = "1", seed: int = 0) -> Path:
    """A tiny cGAN exported as training does (EMA G + discriminator.safetensors): a base to fine-tune from."""
    from models import train

    config = cgan.CGANConfig(class_names=FASHION_MNIST_CLASSES, z_dim=8, g_ch=4, d_ch=4)
    state = train.new_state(config, train.TrainConfig(seed=seed))
    directory = root / name / version
    train.export(state, config, directory, bn_batches=2)
    (root / name / "aliases.json").write_text(json.dumps({"latest": version}))
    return directory
