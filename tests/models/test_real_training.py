"""A short real training run on Fashion-MNIST: the recipe learns the classes, not just the pixels (marked slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import cgan
from models.classifier import load_classifier
from models.data import load_fashion_mnist, select_classes
from models.generator import load_generator
from models.metrics import label_consistency
from models.train import EXPORT_DIR, TrainConfig, train

pytestmark = pytest.mark.slow

CLASSES = ["trouser", "sneaker", "bag"]  # three classes keep the run short; the shipped classifier judges them


def test_brief_training_on_fashion_mnist_gives_label_consistency_well_above_chance(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = select_classes(load_fashion_mnist("train"), CLASSES)
    # A short run: the EMA ramp-up keeps its average on recent weights (half-life at most 5 % of the steps so far).
    cfg = TrainConfig(steps=800, batch_size=64, ema_start=0, ema_rampup=0.05, sample_every=800, checkpoint_every=800)
    train(data, tmp_path, cfg, cgan.CGANConfig(class_names=data.class_names, g_ch=16, d_ch=16, z_dim=32))

    generator = load_generator(tmp_path / EXPORT_DIR)
    labels = [c for c in range(len(CLASSES)) for _ in range(100)]
    images = generator.sample(labels, list(range(len(labels))))
    classifier, _ = load_classifier()
    names = classifier.cfg.class_names
    score = label_consistency(classifier, images, [names.index(CLASSES[y]) for y in labels])
    # Chance is 1/3 at best (a classifier guessing among the three); the shipped model reaches 0.88 on all ten.
    assert score > 0.6, f"label consistency {score:.3f} after {cfg.steps} steps"
