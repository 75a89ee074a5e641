"""What the pipelines need of object storage: a :class:`Storage` (S3 in production, a folder in embedded mode)."""

from __future__ import annotations

import builtins
from typing import IO, Protocol


class Storage(Protocol):
    """Where a job's images and manifest go. Keys are ``/``-separated relative paths like ``jobs/<id>/00000.png``."""

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store ``data`` under ``key``, replacing any object there.

        Raises:
            StorageUnavailable: the store did not answer within the retry window (retry the job later).
            StorageError: the store refused the request for good (bad key, no bucket, access denied).
        """
        ...

    def put_file(self, key: str, source: IO[bytes], content_type: str) -> None:
        """Store everything ``source`` holds from its start under ``key``, read in pieces (a manifest of 100,000
        outputs is never one bytes object in memory). ``source`` must be seekable: a retry reads it again.

        Raises:
            StorageUnavailable, StorageError: as for :meth:`put`.
        """
        ...

    def get(self, key: str) -> bytes:
        """Return the bytes stored under ``key``.

        Raises:
            ObjectNotFound: nothing is stored under ``key``.
            StorageUnavailable, StorageError: as for :meth:`put`.
        """
        ...

    def exists(self, key: str) -> bool:
        """Return whether an object is stored under ``key``.

        Raises:
            StorageUnavailable, StorageError: as for :meth:`put`.
        """
        ...

    def list(self, prefix: str) -> builtins.list[str]:
        """Return every key starting with ``prefix`` (a plain string prefix, as in S3), sorted.

        Raises:
            StorageUnavailable, StorageError: as for :meth:`put`.
        """
        ...

    def url(self, key: str, expires_s: int) -> str:
        """Return a URL that reads ``key``: presigned GET valid ``expires_s`` seconds (S3) or a ``file://`` URI.

        The object is not checked for existence.

        Raises:
            StorageError: ``key`` is not a valid key.
        """
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix`` and return how many were deleted.

        Raises:
            StorageUnavailable, StorageError: as for :meth:`put`.
        """
        ...
