"""Published model versions in object storage, and a local cache of the ones this process serves.

Training workers publish fine-tuned versions here; generation workers find them by listing (see
:class:`worker.catalog.registry.ModelRegistry`) and download a version once, on first use. Every model has an owner:
the system (shipped and operator-published models) or one tenant, each tenant a namespace of its own. A model is
named by its catalogue key (:attr:`producer.contract.ModelEntry.key`): ``<name>`` for the system's, ``<tenant>/<name>``
for a tenant's. Layout under the :class:`~worker.storage.base.Storage` (S3 in production, a local folder in embedded
mode)::

    models/<name>/<version>/config.json, weights.safetensors, metrics.json, samples.png, MODEL_CARD.md, ...
    models/<name>/aliases.json              {"latest": "3", "production": "2"}
    tenant-models/<tenant>/<name>/<version>/...            the same for a tenant's model
    tenant-models/<tenant>/<name>/aliases.json

A version exists once its ``config.json`` does: :meth:`ModelStore.publish` writes it last, so a reader never sees
half a version. Published versions are immutable, which is what lets readers cache them (parsed config in memory,
files on disk) without ever checking again. Versions are integers as strings, handed out by
:meth:`ModelStore.allocate_version`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from models.errors import ModelsError
from models.generator import CONFIG_FILE, load_generator, read_config
from producer.contract import TENANT_PATTERN, ModelEntry, ModelVersionInfo, headline_metrics
from producer.core import constants
from producer.core.scripts import read_lua
from producer.errors import ModelNotFound, Permanent
from worker.errors import ObjectNotFound
from worker.storage.base import Storage

__all__ = ["ModelPlace", "ModelStore", "ModelVersionExists", "version_info", "version_key"]

log = logging.getLogger("genq.model_store")

ALIASES_FILE = "aliases.json"
METRICS_FILE = "metrics.json"  # a version's scores, written beside its weights (headline ones go in the catalogue)
# Names of models, versions, aliases and files: one path segment that cannot climb out of its folder.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TENANT_RE = re.compile(TENANT_PATTERN)
_TEMP_PREFIX = ".genq-tmp-"
# Tenants' versions in the cache: cache_dir/_tenants/<tenant>/<name>/<version>/ (no model is named "_tenants").
_TENANTS_CACHE_DIR = "_tenants"
_CONTENT_TYPES = {
    ".json": "application/json",
    ".md": "text/markdown; charset=utf-8",
    ".png": "image/png",
    ".safetensors": "application/octet-stream",
}
_ALLOCATE_SCRIPT = read_lua(__package__, "allocate_version.lua")


class ModelVersionExists(Permanent, FileExistsError):
    """That model version is already published; versions are immutable: publish under a new version number."""


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order: "10" after "9", "1.10" after "1.9"."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[._-]", version))


def version_info(config: Any, metrics: Any = None) -> ModelVersionInfo:
    """What the catalogue says about a version, from its parsed ``config.json`` (and ``metrics.json``, if any).

    Raises:
        KeyError, TypeError, ValueError: the config lacks a field or has one of the wrong type.
    """
    return ModelVersionInfo(
        arch=config["arch"],
        class_names=list(config["class_names"]),
        resolution=int(config["resolution"]),
        channels=int(config["channels"]),
        metrics=headline_metrics(metrics),
    )


def is_valid_name(value: str) -> bool:
    """Whether ``value`` can name a model, version, alias or file: one path segment, no ``/``, not ``.``/``..``."""
    return _NAME_RE.fullmatch(value) is not None


def _check_name(kind: str, value: str) -> None:
    if not is_valid_name(value):
        raise ValueError(
            f"invalid {kind} {value!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


@dataclass(frozen=True)
class ModelPlace:
    """Where one model's files live: the system's under ``models/<name>/``, a tenant's in its own namespace."""

    owner: str | None  # None: the system
    name: str

    @classmethod
    def of(cls, model: str) -> ModelPlace:
        """The place of the model a catalogue key names (``<name>`` or ``<tenant>/<name>``).

        Raises:
            ValueError: the key is not a valid model or tenant name (nothing that could leave its folder).
        """
        place = cls.checked(*ModelEntry.split_key(model))
        if place.key != model:  # "/name": an empty owner is no owner
            raise ValueError(f"invalid model key {model!r}: use <name> or <tenant>/<name>")
        return place

    @classmethod
    def checked(cls, owner: str | None, name: str) -> ModelPlace:
        """The place of ``owner``'s model ``name``; raises ValueError for an invalid owner or name."""
        _check_name("model name", name)
        if owner is not None and _TENANT_RE.fullmatch(owner) is None:
            raise ValueError(f"invalid model owner {owner!r}: not a tenant name")
        return cls(owner, name)

    @property
    def key(self) -> str:
        return ModelEntry.key_of(self.owner, self.name)

    @property
    def prefix(self) -> str:
        """Every object of the model starts with this (versions and aliases)."""
        if self.owner is None:
            return f"{constants.MODELS_PREFIX}{self.name}/"
        return f"{constants.TENANT_MODELS_PREFIX}{self.owner}/{self.name}/"

    def version_prefix(self, version: str) -> str:
        if self.owner is None:
            return constants.MODEL_VERSION_PREFIX.format(name=self.name, version=version)
        return constants.TENANT_MODEL_VERSION_PREFIX.format(tenant=self.owner, name=self.name, version=version)

    @property
    def aliases_object(self) -> str:
        if self.owner is None:
            return constants.MODEL_ALIASES_OBJECT.format(name=self.name)
        return constants.TENANT_MODEL_ALIASES_OBJECT.format(tenant=self.owner, name=self.name)

    @property
    def version_counter(self) -> str:
        """The Redis counter of the model's version numbers."""
        if self.owner is None:
            return constants.MODEL_VERSION_COUNTER_KEY.format(name=self.name)
        return constants.TENANT_MODEL_VERSION_COUNTER_KEY.format(tenant=self.owner, name=self.name)

    def cache_folder(self, cache_dir: Path, version: str) -> Path:
        if self.owner is None:
            return cache_dir / self.name / version
        return cache_dir / _TENANTS_CACHE_DIR / self.owner / self.name / version


class ModelStore:
    """Publishes model versions into a :class:`Storage` and fetches them into a local cache folder.

    Every method names a model by its catalogue key: ``<name>`` (a system model) or ``<tenant>/<name>``.

    Args:
        storage: where versions are published (``models/`` and ``tenant-models/`` keys).
        cache_dir: local folder of downloaded versions, ``cache_dir/<name>/<version>/`` (a tenant's:
            ``cache_dir/_tenants/<tenant>/<name>/<version>/``); several processes may share it.
        local_roots: model roots served beside the store (the zoo, ``GENQ_MODEL_DIRS``), all system models: their
            versions are taken, so :meth:`allocate_version` never hands them out (a local version would shadow a
            published one).
        cache_max_bytes: after each download, the least recently used versions are deleted from the cache until
            it is no larger than this (None: never). A version used (fetched by any process sharing the cache)
            within ``cache_grace_s`` is never deleted, so a process loading it cannot lose its files.
    """

    def __init__(
        self,
        storage: Storage,
        cache_dir: Path,
        local_roots: Iterable[Path] = (),
        *,
        cache_max_bytes: int | None = None,
        cache_grace_s: float = 3600.0,
    ) -> None:
        self.storage = storage
        self.cache_dir = Path(cache_dir)
        self.local_roots = list(local_roots)
        self.cache_max_bytes = cache_max_bytes
        self.cache_grace_s = cache_grace_s
        # Parsed config.json per published version (None: unreadable); immutable, so never read twice.
        self._infos: dict[tuple[ModelPlace, str], ModelVersionInfo | None] = {}
        self._lock = threading.Lock()

    def entries(self, *, default_latest: bool = True) -> dict[str, ModelEntry]:
        """Every published model (the system's and every tenant's) with its owner, versions and aliases, by key.

        A version whose ``config.json`` is missing (still being published) is left out; one whose config cannot be
        parsed is logged and left out. Aliases naming a version that is not published are dropped.

        Args:
            default_latest: add the alias ``latest`` (the highest version) where ``aliases.json`` sets none; the
                registry turns it off to compute ``latest`` over local and published versions together.

        Raises:
            StorageUnavailable, StorageError: the store could not be listed or read.
        """
        versions: dict[ModelPlace, set[str]] = {}
        with_aliases: set[ModelPlace] = set()
        # models/<name>/..., then tenant-models/<tenant>/<name>/...: the same layout below one more folder.
        for prefix, owned in ((constants.MODELS_PREFIX, False), (constants.TENANT_MODELS_PREFIX, True)):
            for key in self.storage.list(prefix):
                parts = key[len(prefix) :].split("/")
                owner = parts.pop(0) if owned else None
                try:
                    place = ModelPlace.checked(owner, parts[0] if parts else "")
                except ValueError:
                    continue  # not an object of ours: nothing could name it
                if len(parts) == 2 and parts[1] == ALIASES_FILE:
                    with_aliases.add(place)
                elif len(parts) == 3 and parts[2] == CONFIG_FILE and is_valid_name(parts[1]):
                    versions.setdefault(place, set()).add(parts[1])
        entries: dict[str, ModelEntry] = {}
        for place in sorted(versions, key=lambda p: p.key):
            infos: dict[str, ModelVersionInfo] = {}
            for version in sorted(versions[place], key=version_key):
                info = self._info(place, version)
                if info is not None:
                    infos[version] = info
            if not infos:
                continue
            entry = ModelEntry(name=place.name, owner=place.owner, versions=infos)
            if place in with_aliases:
                entry.aliases.update(self._published_aliases(place, infos))
            if default_latest and "latest" not in entry.aliases:
                entry.aliases["latest"] = max(infos, key=version_key)
            entries[entry.key] = entry
        return entries

    def has_version(self, model: str, version: str) -> bool:
        """Whether ``model@version`` is published (its ``config.json`` is stored); ``model`` is a catalogue key.

        Raises:
            StorageUnavailable, StorageError: the store could not be read.
        """
        try:
            place = ModelPlace.of(model)
        except ValueError:
            return False
        if not is_valid_name(version):
            return False
        return self.storage.exists(place.version_prefix(version) + CONFIG_FILE)

    def fetch(self, model: str, version: str) -> Path:
        """Download a published version into its cache folder (once) and return that folder.

        ``model`` is a catalogue key: ``<name>`` downloads ``models/<name>/<version>/`` into
        ``cache_dir/<name>/<version>/``; ``<tenant>/<name>`` downloads only that tenant's version.

        The files land in a temporary folder first, renamed into place when complete: a concurrent fetch in another
        thread or process either wins the rename or finds the complete folder, and a crash leaves no half version.

        Raises:
            ModelNotFound: the name or version is invalid, or no such version is published.
            StorageUnavailable, StorageError: the store could not be read.
        """
        try:
            place = ModelPlace.of(model)
        except ValueError as exc:
            raise ModelNotFound(f"invalid model reference {model!r}@{version!r}: {exc}") from exc
        if not is_valid_name(version):
            raise ModelNotFound(f"invalid model reference {model!r}@{version!r}: names are single path segments")
        final = place.cache_folder(self.cache_dir, version)
        if final.is_dir():
            try:
                os.utime(final)  # its last use, for eviction
                return final  # published versions are immutable: what was downloaded once is still right
            except FileNotFoundError:
                pass  # another process evicted it just now: download it again
        prefix = place.version_prefix(version)
        files = [k[len(prefix) :] for k in self.storage.list(prefix)]
        files = [f for f in files if is_valid_name(f)]  # nothing nested, nothing that could leave the folder
        if CONFIG_FILE not in files:
            raise ModelNotFound(f"model {model}@{version} is not published (no {prefix}{CONFIG_FILE} in the store)")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=final.parent))
        try:
            for file in files:
                (tmp / file).write_bytes(self.storage.get(prefix + file))
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
                # Another thread or process finished the same download first; its copy is as good as ours.
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                log.info("fetched %s@%s (%d files) into %s", model, version, len(files), final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.evict(keep=final)
        return final

    def evict(self, keep: Path | None = None, now: float | None = None) -> list[Path]:
        """Delete least recently used version folders from the cache until it fits ``cache_max_bytes``.

        Folders used within ``cache_grace_s`` (and ``keep``) stay, even if the cache remains over its limit.
        Returns the folders deleted.
        """
        if self.cache_max_bytes is None or not self.cache_dir.is_dir():
            return []
        now = time.time() if now is None else now
        folders = [(d.stat().st_mtime, _size(d), d) for d in self._cached_versions()]
        total = sum(size for _, size, _ in folders)
        deleted = []
        for used, size, folder in sorted(folders):  # least recently used first
            if total <= self.cache_max_bytes:
                break
            if folder == keep or now - used < self.cache_grace_s:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            total -= size
            deleted.append(folder)
            log.info(
                "evicted %s from the model cache (%d bytes; cache now %d of %d)",
                folder,
                size,
                total,
                self.cache_max_bytes,
            )
        return deleted

    def _cached_versions(self) -> list[Path]:
        """Every version folder in the cache, the system's and the tenants' (temporary downloads left out)."""
        folders: list[Path] = []
        for child in self.cache_dir.iterdir():
            if child.is_dir():
                pattern = "*/*/*" if child.name == _TENANTS_CACHE_DIR else "*"
                folders += [d for d in child.glob(pattern) if d.is_dir() and not d.name.startswith(_TEMP_PREFIX)]
        return folders

    def publish(self, model: str, version: str, files: Mapping[str, bytes]) -> None:
        """Store a new version's files under its model's prefix (see the module docstring), ``config.json`` last.

        Until ``config.json`` is stored the version is invisible to readers, so a publisher that dies midway leaves
        nothing anyone serves (and publishing the same version again completes it). Two publishers of one version
        are not detected atomically: take version numbers from :meth:`allocate_version`.

        Args:
            model: the model's catalogue key: ``<name>`` (the system's) or ``<tenant>/<name>``.
            version: the new version (from :meth:`allocate_version`).
            files: file name -> contents; must hold ``config.json`` and ``weights.safetensors``.

        Raises:
            ValueError: a name is invalid or a required file is missing.
            ModelVersionExists: the version is already published.
            StorageUnavailable, StorageError: the store refused or did not answer.
        """
        place = ModelPlace.of(model)
        _check_name("version", version)
        for file in files:
            _check_name("file name", file)
        missing = {CONFIG_FILE, "weights.safetensors"} - set(files)
        if missing:
            raise ValueError(f"cannot publish {model}@{version} without {', '.join(sorted(missing))}")
        prefix = place.version_prefix(version)
        if self.storage.exists(prefix + CONFIG_FILE):
            raise ModelVersionExists(
                f"model {model}@{version} is already published and versions are immutable; publish a new version"
            )
        for file in sorted(files, key=lambda f: f == CONFIG_FILE):  # config.json last: it makes the version visible
            self.storage.put(prefix + file, files[file], _content_type(file))
        log.info("published %s@%s (%d files)", model, version, len(files))

    def set_aliases(self, model: str, aliases: Mapping[str, str]) -> dict[str, str]:
        """Merge ``aliases`` (alias -> version) into ``model``'s ``aliases.json`` and return the merged aliases.

        Only that model's aliases move: ``model`` (a catalogue key) names one owner's model, never another's.

        This is a read-modify-write of one object: two concurrent updates of the same model's aliases race and the
        last writer wins (updates come from one training job or one operator at a time).

        Raises:
            ValueError: a name is invalid.
            ModelNotFound: an alias names a version that is not published.
            StorageUnavailable, StorageError: the store refused or did not answer.
        """
        place = ModelPlace.of(model)
        for alias, version in aliases.items():
            _check_name("alias", alias)
            _check_name("version", version)
        for version in sorted(set(aliases.values()), key=version_key):
            if not self.storage.exists(place.version_prefix(version) + CONFIG_FILE):
                raise ModelNotFound(f"cannot point an alias at {model}@{version}: that version is not published")
        merged = {**self._read_aliases(place), **aliases}
        body = (json.dumps(merged, indent=2, sort_keys=True) + "\n").encode()
        self.storage.put(place.aliases_object, body, "application/json")
        return merged

    def allocate_version(self, client: redis.Redis, model: str, local_roots: Iterable[Path] | None = None) -> str:
        """Hand out the next version number of ``model`` (a catalogue key), unique across concurrent callers.

        The Redis counter (one per owner and name) is first raised to the highest integer version already in the
        store (published or half published) or, for a system model, in the local roots (``<root>/<name>/<version>/``;
        by default the store's ``local_roots``), so a counter lost with Redis, or a model that started in the zoo,
        never hands out a version that exists.

        Raises:
            ValueError: the name is invalid.
            StorageUnavailable, StorageError: the store could not be listed.
        """
        place = ModelPlace.of(model)
        present = [key[len(place.prefix) :].split("/", 1)[0] for key in self.storage.list(place.prefix)]
        if place.owner is None:  # local roots hold system models only
            for root in self.local_roots if local_roots is None else local_roots:
                folder = Path(root) / place.name
                if folder.is_dir():
                    present.extend(p.name for p in folder.iterdir() if p.is_dir())
        floor = max((int(v) for v in present if v.isdigit()), default=0)
        return str(int(client.eval(_ALLOCATE_SCRIPT, 1, place.version_counter, floor)))

    def publish_folder(
        self, client: redis.Redis, model: str, folder: Path, aliases: Iterable[str] = ()
    ) -> tuple[str, dict[str, str]]:
        """Publish a model folder as ``model``'s next version and move ``latest`` and ``aliases`` to it.

        What an operator's ``genq model publish`` runs. The folder holds ``config.json`` and ``weights.safetensors``
        (a ``genq train`` run's ``export/``), and whatever else goes beside them (``metrics.json``,
        ``MODEL_CARD.md``, ``samples.png``, ``discriminator.safetensors`` to fine-tune from it); hidden files are
        left out. It must load as a generator (strictly) before anything is stored or a version is taken.

        Returns:
            The version published and the model's aliases after the move.

        Raises:
            ValueError: an invalid model key, alias or file name, or a folder that does not load as a model.
            StorageUnavailable, StorageError: the store refused or did not answer.
        """
        place = ModelPlace.of(model)
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder")
        moved = ["latest", *aliases]
        for alias in moved:
            _check_name("alias", alias)
        files = {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
        for file in files:
            _check_name("file name", file)
        try:
            version_info(read_config(folder))
            load_generator(folder)
        except (ModelsError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{folder} is not a model folder that loads: {exc}") from exc
        version = self.allocate_version(client, place.key)
        self.publish(place.key, version, {name: path.read_bytes() for name, path in files.items()})
        return version, self.set_aliases(place.key, dict.fromkeys(moved, version))

    def _info(self, place: ModelPlace, version: str) -> ModelVersionInfo | None:
        with self._lock:
            if (place, version) in self._infos:
                return self._infos[(place, version)]
        prefix = place.version_prefix(version)
        key = prefix + CONFIG_FILE
        try:
            config = json.loads(self.storage.get(key))
            try:
                metrics = json.loads(self.storage.get(prefix + METRICS_FILE))
            except (ObjectNotFound, ValueError):
                metrics = None
            info: ModelVersionInfo | None = version_info(config, metrics)
        except ObjectNotFound:
            return None  # deleted since the listing; not cached, it may be published again
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("skipping published model %s@%s: bad %s: %s", place.key, version, key, exc)
            info = None
        with self._lock:
            self._infos[(place, version)] = info
        return info

    def _read_aliases(self, place: ModelPlace) -> dict[str, str]:
        key = place.aliases_object
        try:
            data = json.loads(self.storage.get(key))
        except ObjectNotFound:
            return {}
        except ValueError as exc:
            log.warning("ignoring %s: not valid JSON: %s", key, exc)
            return {}
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            log.warning("ignoring %s: not a JSON object of alias -> version strings", key)
            return {}
        return data

    def _published_aliases(self, place: ModelPlace, versions: Mapping[str, ModelVersionInfo]) -> dict[str, str]:
        aliases = self._read_aliases(place)
        dangling = {a: v for a, v in aliases.items() if v not in versions}
        if dangling:
            log.warning("model %s: ignoring aliases of unpublished versions %s", place.key, dangling)
        return {a: v for a, v in aliases.items() if a not in dangling}


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _content_type(file: str) -> str:
    return _CONTENT_TYPES.get(Path(file).suffix, "application/octet-stream")
