"""Object storage in a local folder: the embedded mode's :class:`~worker.storage.base.Storage`.

Keys are relative POSIX paths confined to the root: absolute keys, ``..``, empty segments, backslashes and
symlinks out of the root are refused. Writes are atomic (temp file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import builtins
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, BinaryIO

from worker.errors import ObjectNotFound, StorageError

_LOCAL_TEMP_PREFIX = ".genq-tmp-"


class LocalStorage:
    """:class:`Storage` in a folder (embedded mode): key ``a/b.png`` is the file ``root/a/b.png``.

    Args:
        root: folder holding every object; created on the first :meth:`put`.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self._write(key, lambda f: f.write(data))

    def put_file(self, key: str, source: IO[bytes], content_type: str) -> None:
        source.seek(0)
        self._write(key, lambda f: shutil.copyfileobj(source, f))

    def _write(self, key: str, write: Callable[[BinaryIO], object]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename: a reader never sees half a file, a crash leaves no partial object.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_LOCAL_TEMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.root}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> builtins.list[str]:
        # Walk only the deepest folder the prefix names, then filter as S3 would (a plain string prefix).
        folder, _, _ = prefix.rpartition("/")
        start = self._path(folder) if folder else self.root
        if not start.is_dir():
            return []
        keys = []
        for path in start.rglob("*"):
            if path.is_file() and not path.name.startswith(_LOCAL_TEMP_PREFIX):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def url(self, key: str, expires_s: int) -> str:
        return self._path(key).as_uri()

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        return len(keys)

    def _path(self, key: str) -> Path:
        """The file for ``key``, refusing any key that could name something outside :attr:`root`."""
        segments = key.split("/")
        if (
            not key
            or "\\" in key
            or "\x00" in key
            or key.startswith("/")
            or any(s in {"", ".", ".."} for s in segments)
        ):
            raise StorageError(
                f"invalid key {key!r}: use a relative path of '/'-separated names, without '', '.', '..' or '\\'"
            )
        path = self.root.joinpath(*segments)
        # A symlink inside root could still point out of it.
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise StorageError(f"key {key!r} resolves outside {self.root}")
        return path
