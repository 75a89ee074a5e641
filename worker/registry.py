"""Model registry: which models and versions this worker can serve, and a per-process cache of loaded ones.

Layout of every model root (the shipped ``models/zoo`` first, then ``GENQ_MODEL_DIRS``)::

    <root>/<name>/<version>/config.json + weights.safetensors
    <root>/<name>/aliases.json              optional {"latest": "<version>", ...}

Without ``aliases.json`` the alias ``latest`` names the highest version.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path

import redis

import models
from models.errors import ModelsError
from models.generator import CONFIG_FILE, ImageGenerator, load_generator, read_config
from producer import constants
from producer.contract import ModelEntry, ModelVersionInfo
from producer.errors import ModelNotFound
from worker import metrics
from worker.errors import ModelLoadError

log = logging.getLogger("genq.registry")

ZOO_DIR = Path(models.__file__).parent / "zoo"


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order: "10" after "9", "1.10" after "1.9"."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[._-]", version))


class ModelRegistry:
    """Finds model folders, describes them for clients, and loads each (name, version) once per process."""

    def __init__(self, roots: list[Path], device: str = "cpu") -> None:
        self.roots = roots
        self.device = device
        self._paths: dict[tuple[str, str], Path] = {}
        self._entries: dict[str, ModelEntry] = {}
        self._loaded: dict[tuple[str, str], ImageGenerator] = {}
        self._lock = threading.Lock()
        self.scan()

    def scan(self) -> dict[str, ModelEntry]:
        """Re-read every root. Earlier roots win when two define the same (name, version)."""
        paths: dict[tuple[str, str], Path] = {}
        entries: dict[str, ModelEntry] = {}
        for root in self.roots:
            if not root.is_dir():
                log.warning("model root %s does not exist; skipped", root)
                continue
            for name_dir in sorted(p for p in root.iterdir() if p.is_dir()):
                name = name_dir.name
                entry = entries.setdefault(name, ModelEntry(name=name, versions={}))
                for version_dir in sorted(p for p in name_dir.iterdir() if (p / CONFIG_FILE).is_file()):
                    key = (name, version_dir.name)
                    if key in paths:
                        continue
                    try:
                        cfg = read_config(version_dir)
                        info = ModelVersionInfo(
                            arch=cfg["arch"],
                            class_names=list(cfg["class_names"]),
                            resolution=int(cfg["resolution"]),
                            channels=int(cfg["channels"]),
                        )
                    except (ModelsError, KeyError, TypeError, ValueError) as exc:
                        log.warning("skipping %s: %s", version_dir, exc)
                        continue
                    paths[key] = version_dir
                    entry.versions[version_dir.name] = info
                aliases_file = name_dir / "aliases.json"
                if aliases_file.is_file():
                    entry.aliases.update(json.loads(aliases_file.read_text()))
                if entry.versions and "latest" not in entry.aliases:
                    entry.aliases["latest"] = max(entry.versions, key=_version_key)
        self._paths = paths
        self._entries = {name: e for name, e in entries.items() if e.versions}
        return self._entries

    def catalog(self) -> dict[str, ModelEntry]:
        return dict(self._entries)

    def path(self, name: str, version: str) -> Path:
        """Folder of a model version. Raises ModelNotFound."""
        if (name, version) not in self._paths:
            self.scan()  # a version published after start-up
        try:
            return self._paths[(name, version)]
        except KeyError:
            known = ", ".join(f"{n}@{v}" for n, v in sorted(self._paths)) or "none"
            raise ModelNotFound(f"unknown model {name}@{version} (known: {known})") from None

    def load(self, name: str, version: str) -> ImageGenerator:
        """The loaded generator for (name, version), loading it on first use. Raises ModelNotFound/ModelLoadError."""
        key = (name, version)
        with self._lock:  # one load per model even when several threads ask at once
            if key not in self._loaded:
                path = self.path(name, version)
                started = time.perf_counter()
                try:
                    self._loaded[key] = load_generator(path, self.device)
                except ModelsError as exc:
                    raise ModelLoadError(f"model {name}@{version} failed to load: {exc}") from exc
                elapsed = time.perf_counter() - started
                metrics.MODEL_LOAD_SECONDS.observe(elapsed)
                log.info("loaded %s@%s from %s in %.0f ms", name, version, path, 1e3 * elapsed)
            return self._loaded[key]

    def preload(self) -> None:
        """Load the ``latest`` version of every model (at worker start, before any job arrives)."""
        for entry in self._entries.values():
            try:
                self.load(entry.name, entry.aliases["latest"])
            except ModelLoadError as exc:
                log.error("%s", exc)

    def publish(self, client: redis.Redis) -> None:
        """Write the catalogue to Redis, where clients validate requests against it."""
        if self._entries:
            client.hset(constants.CATALOG_KEY, mapping={n: e.model_dump_json() for n, e in self._entries.items()})
