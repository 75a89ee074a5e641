"""Published model versions over a real S3 server (moto over HTTP, boto3 unmocked) and a real folder."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import redis
import torch
from tiny_model import TINY_NAME, make_tiny_model

from models.generator import load_generator
from producer.core import constants
from producer.errors import ModelNotFound
from worker.catalog.store import ModelStore, ModelVersionExists
from worker.settings import StorageRetrySettings
from worker.storage.base import Storage
from worker.storage.local import LocalStorage
from worker.storage.s3 import S3Storage

FAST_RETRY = StorageRetrySettings(window_s=10.0, initial_s=0.1, max_s=0.5)


class CountingStorage:
    """A :class:`Storage` that counts the objects read through it."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.gets: list[str] = []
        self.put = inner.put
        self.exists = inner.exists
        self.list = inner.list
        self.url = inner.url
        self.delete_prefix = inner.delete_prefix

    def get(self, key: str) -> bytes:
        self.gets.append(key)
        return self.inner.get(key)


@pytest.fixture(params=["s3", "local"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "s3":
        return S3Storage(request.getfixturevalue("s3_bucket"), FAST_RETRY)
    return LocalStorage(tmp_path / "store")


def tiny_files(tmp_path: Path, seed: int = 0) -> dict[str, bytes]:
    """The files of a tiny cGAN version, as a training worker would publish them."""
    folder = make_tiny_model(tmp_path / f"src-{seed}", seed=seed)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    files["metrics.json"] = b'{"fid": 1.0}'
    files["MODEL_CARD.md"] = b"# tiny\n"
    return files


def test_published_version_is_listed_with_its_aliases(storage: Storage, tmp_path: Path) -> None:
    store = ModelStore(storage, tmp_path / "cache")
    store.publish(TINY_NAME, "1", tiny_files(tmp_path))
    store.publish(TINY_NAME, "2", tiny_files(tmp_path, seed=1))

    entries = store.entries()
    assert list(entries) == [TINY_NAME]
    assert set(entries[TINY_NAME].versions) == {"1", "2"}
    assert entries[TINY_NAME].versions["2"].arch == "cgan"
    assert entries[TINY_NAME].versions["2"].resolution == 28
    assert entries[TINY_NAME].aliases == {"latest": "2"}  # no aliases.json: the highest version

    assert store.set_aliases(TINY_NAME, {"production": "1"}) == {"production": "1"}
    assert store.set_aliases(TINY_NAME, {"latest": "1"}) == {"latest": "1", "production": "1"}
    assert store.entries()[TINY_NAME].aliases == {"latest": "1", "production": "1"}


def test_version_count_uses_natural_order_for_latest(storage: Storage, tmp_path: Path) -> None:
    store = ModelStore(storage, tmp_path / "cache")
    files = tiny_files(tmp_path)
    for version in ("9", "10"):
        store.publish(TINY_NAME, version, files)

    assert store.entries()[TINY_NAME].aliases["latest"] == "10"


def test_fetched_version_loads_and_a_second_fetch_reads_nothing(storage: Storage, tmp_path: Path) -> None:
    ModelStore(storage, tmp_path / "unused").publish(TINY_NAME, "1", tiny_files(tmp_path))
    counting = CountingStorage(storage)
    store = ModelStore(counting, tmp_path / "cache")

    folder = store.fetch(TINY_NAME, "1")

    assert folder == tmp_path / "cache" / TINY_NAME / "1"
    assert sorted(p.name for p in folder.iterdir()) == [
        "MODEL_CARD.md",
        "config.json",
        "metrics.json",
        "weights.safetensors",
    ]
    generator = load_generator(folder)
    assert generator.sample([0, 9], [1, 2]).shape == (2, 1, 28, 28)
    assert len(counting.gets) == 4
    assert [p.name for p in (tmp_path / "cache" / TINY_NAME).iterdir()] == ["1"]  # no temporary folder left

    assert store.fetch(TINY_NAME, "1") == folder
    assert ModelStore(counting, tmp_path / "cache").fetch(TINY_NAME, "1") == folder  # another process, same cache
    assert len(counting.gets) == 4


def test_concurrent_fetches_of_one_version_share_one_complete_folder(storage: Storage, tmp_path: Path) -> None:
    ModelStore(storage, tmp_path / "unused").publish(TINY_NAME, "1", tiny_files(tmp_path))
    barrier = threading.Barrier(4)
    results: list[Path] = []

    def fetch() -> None:
        store = ModelStore(storage, tmp_path / "cache")  # one store each, as separate processes would have
        barrier.wait()
        results.append(store.fetch(TINY_NAME, "1"))

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results == [tmp_path / "cache" / TINY_NAME / "1"] * 4
    assert [p.name for p in (tmp_path / "cache" / TINY_NAME).iterdir()] == ["1"]
    load_generator(results[0])


def test_fetch_that_loses_the_race_uses_the_winners_folder(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    ModelStore(storage, tmp_path / "unused").publish(TINY_NAME, "1", tiny_files(tmp_path))
    winner = ModelStore(storage, tmp_path / "other").fetch(TINY_NAME, "1")
    final = tmp_path / "cache" / TINY_NAME / "1"

    class OtherProcessFinishesFirst(CountingStorage):
        def get(self, key: str) -> bytes:
            if not final.exists():
                shutil.copytree(winner, final)
            return super().get(key)

    folder = ModelStore(OtherProcessFinishesFirst(storage), final.parent.parent).fetch(TINY_NAME, "1")

    assert folder == final
    assert [p.name for p in final.parent.iterdir()] == ["1"]  # our temporary copy was removed
    load_generator(folder)


def test_half_published_version_is_invisible(storage: Storage, tmp_path: Path) -> None:
    store = ModelStore(storage, tmp_path / "cache")
    store.publish(TINY_NAME, "1", tiny_files(tmp_path))
    prefix = constants.MODEL_VERSION_PREFIX.format(name=TINY_NAME, version="2")
    # A publisher that died before writing config.json (it writes it last).
    storage.put(prefix + "weights.safetensors", tiny_files(tmp_path)["weights.safetensors"], "application/octet-stream")

    assert set(store.entries()[TINY_NAME].versions) == {"1"}
    assert store.entries()[TINY_NAME].aliases == {"latest": "1"}
    assert store.has_version(TINY_NAME, "1")
    assert not store.has_version(TINY_NAME, "2")
    assert not store.has_version("..", "1")
    with pytest.raises(ModelNotFound, match=r"tiny-cgan@2 is not published"):
        store.fetch(TINY_NAME, "2")
    assert not (tmp_path / "cache" / TINY_NAME / "2").exists()

    store.publish(TINY_NAME, "2", tiny_files(tmp_path))  # publishing again completes it
    assert set(store.entries()[TINY_NAME].versions) == {"1", "2"}


def test_publish_writes_config_last(tmp_path: Path) -> None:
    order: list[str] = []
    storage = LocalStorage(tmp_path / "store")
    original = storage.put

    def put(key: str, data: bytes, content_type: str) -> None:
        order.append(key.rsplit("/", 1)[-1])
        original(key, data, content_type)

    storage.put = put  # type: ignore[method-assign]
    ModelStore(storage, tmp_path / "cache").publish(TINY_NAME, "1", tiny_files(tmp_path))

    assert order[-1] == "config.json"
    assert sorted(order) == ["MODEL_CARD.md", "config.json", "metrics.json", "weights.safetensors"]


def test_publishing_an_existing_version_is_refused(storage: Storage, tmp_path: Path) -> None:
    store = ModelStore(storage, tmp_path / "cache")
    store.publish(TINY_NAME, "1", tiny_files(tmp_path))

    with pytest.raises(ModelVersionExists, match=r"tiny-cgan@1 is already published"):
        store.publish(TINY_NAME, "1", tiny_files(tmp_path, seed=1))

    key = constants.MODEL_VERSION_PREFIX.format(name=TINY_NAME, version="1") + "weights.safetensors"
    assert storage.get(key) == tiny_files(tmp_path)["weights.safetensors"]  # untouched


def test_version_with_a_bad_config_is_skipped_and_logged(
    storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ModelStore(storage, tmp_path / "cache")
    store.publish(TINY_NAME, "1", tiny_files(tmp_path))
    store.publish(TINY_NAME, "2", {**tiny_files(tmp_path), "config.json": b'{"arch": "cgan"}'})

    with caplog.at_level("WARNING", logger="genq.model_store"):
        entries = store.entries()

    assert set(entries[TINY_NAME].versions) == {"1"}
    assert "tiny-cgan@2" in caplog.text


def test_alias_of_an_unpublished_version_is_refused_and_a_stored_one_ignored(storage: Storage, tmp_path: Path) -> None:
    store = ModelStore(storage, tmp_path / "cache")
    store.publish(TINY_NAME, "1", tiny_files(tmp_path))

    with pytest.raises(ModelNotFound, match=r"tiny-cgan@7"):
        store.set_aliases(TINY_NAME, {"production": "7"})
    storage.put(
        constants.MODEL_ALIASES_OBJECT.format(name=TINY_NAME),
        json.dumps({"latest": "7", "production": "1"}).encode(),
        "application/json",
    )

    assert store.entries()[TINY_NAME].aliases == {"latest": "1", "production": "1"}


@pytest.mark.parametrize(
    ("name", "version"),
    [("..", "1"), ("a/b/c", "1"), ("../b", "1"), ("a/..", "1"), ("/b", "1"), (TINY_NAME, ".."), (TINY_NAME, "1/../2")],
)
def test_names_that_could_leave_their_folder_are_refused(tmp_path: Path, name: str, version: str) -> None:
    store = ModelStore(LocalStorage(tmp_path / "store"), tmp_path / "cache")

    with pytest.raises(ModelNotFound, match="invalid model reference"):
        store.fetch(name, version)
    with pytest.raises(ValueError, match="invalid"):
        store.publish(name, version, tiny_files(tmp_path))
    assert not (tmp_path / "store").exists()


def test_allocate_version_starts_above_the_published_ones(
    storage: Storage, tmp_path: Path, redis_client: redis.Redis
) -> None:
    store = ModelStore(storage, tmp_path / "cache")
    files = tiny_files(tmp_path)
    store.publish(TINY_NAME, "1", files)
    store.publish(TINY_NAME, "2", files)

    assert store.allocate_version(redis_client, TINY_NAME) == "3"
    assert store.allocate_version(redis_client, TINY_NAME) == "4"
    assert store.allocate_version(redis_client, "other-model") == "1"


def test_allocate_version_counts_local_roots_and_a_lost_counter(
    storage: Storage, tmp_path: Path, redis_client: redis.Redis
) -> None:
    root = tmp_path / "zoo"
    make_tiny_model(root, version="5")
    store = ModelStore(storage, tmp_path / "cache", local_roots=[root])

    assert store.allocate_version(redis_client, TINY_NAME) == "6"
    store.publish(TINY_NAME, "6", tiny_files(tmp_path))
    redis_client.delete(constants.MODEL_VERSION_COUNTER_KEY.format(name=TINY_NAME))  # Redis lost its data

    assert store.allocate_version(redis_client, TINY_NAME, local_roots=[]) == "7"
    assert store.allocate_version(redis_client, TINY_NAME) == "8"


def test_concurrent_allocations_get_distinct_versions(
    storage: Storage, tmp_path: Path, redis_client: redis.Redis
) -> None:
    store = ModelStore(storage, tmp_path / "cache")
    store.publish(TINY_NAME, "2", tiny_files(tmp_path))
    barrier = threading.Barrier(6)
    versions: list[str] = []

    def allocate() -> None:
        barrier.wait()
        for _ in range(3):
            versions.append(store.allocate_version(redis_client, TINY_NAME))

    threads = [threading.Thread(target=allocate) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(versions, key=int) == [str(v) for v in range(3, 21)]


def test_published_generator_samples_like_the_original(storage: Storage, tmp_path: Path) -> None:
    original = load_generator(make_tiny_model(tmp_path / "src"))
    store = ModelStore(storage, tmp_path / "cache")
    store.publish(TINY_NAME, "1", tiny_files(tmp_path))

    fetched = load_generator(store.fetch(TINY_NAME, "1"))

    assert torch.equal(fetched.sample([3, 4], [7, 8]), original.sample([3, 4], [7, 8]))


def _published(tmp_path: Path, versions: int) -> tuple[LocalStorage, int]:
    """A store with ``versions`` versions of the tiny model; returns it and the size of one version's files."""
    storage = LocalStorage(tmp_path / "store")
    files = tiny_files(tmp_path)
    for version in range(1, versions + 1):
        ModelStore(storage, tmp_path / "unused").publish(TINY_NAME, str(version), files)
    return storage, sum(len(data) for data in files.values())


def test_the_cache_evicts_least_recently_used_versions_beyond_its_size(tmp_path: Path) -> None:
    storage, size = _published(tmp_path, 3)
    store = ModelStore(storage, tmp_path / "cache", cache_max_bytes=2 * size, cache_grace_s=0.0)
    cache = tmp_path / "cache" / TINY_NAME
    v1 = store.fetch(TINY_NAME, "1")
    store.fetch(TINY_NAME, "2")
    os.utime(v1, (v1.stat().st_atime, v1.stat().st_mtime - 10))  # 1 was fetched long ago ...
    store.fetch(TINY_NAME, "1")  # ... and used again now (a cache hit): 2 is the least recently used
    store.fetch(TINY_NAME, "3")
    assert sorted(p.name for p in cache.iterdir()) == ["1", "3"]
    assert load_generator(store.fetch(TINY_NAME, "2")).sample([1], [1]).shape == (1, 1, 28, 28)  # fetched again


def test_versions_used_within_the_grace_period_are_never_evicted(tmp_path: Path) -> None:
    storage, size = _published(tmp_path, 3)
    store = ModelStore(storage, tmp_path / "cache", cache_max_bytes=size, cache_grace_s=3600.0)
    for version in ("1", "2", "3"):
        store.fetch(TINY_NAME, version)  # another process may be loading any of them: all stay, over the limit
    assert sorted(p.name for p in (tmp_path / "cache" / TINY_NAME).iterdir()) == ["1", "2", "3"]
    deleted = store.evict(now=time.time() + 7200)  # two hours on, nobody used them: down to the limit
    assert [p.name for p in deleted] == ["1", "2"]


def test_an_unbounded_cache_keeps_everything(tmp_path: Path) -> None:
    storage, _ = _published(tmp_path, 2)
    store = ModelStore(storage, tmp_path / "cache")
    store.fetch(TINY_NAME, "1")
    store.fetch(TINY_NAME, "2")
    assert store.evict(now=time.time() + 10**6) == []
