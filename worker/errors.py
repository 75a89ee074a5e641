"""Errors raised inside workers, each under a branch of :mod:`producer.errors` that says what the task does about it:
:class:`~producer.errors.Retryable` (run the job again later) or :class:`~producer.errors.Permanent` (fail it now).
"""

from producer.errors import Permanent, Retryable


class StorageUnavailable(Retryable):
    """The object store did not answer (connection refused, timeout, 5xx) within the retry window."""


class StorageError(Permanent):
    """The object store refused the request for good (no such bucket, access denied, bad key)."""


class ObjectNotFound(Permanent, KeyError):
    """No object under that key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "object not found"


class ModelLoadError(Permanent):
    """A model's files exist but cannot be loaded (corrupt weights, config mismatch)."""


class IncompleteJob(Permanent):
    """A job's stored outputs have a hole (an index missing or repeated): it must not succeed."""


class UnsafeUpload(Permanent, ValueError):
    """An uploaded data set is hostile: a path escapes its folder, or it passes a size, count or ratio limit."""


class InvalidArchive(Permanent, ValueError):
    """An uploaded archive is corrupt, truncated or of an unsupported kind."""


class SigningUnavailable(Permanent):
    """A job asks for Content Credentials (provenance c2pa) this worker cannot make: no key set, c2pa-python
    missing, or a key or chain that does not sign."""
