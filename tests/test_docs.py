"""The docs stay true: every setting is documented, nothing documented is made up, the README opens as promised."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from producer.settings import ClientSettings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent


def _leaves(model: type[BaseModel], prefix: str = "GENQ_") -> Iterator[str]:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaves(annotation, f"{prefix}{name.upper()}__")
        else:
            yield f"{prefix}{name.upper()}"


def test_every_setting_is_in_the_operations_table_and_every_documented_one_exists() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"^\| `(GENQ_[A-Z0-9_]+)`", text, flags=re.M))
    real = set(_leaves(WorkerSettings)) | set(_leaves(ClientSettings))
    assert real - documented == set(), "settings missing from docs/operations.md"
    assert documented - real == set(), "docs/operations.md documents settings that do not exist"


def test_readme_opens_with_the_embedded_command_and_the_test_command() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```")]
    assert len(block) == 2
    assert "genq generate --model fmnist-cgan --label sneaker --count 8 --seed 42 --out ./out" in block[0]
    assert block[1].startswith("python -m pytest -q")
    command = block[1].split("#", 1)[0].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci  # CI runs the README's test command, exactly
