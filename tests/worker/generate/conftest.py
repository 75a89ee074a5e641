"""Fixtures of the generate pipeline's tests: the tiny model's registry and an upload pool, one per module."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from tiny_model import make_tiny_model

from worker.catalog.registry import ModelRegistry


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    root = tmp_path_factory.mktemp("zoo")
    make_tiny_model(root)
    return ModelRegistry([root])


@pytest.fixture(scope="module")
def uploads() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as pool:
        yield pool
