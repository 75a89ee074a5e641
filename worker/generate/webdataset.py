"""WebDataset-style tar shards: ``<index>.<ext>`` and ``<index>.json`` per sample, one PUT per shard.

Deterministic: members are written in index order with fixed metadata (mtime 0, no owner), so a retried shard
produces a byte-identical tar.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any


class ShardWriter:
    """Collects samples of one shard in memory (a shard is bounded by GENQ_SHARD_SIZE) and returns the tar bytes."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buffer, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, stem: str, extension: str, data: bytes, meta: dict[str, Any]) -> str:
        """Add ``<stem>.<extension>`` and ``<stem>.json``; returns the image's member name."""
        return self.add_sample(stem, [(extension, data)], meta)[0]

    def add_sample(self, stem: str, files: list[tuple[str, bytes]], meta: dict[str, Any]) -> list[str]:
        """Add ``<stem>.<suffix>`` for each (suffix, data) of ``files``, then ``<stem>.json``: one WebDataset sample
        (loaders group members by the stem). Returns the files' member names, in order."""
        names = [f"{stem}.{suffix}" for suffix, _ in files]
        for name, (_, data) in zip(names, files, strict=True):
            self._member(name, data)
        self._member(f"{stem}.json", json.dumps(meta, sort_keys=True).encode())
        return names

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def finish(self) -> bytes:
        self._tar.close()
        return self._buffer.getvalue()


def shard_key(prefix: str, shard_index: int) -> str:
    return f"{prefix}shard-{shard_index:05d}.tar"
