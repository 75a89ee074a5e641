"""Errors raised inside workers, split by what the task does about them: retry, or fail the job."""

from producer.errors import GenqError


class WorkerError(GenqError):
    """Base class for errors raised by the worker runtime."""


class Retryable(WorkerError):
    """A transient fault: the job may succeed if run again later."""


class Permanent(WorkerError):
    """Running the job again will fail the same way: fail it now with this reason."""


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


class JobCanceled(WorkerError):
    """The job was canceled while it ran; the pipeline stops after the current batch."""


class UnsafeUpload(Permanent, ValueError):
    """An uploaded data set is hostile: a path escapes its folder, or it passes a size, count or ratio limit."""


class InvalidArchive(Permanent, ValueError):
    """An uploaded archive is corrupt, truncated or of an unsupported kind."""
