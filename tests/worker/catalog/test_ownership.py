"""Owners in the model store and the registry (real S3 via moto, real Redis): each tenant a namespace of its own,
the system's models apart, a worker loading a tenant's version only by its owner-qualified key."""

from __future__ import annotations

import json
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
from worker.settings import StorageRetrySettings
from worker.storage.s3 import S3Storage

FAST_RETRY = StorageRetrySettings(window_s=10.0, initial_s=0.1, max_s=0.5)


@pytest.fixture
def store(s3_bucket: str, tmp_path: Path) -> ModelStore:
    return ModelStore(S3Storage(s3_bucket, FAST_RETRY), tmp_path / "cache")


def files(tmp_path: Path, seed: int) -> dict[str, bytes]:
    folder = make_tiny_model(tmp_path / f"src-{seed}", seed=seed)
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_two_tenants_models_of_one_name_and_the_systems_are_three_models(
    store: ModelStore, tmp_path: Path, redis_client: redis.Redis
) -> None:
    store.publish("brand-x", "1", files(tmp_path, 0))
    store.publish("acme/brand-x", "1", files(tmp_path, 1))
    store.publish("globex/brand-x", "1", files(tmp_path, 2))
    store.set_aliases("acme/brand-x", {"production": "1"})

    keys = store.storage.list("")
    assert "tenant-models/acme/brand-x/1/config.json" in keys and "tenant-models/globex/brand-x/1/config.json" in keys
    assert "models/brand-x/1/config.json" in keys and "tenant-models/acme/brand-x/aliases.json" in keys
    entries = store.entries()
    assert [(k, e.owner, e.name) for k, e in entries.items()] == [
        ("acme/brand-x", "acme", "brand-x"),
        ("brand-x", None, "brand-x"),
        ("globex/brand-x", "globex", "brand-x"),
    ]
    assert entries["acme/brand-x"].aliases == {"latest": "1", "production": "1"}
    assert entries["globex/brand-x"].aliases == {"latest": "1"} and entries["brand-x"].aliases == {"latest": "1"}
    # one counter per owner and name
    assert store.allocate_version(redis_client, "acme/brand-x") == "2"
    assert store.allocate_version(redis_client, "acme/brand-x") == "3"
    assert store.allocate_version(redis_client, "globex/brand-x") == "2"
    assert store.allocate_version(redis_client, "brand-x") == "2"
    assert store.allocate_version(redis_client, "initech/brand-x") == "1"


def test_a_worker_loads_each_tenants_version_from_its_own_files_and_never_confuses_them(
    store: ModelStore, tmp_path: Path, redis_client: redis.Redis
) -> None:
    store.publish("acme/brand-x", "1", files(tmp_path, 1))
    store.publish("globex/brand-x", "1", files(tmp_path, 2))
    registry = ModelRegistry([], store=store)

    acme = registry.load("acme/brand-x", "1").sample([3], [7])
    globex = registry.load("globex/brand-x", "1").sample([3], [7])

    assert not torch.equal(acme, globex)
    assert torch.equal(acme, load_generator(make_tiny_model(tmp_path / "again", seed=1)).sample([3], [7]))
    assert registry.path("acme/brand-x", "1") == tmp_path / "cache" / "_tenants" / "acme" / "brand-x" / "1"
    with pytest.raises(ModelNotFound):
        registry.path("brand-x", "1")  # the bare name is a system model: there is none
    registry.publish(redis_client)
    published = {
        k.decode(): ModelEntry.model_validate_json(v) for k, v in redis_client.hgetall(constants.CATALOG_KEY).items()
    }
    assert {k: e.owner for k, e in published.items()} == {"acme/brand-x": "acme", "globex/brand-x": "globex"}


def test_a_missing_version_error_names_no_other_tenants_models(store: ModelStore, tmp_path: Path) -> None:
    root = tmp_path / "zoo"
    make_tiny_model(root)
    store.publish("globex/secret-x", "1", files(tmp_path, 2))
    store.publish("acme/brand-x", "1", files(tmp_path, 1))
    registry = ModelRegistry([root], store=store)

    with pytest.raises(ModelNotFound) as info:
        registry.path("acme/brand-x", "9")
    assert "acme/brand-x@1" in str(info.value) and f"{TINY_NAME}@1" in str(info.value)
    assert "globex" not in str(info.value)


@pytest.mark.parametrize("key", ["acme/../brand-x", "acme/brand-x/1", "../brand-x", "/brand-x", "acme/", "a b/x"])
def test_keys_that_could_leave_a_namespace_are_refused(store: ModelStore, tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        store.publish(key, "1", files(tmp_path, 0))
    with pytest.raises(ModelNotFound, match="invalid model reference"):
        store.fetch(key, "1")
    assert store.storage.list("") == [] and not store.has_version(key, "1")


def test_objects_outside_the_layout_are_not_models(store: ModelStore, tmp_path: Path) -> None:
    body = files(tmp_path, 0)["config.json"]
    for key in ("tenant-models/config.json", "tenant-models/acme/config.json", "tenant-models/.x/m/1/config.json"):
        store.storage.put(key, body, "application/json")
    assert store.entries() == {}


def test_evicting_the_cache_deletes_tenants_version_folders_not_their_namespaces(
    s3_bucket: str, tmp_path: Path
) -> None:
    store = ModelStore(S3Storage(s3_bucket, FAST_RETRY), tmp_path / "cache", cache_max_bytes=0, cache_grace_s=0)
    store.publish("acme/brand-x", "1", files(tmp_path, 1))
    store.publish("acme/brand-x", "2", files(tmp_path, 2))
    store.publish(TINY_NAME, "1", files(tmp_path, 0))
    first = store.fetch("acme/brand-x", "1")
    system = store.fetch(TINY_NAME, "1")  # evicts acme's version 1, keeps the one just fetched
    second = store.fetch("acme/brand-x", "2")  # evicts the system version

    assert not first.exists() and not system.exists() and second.is_dir()
    assert (tmp_path / "cache" / "_tenants" / "acme" / "brand-x").is_dir()


def test_an_operator_publishes_a_system_model_folder_above_every_local_version(
    s3_bucket: str, tmp_path: Path, redis_client: redis.Redis
) -> None:
    root = tmp_path / "zoo"
    make_tiny_model(root, version="3")
    store = ModelStore(S3Storage(s3_bucket, FAST_RETRY), tmp_path / "cache", local_roots=[root])
    export = make_tiny_model(tmp_path / "run", seed=4)
    (export / ".DS_Store").write_bytes(b"litter")
    (export / "metrics.json").write_text(json.dumps({"fid": 12.5}))

    version, aliases = store.publish_folder(redis_client, TINY_NAME, export, ["production"])

    assert version == "4" and aliases == {"latest": "4", "production": "4"}
    assert sorted(k.rsplit("/", 1)[1] for k in store.storage.list(f"models/{TINY_NAME}/4/")) == [
        "config.json",
        "metrics.json",
        "weights.safetensors",
    ]
    entry = ModelRegistry([root], store=store).catalog()[TINY_NAME]
    assert entry.owner is None and entry.aliases == {"latest": "4", "production": "4"}
    assert entry.versions["4"].metrics == {"fid": 12.5}


def test_a_folder_that_does_not_load_is_refused_before_a_version_is_taken(
    store: ModelStore, tmp_path: Path, redis_client: redis.Redis
) -> None:
    broken = make_tiny_model(tmp_path / "run")
    (broken / "weights.safetensors").write_bytes(b"not safetensors")

    with pytest.raises(ValueError, match="not a model folder that loads"):
        store.publish_folder(redis_client, TINY_NAME, broken)
    assert store.storage.list("") == [] and redis_client.keys("genq:model:*") == []
