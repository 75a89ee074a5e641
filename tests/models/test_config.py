"""The JSON form every model config shares (models.config.JsonConfig) and the shared image checks (models.layout)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from models import cgan, cvae
from models.augment import AugmentConfig
from models.classifier import SHIPPED_DIR, ClassifierCard, ClassifierConfig
from models.errors import InvalidModelConfig
from models.finetune import FineTuneConfig
from models.layout import LAYOUTS

ZOO = Path(cgan.__file__).parent / "zoo"
CONFIGS: dict[str, type[cgan.CGANConfig] | type[cvae.CVAEConfig]] = {
    cgan.ARCH: cgan.CGANConfig,
    cvae.ARCH: cvae.CVAEConfig,
}


@pytest.mark.parametrize(
    "path", sorted(ZOO.glob("*/*/config.json")), ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}"
)
def test_shipped_generator_configs_load_and_keep_every_written_value(path: Path) -> None:
    data = json.loads(path.read_text())
    config = CONFIGS[data["arch"]].from_json(data)
    written = config.to_json()
    assert {k: written[k] for k in data} == data  # keys the file lacks are written with their defaults
    assert type(config).from_json(json.loads(json.dumps(written))) == config


def test_shipped_classifier_card_is_written_back_byte_for_byte() -> None:
    text = (SHIPPED_DIR / "classifier.json").read_text()
    assert json.dumps(ClassifierCard.from_json(json.loads(text)).to_json(), indent=2) + "\n" == text


def test_tuple_fields_are_written_as_lists_and_read_back_as_tuples() -> None:
    config = ClassifierConfig(class_names=("a", "b"), widths=(4, 8))
    data = config.to_json()
    assert data["class_names"] == ["a", "b"] and data["widths"] == [4, 8]
    assert ClassifierConfig.from_json(data).widths == (4, 8)


def test_nested_config_is_written_and_read_through_its_own_json() -> None:
    config = FineTuneConfig(steps=7, augment=AugmentConfig(policy=("color",), ada_target=0.5))
    data = config.to_json()
    assert data["augment"] == {"policy": ["color"], "ada_target": 0.5, "ada_interval": 4, "ada_kimg": 100.0}
    assert FineTuneConfig.from_json(json.loads(json.dumps(data))) == config
    assert FineTuneConfig.from_json({"steps": 7}).augment == FineTuneConfig().augment


@pytest.mark.parametrize("cls", [cgan.CGANConfig, cvae.CVAEConfig, ClassifierConfig])
def test_unknown_keys_are_ignored_and_missing_class_names_is_an_invalid_config(cls: Any) -> None:
    assert cls.from_json({"class_names": ["a", "b"], "added_later": 1}) == cls(class_names=("a", "b"))
    with pytest.raises(InvalidModelConfig):
        cls.from_json({})


@pytest.mark.parametrize("cls", [cgan.CGANConfig, cvae.CVAEConfig])
def test_both_generators_refuse_a_resolution_without_a_layout_with_the_same_message(cls: Any) -> None:
    with pytest.raises(
        InvalidModelConfig, match=re.escape(f"resolution 16 not supported (choose from {sorted(LAYOUTS)})")
    ):
        cls(class_names=("a",), resolution=16)
