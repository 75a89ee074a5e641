"""The metrics classifier: it learns, trains repeatably, round-trips through safetensors exactly, refuses bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.classifier import (
    CARD_FILE,
    SHIPPED_DIR,
    WEIGHTS_FILE,
    Classifier,
    ClassifierCard,
    ClassifierConfig,
    accuracy,
    augment_batch,
    embed,
    load_classifier,
    save_classifier,
    train_classifier,
)
from models.data import LabelledImages
from models.errors import InvalidModelConfig, WeightsError

TINY = {"widths": (4, 8, 8), "feature_dim": 16}


def separable_data(n: int = 240, seed: int = 0) -> LabelledImages:
    """Four classes, one bright 10x10 square per image quadrant, on a noisy dark background."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 60, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 4
    for c, (top, left) in enumerate([(2, 2), (2, 16), (16, 2), (16, 16)]):
        images[labels == c, :, top : top + 10, left : left + 10] = 230
    return LabelledImages(images, labels, ("nw", "ne", "sw", "se"))


def test_short_training_on_separable_data_reaches_high_accuracy() -> None:
    train, test = separable_data(seed=0), separable_data(120, seed=1)
    config = ClassifierConfig(class_names=train.class_names, **TINY)  # type: ignore[arg-type]
    model = train_classifier(train, epochs=6, batch_size=32, seed=0, augment=False, config=config)
    assert accuracy(model, test) >= 0.95


def test_training_is_repeatable_for_a_seed_and_leaves_the_global_rng_alone() -> None:
    data = separable_data(64)
    config = ClassifierConfig(class_names=data.class_names, **TINY)  # type: ignore[arg-type]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = train_classifier(data, epochs=1, batch_size=16, seed=7, augment=True, config=config)
    assert torch.equal(torch.get_rng_state(), before)
    b = train_classifier(data, epochs=1, batch_size=16, seed=7, augment=True, config=config)
    c = train_classifier(data, epochs=1, batch_size=16, seed=8, augment=True, config=config)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.head.weight, c.head.weight)


def test_save_and_load_round_trip_weights_card_and_outputs_exactly(tmp_path: Path) -> None:
    data = separable_data(64)
    config = ClassifierConfig(class_names=data.class_names, resolution=28, **TINY)  # type: ignore[arg-type]
    model = train_classifier(data, epochs=1, batch_size=32, seed=0, config=config)
    card = ClassifierCard(name="quad", config=config, test_accuracy=0.5, test_split="x", training={"epochs": 1})
    save_classifier(tmp_path, model, card)
    loaded, loaded_card = load_classifier(tmp_path)
    assert loaded_card == card and not loaded.training
    stored = load_file(str(tmp_path / WEIGHTS_FILE))
    for key, value in model.state_dict().items():
        assert torch.equal(stored[key], value), key
    assert torch.equal(embed(loaded, data.images), embed(model, data.images))
    assert not (tmp_path / "config.json").exists()  # the worker's registry would mistake it for a generator


def test_any_resolution_and_channel_count_gives_logits_and_features() -> None:
    config = ClassifierConfig(class_names=("a", "b", "c"), resolution=64, channels=3, **TINY)  # type: ignore[arg-type]
    model = Classifier(config).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert model(x).shape == (2, 3) and model.features(x).shape == (2, 16)


def test_corrupt_mismatched_or_foreign_files_are_refused(tmp_path: Path) -> None:
    config = ClassifierConfig(class_names=("a", "b"), **TINY)  # type: ignore[arg-type]
    save_classifier(tmp_path, Classifier(config), ClassifierCard(name="x", config=config))
    card = json.loads((tmp_path / CARD_FILE).read_text())
    card["config"]["feature_dim"] = 32
    (tmp_path / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="cannot load"):
        load_classifier(tmp_path)  # shapes do not match the card
    card["arch"] = "resnet"
    (tmp_path / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(InvalidModelConfig, match="unknown classifier architecture"):
        load_classifier(tmp_path)
    (tmp_path / CARD_FILE).write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_classifier(tmp_path)
    with pytest.raises(WeightsError, match="no classifier.json"):
        load_classifier(tmp_path / "missing")


@pytest.mark.parametrize(
    "kwargs", [{"class_names": ("a",)}, {"class_names": ("a", "a")}, {"resolution": 4}, {"dropout": 1.0}]
)
def test_bad_classifier_configs_are_refused(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {"class_names": ("a", "b"), **kwargs}
    with pytest.raises(InvalidModelConfig):
        ClassifierConfig(**fields)  # type: ignore[arg-type]


def test_augmentation_shifts_and_flips_without_changing_the_content() -> None:
    x = -torch.ones(8, 1, 12, 12)
    x[:, :, 4:8, 3:6] = 1.0  # a blob at least 2 px from every border
    rng = torch.Generator().manual_seed(0)
    out = augment_batch(x, rng, pad=2, flip=True)
    assert out.shape == x.shape
    assert torch.equal((out > 0).sum(dim=(1, 2, 3)), (x > 0).sum(dim=(1, 2, 3)))  # the blob is never cut
    assert not torch.equal(out, x)
    assert torch.equal(augment_batch(x, rng, pad=0, flip=False), x)


@pytest.mark.skipif(not (SHIPPED_DIR / WEIGHTS_FILE).is_file(), reason="shipped classifier not trained yet")
def test_shipped_fashion_mnist_classifier_loads_and_records_at_least_91_percent() -> None:
    model, card = load_classifier()
    assert card.config.class_names[7] == "sneaker" and card.test_accuracy is not None
    assert card.test_accuracy >= 0.91 and card.training["command"].startswith("python -m models.classifier")
    assert not (SHIPPED_DIR / "config.json").exists()
    assert embed(model, torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).shape == (2, card.config.feature_dim)
