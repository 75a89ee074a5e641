"""The model registry over local roots and published versions (real S3 via moto, real Redis)."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
import redis
import torch
from tiny_model import TINY_NAME, make_tiny_model

from models.generator import load_generator
from producer.contract import ModelEntry
from producer.core import constants
from producer.errors import ModelNotFound
from worker.catalog.registry import ModelRegistry
from worker.catalog.store import ModelStore
from worker.errors import StorageUnavailable
from worker.settings import StorageRetrySettings
from worker.storage.base import Storage
from worker.storage.local import LocalStorage
from worker.storage.s3 import S3Storage

FAST_RETRY = StorageRetrySettings(window_s=10.0, initial_s=0.1, max_s=0.5)


def free_port() -> int:
    """A loopback port nothing listens on (the OS just handed it out and took it back)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def version_files(tmp_path: Path, seed: int) -> dict[str, bytes]:
    folder = make_tiny_model(tmp_path / f"src-{seed}", seed=seed)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


class Outage:
    """A :class:`Storage` whose store can be taken down: every call then raises StorageUnavailable."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.down = False

    def __getattr__(self, name: str) -> object:
        if self.down:
            raise StorageUnavailable(f"S3 {name} still failing; check that the object store is up and reachable")
        return getattr(self.inner, name)


@pytest.fixture
def s3_store(s3_bucket: str, tmp_path: Path) -> ModelStore:
    return ModelStore(S3Storage(s3_bucket, FAST_RETRY), tmp_path / "cache")


def test_version_published_after_start_up_is_served_without_a_rebuild(
    s3_store: ModelStore, tmp_path: Path, redis_client: redis.Redis
) -> None:
    registry = ModelRegistry([], store=s3_store)  # a generation worker, started before anything is published
    assert registry.catalog() == {}

    s3_store.publish(TINY_NAME, "1", version_files(tmp_path, seed=0))  # a training worker elsewhere
    generator = registry.load(TINY_NAME, "1")

    assert registry.path(TINY_NAME, "1") == tmp_path / "cache" / TINY_NAME / "1"
    assert generator.sample([2], [5]).shape == (1, 1, 28, 28)
    assert registry.catalog()[TINY_NAME].aliases == {"latest": "1"}

    s3_store.publish(TINY_NAME, "2", version_files(tmp_path, seed=1))
    s3_store.set_aliases(TINY_NAME, {"production": "1"})
    second = registry.load(TINY_NAME, "2")

    assert not torch.equal(second.sample([2], [5]), generator.sample([2], [5]))
    registry.refresh(redis_client)  # what a worker does to announce the new version to clients
    published = ModelEntry.model_validate_json(redis_client.hget(constants.CATALOG_KEY, TINY_NAME) or b"")
    assert set(published.versions) == {"1", "2"}
    assert published.aliases == {"latest": "2", "production": "1"}


def test_unknown_version_is_still_model_not_found(s3_store: ModelStore) -> None:
    registry = ModelRegistry([], store=s3_store)

    with pytest.raises(ModelNotFound, match=r"unknown model tiny-cgan@1 \(known: none\)"):
        registry.path(TINY_NAME, "1")


def test_local_root_wins_over_the_store_for_the_same_version(s3_store: ModelStore, tmp_path: Path) -> None:
    root = tmp_path / "zoo"
    local = make_tiny_model(root, seed=0)
    s3_store.publish(TINY_NAME, "1", version_files(tmp_path, seed=1))
    s3_store.publish(TINY_NAME, "2", version_files(tmp_path, seed=2))
    s3_store.set_aliases(TINY_NAME, {"latest": "2", "production": "2"})

    registry = ModelRegistry([root], store=s3_store)

    assert registry.path(TINY_NAME, "1") == local
    assert registry.path(TINY_NAME, "2") == tmp_path / "cache" / TINY_NAME / "2"
    assert not (tmp_path / "cache" / TINY_NAME / "1").exists()  # the shadowed version is never downloaded
    entry = registry.catalog()[TINY_NAME]
    assert set(entry.versions) == {"1", "2"}
    # make_tiny_model wrote aliases.json {"latest": "1"}; once versions are published for the name, "latest" is the
    # store's (the newest of all), while other local aliases would still win.
    assert entry.aliases == {"latest": "2", "production": "2"}


def test_merged_latest_is_the_highest_version_when_no_aliases_file_sets_it(
    s3_store: ModelStore, tmp_path: Path
) -> None:
    root = tmp_path / "zoo"
    make_tiny_model(root, version="3")
    (root / TINY_NAME / "aliases.json").unlink()
    s3_store.publish(TINY_NAME, "4", version_files(tmp_path, seed=1))

    entry = ModelRegistry([root], store=s3_store).catalog()[TINY_NAME]

    assert entry.aliases == {"latest": "4"}


def test_catalog_published_to_redis_holds_local_and_store_models(
    s3_store: ModelStore, tmp_path: Path, redis_client: redis.Redis
) -> None:
    root = tmp_path / "zoo"
    make_tiny_model(root, name="local-cgan")
    s3_store.publish("tuned-cgan", "1", version_files(tmp_path, seed=1))

    ModelRegistry([root], store=s3_store).publish(redis_client)

    catalog = {k.decode(): json.loads(v) for k, v in redis_client.hgetall(constants.CATALOG_KEY).items()}
    assert set(catalog) == {"local-cgan", "tuned-cgan"}
    assert catalog["tuned-cgan"]["versions"]["1"]["arch"] == "cgan"
    assert catalog["tuned-cgan"]["aliases"] == {"latest": "1"}


def test_unreachable_store_is_logged_and_local_models_still_served(
    aws_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    storage = S3Storage("genq-any", StorageRetrySettings(window_s=0.5, initial_s=0.05, max_s=0.1))
    root = tmp_path / "zoo"
    make_tiny_model(root)

    with caplog.at_level(logging.WARNING, logger="genq.registry"):
        registry = ModelRegistry([root], store=ModelStore(storage, tmp_path / "cache"))

    assert list(registry.catalog()) == [TINY_NAME]
    assert registry.load(TINY_NAME, "1").sample([0], [0]).shape == (1, 1, 28, 28)
    assert "cannot list published models" in caplog.text


def test_store_outage_keeps_the_published_models_already_known(tmp_path: Path) -> None:
    storage = Outage(LocalStorage(tmp_path / "store"))
    store = ModelStore(storage, tmp_path / "cache")  # type: ignore[arg-type]
    store.publish(TINY_NAME, "1", version_files(tmp_path, seed=0))
    registry = ModelRegistry([], store=store)
    registry.path(TINY_NAME, "1")  # downloaded while the store was up

    storage.down = True
    registry.scan()

    assert set(registry.catalog()[TINY_NAME].versions) == {"1"}
    assert registry.load(TINY_NAME, "1").sample([0], [0]).shape == (1, 1, 28, 28)  # from the cache
    with pytest.raises(ModelNotFound):
        registry.path(TINY_NAME, "2")


def test_published_version_not_yet_downloaded_fails_retryably_while_the_store_is_down(tmp_path: Path) -> None:
    storage = Outage(LocalStorage(tmp_path / "store"))
    store = ModelStore(storage, tmp_path / "cache")  # type: ignore[arg-type]
    store.publish(TINY_NAME, "1", version_files(tmp_path, seed=0))
    registry = ModelRegistry([], store=store)

    storage.down = True

    with pytest.raises(StorageUnavailable):
        registry.load(TINY_NAME, "1")
    storage.down = False
    assert load_generator(registry.path(TINY_NAME, "1")).resolution == 28


def test_loading_beyond_max_loaded_unloads_the_least_recently_used(tmp_path: Path) -> None:
    for version, seed in (("1", 0), ("2", 1), ("3", 2)):
        make_tiny_model(tmp_path / "root", version=version, seed=seed)
    registry = ModelRegistry([tmp_path / "root"], max_loaded=2)
    first = registry.load(TINY_NAME, "1")
    registry.load(TINY_NAME, "2")
    assert registry.load(TINY_NAME, "1") is first  # still loaded, and now the most recently used
    registry.load(TINY_NAME, "3")
    assert registry.loaded() == [(TINY_NAME, "1"), (TINY_NAME, "3")]  # 2 went
    again = registry.load(TINY_NAME, "2")  # loads again on demand, the same images as before
    assert torch.equal(again.sample([4], [9]), load_generator(tmp_path / "root" / TINY_NAME / "2").sample([4], [9]))
    assert registry.loaded() == [(TINY_NAME, "3"), (TINY_NAME, "2")]
