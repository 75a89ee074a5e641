"""Model registry: which models and versions this worker can serve, and a per-process cache of loaded ones.

Versions come from local model roots (the shipped ``models/zoo`` first, then ``GENQ_MODEL_DIRS``) and, when the
registry has a :class:`~worker.catalog.store.ModelStore`, from versions published into object storage by training
workers. Layout of every model root::

    <root>/<name>/<version>/config.json + weights.safetensors
    <root>/<name>/aliases.json              optional {"latest": "<version>", ...}

Local roots win over the store for the same (name, version), and a local ``aliases.json`` wins over the store's for
the aliases it sets, except ``latest`` once versions of the name are published: then ``latest`` is the store's, or
the highest version of all. Without either, ``latest`` names the highest version. A version published after
start-up is found by :meth:`ModelRegistry.path`, which rescans on a miss: no restart needed.

Models are named by their catalogue key (:attr:`producer.contract.ModelEntry.key`): local roots hold system models
(``<name>``); a tenant's fine-tuned models exist only in the store, as ``<tenant>/<name>``, and a worker loads one
only by that key, which a job pins (and validates against its tenant) at submit.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import redis

import models
from models.errors import ModelsError
from models.generator import CONFIG_FILE, Acceleration, ImageGenerator, load_generator, read_config
from producer.contract import ModelEntry, ModelVersionInfo
from producer.core import constants
from producer.errors import ModelNotFound
from worker import telemetry
from worker.catalog.store import METRICS_FILE, ModelStore, version_info, version_key
from worker.errors import ModelLoadError, StorageError, StorageUnavailable

log = logging.getLogger("genq.registry")

ZOO_DIR = Path(models.__file__).parent / "zoo"

_Paths = dict[tuple[str, str], Path]


class ModelRegistry:
    """Finds model versions, describes them for clients, and loads each (name, version) once per process.

    Args:
        roots: local model roots, earlier ones winning on the same (name, version).
        device: torch device the generators are loaded on.
        store: published versions in object storage, downloaded on first use; none by default.
        accel: how the generators run their forward pass (bf16, channels_last, torch.compile); exact fp32 by default.
        max_loaded: generators kept loaded at once; loading one more unloads the least recently used (a worker
            serving many fine-tuned versions would otherwise hold every one it ever served in (GPU) memory).
    """

    def __init__(
        self,
        roots: list[Path],
        device: str = "cpu",
        store: ModelStore | None = None,
        accel: Acceleration | None = None,
        max_loaded: int = 8,
    ) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {max_loaded}")
        self.roots = roots
        self.device = device
        self.store = store
        self.accel = accel
        self.max_loaded = max_loaded
        self._paths: _Paths = {}  # local versions (system models: the key is the name)
        self._published: set[tuple[str, str]] = set()  # (key, version) served from the store (none of them local)
        self._store_entries: dict[str, ModelEntry] = {}  # the store's last good listing, kept while it is down
        self._entries: dict[str, ModelEntry] = {}  # by catalogue key
        self._loaded: OrderedDict[tuple[str, str], ImageGenerator] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self.scan()

    def scan(self) -> dict[str, ModelEntry]:
        """Re-read every root and the store, and return the merged catalogue, by catalogue key.

        A store that cannot be listed (S3 down) is logged and its last good listing kept: the worker goes on
        serving what it knew.
        """
        with self._scan_lock:  # one listing at a time; a thread arriving meanwhile rescans after it
            paths, local, local_aliases = self._scan_roots()
            if self.store is not None:
                try:
                    self._store_entries = self.store.entries(default_latest=False)
                except (StorageUnavailable, StorageError) as exc:
                    known = len(self._store_entries)
                    log.warning("cannot list published models (serving the %d known): %s", known, exc)
            entries: dict[str, ModelEntry] = {}
            published: set[tuple[str, str]] = set()
            for key in sorted(local.keys() | self._store_entries.keys()):
                stored = self._store_entries.get(key)
                owner, name = (stored.owner, stored.name) if stored is not None else (None, key)
                entry = ModelEntry(name=name, owner=owner, versions=dict(local.get(key, {})))
                if stored is not None:
                    for version, info in stored.versions.items():
                        if version not in entry.versions:
                            entry.versions[version] = info
                            published.add((key, version))
                    entry.aliases.update(stored.aliases)
                own = local_aliases.get(key, {})  # local roots hold system models only (no key with an owner)
                if stored is not None:  # versions were published since: "latest" is the newest of all
                    own = {a: v for a, v in own.items() if a != "latest"}
                entry.aliases.update(own)
                dangling = {a: v for a, v in entry.aliases.items() if v not in entry.versions}
                if dangling:
                    log.warning("model %s: ignoring aliases of unknown versions %s", key, dangling)
                    entry.aliases = {a: v for a, v in entry.aliases.items() if a not in dangling}
                if "latest" not in entry.aliases:
                    entry.aliases["latest"] = max(entry.versions, key=version_key)
                entries[key] = entry
            self._paths = paths
            self._published = published
            self._entries = entries
            return self._entries

    def _scan_roots(self) -> tuple[_Paths, dict[str, dict[str, ModelVersionInfo]], dict[str, dict[str, str]]]:
        """Local versions: (folder per (name, version), name -> version -> info, name -> aliases from aliases.json)."""
        paths: _Paths = {}
        versions: dict[str, dict[str, ModelVersionInfo]] = {}
        aliases: dict[str, dict[str, str]] = {}
        for root in self.roots:
            if not root.is_dir():
                log.warning("model root %s does not exist; skipped", root)
                continue
            for name_dir in sorted(p for p in root.iterdir() if p.is_dir()):
                name = name_dir.name
                for version_dir in sorted(p for p in name_dir.iterdir() if (p / CONFIG_FILE).is_file()):
                    key = (name, version_dir.name)
                    if key in paths:
                        continue
                    try:
                        info = version_info(read_config(version_dir), _read_metrics(version_dir))
                    except (ModelsError, KeyError, TypeError, ValueError) as exc:
                        log.warning("skipping %s: %s", version_dir, exc)
                        continue
                    paths[key] = version_dir
                    versions.setdefault(name, {})[version_dir.name] = info
                aliases_file = name_dir / "aliases.json"
                if aliases_file.is_file():
                    try:
                        aliases.setdefault(name, {}).update(json.loads(aliases_file.read_text()))
                    except (TypeError, ValueError) as exc:  # not JSON, or not an object
                        log.warning("ignoring %s: %s", aliases_file, exc)
        return paths, versions, aliases

    def catalog(self) -> dict[str, ModelEntry]:
        return dict(self._entries)

    def path(self, model: str, version: str) -> Path:
        """Folder of a model version, downloading a published one on first use.

        ``model`` is a catalogue key: ``<name>`` (a system model) or ``<tenant>/<name>`` (only that tenant's).

        Raises:
            ModelNotFound: no root and no store has that version (the message lists the versions of the same
                owner's and the system's models only: a job's error never names another tenant's models).
            StorageUnavailable, StorageError: a published version could not be downloaded.
        """
        key = (model, version)
        if key not in self._paths and key not in self._published:
            self.scan()  # a version published after start-up
        if key in self._paths:
            return self._paths[key]
        if key in self._published and self.store is not None:
            return self.store.fetch(model, version)  # downloads once; later calls find the cached folder
        owner, _ = ModelEntry.split_key(model)
        same = [(n, v) for n, v in self._paths.keys() | self._published if ModelEntry.split_key(n)[0] in (None, owner)]
        known = ", ".join(f"{n}@{v}" for n, v in sorted(same)) or "none"
        raise ModelNotFound(f"unknown model {model}@{version} (known: {known})")

    def load(self, name: str, version: str) -> ImageGenerator:
        """The loaded generator for (catalogue key, version), loading (and for a published version, downloading) it
        on first use.

        Raises:
            ModelNotFound: no root and no store has that version.
            ModelLoadError: its files do not load.
            StorageUnavailable, StorageError: a published version could not be downloaded.
        """
        key = (name, version)
        with self._lock:  # one load per model even when several threads ask at once
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            path = self.path(name, version)
            started = time.perf_counter()
            try:
                generator = load_generator(path, self.device, self.accel)
            except ModelsError as exc:
                raise ModelLoadError(f"model {name}@{version} failed to load: {exc}") from exc
            elapsed = time.perf_counter() - started
            telemetry.MODEL_LOAD_SECONDS.observe(elapsed)
            log.info("loaded %s@%s from %s in %.0f ms", name, version, path, 1e3 * elapsed)
            self._loaded[key] = generator
            while len(self._loaded) > self.max_loaded:
                # A forward pass still running on it keeps its own reference; the memory goes when that ends.
                (old_name, old_version), _ = self._loaded.popitem(last=False)
                log.info("unloaded %s@%s: least recently used of %d loaded", old_name, old_version, self.max_loaded)
            return generator

    def loaded(self) -> list[tuple[str, str]]:
        """(name, version) of the generators loaded now, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def preload(self) -> None:
        """Load the ``latest`` version of every local model (at worker start, before any job arrives).

        A version that fails to load or download is logged and left for the first job that needs it.
        """
        for entry in self._entries.values():
            if (entry.key, entry.aliases["latest"]) not in self._paths:
                continue  # a published (fine-tuned) version: loaded by the first job that asks for it
            try:
                self.load(entry.key, entry.aliases["latest"])
            except (ModelLoadError, ModelNotFound, StorageUnavailable, StorageError) as exc:
                log.error("%s", exc)

    def publish(self, client: redis.Redis) -> None:
        """Write the catalogue (local and published models, by catalogue key) to Redis, where clients validate
        requests against it (each caller sees the system's models and its tenant's own)."""
        if self._entries:
            client.hset(constants.CATALOG_KEY, mapping={k: e.model_dump_json() for k, e in self._entries.items()})

    def refresh(self, client: redis.Redis) -> None:
        """Rescan roots and store, then publish the catalogue: call after publishing a version, or periodically."""
        self.scan()
        self.publish(client)


def _read_metrics(version_dir: Path) -> Any:
    """A local version's ``telemetry.json``, or None when it has none (or it is not JSON)."""
    try:
        return json.loads((version_dir / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
