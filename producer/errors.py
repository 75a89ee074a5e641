"""The error tree of genq, split by what the caller does about each error.

``GenqError`` is the root. Failures of work split in two branches, and the worker reads them: a :class:`Retryable`
failure runs the job again later (``GENQ_CELERY__RETRIES`` times, with backoff), a :class:`Permanent` one fails it now
with its reason. The worker's own errors (storage, models, archives) live in ``worker.errors`` under these branches;
the rest here are what a client is told (not found, ended, unauthorized, over a quota, timed out).
"""


class GenqError(Exception):
    """Base class for every genq error."""


class Retryable(GenqError):
    """A transient fault (a store that does not answer): the same work may succeed if run again later."""


class Permanent(GenqError):
    """Running the same work again will fail the same way: fail it now, with this reason."""


class InvalidJob(Permanent, ValueError):
    """The request cannot run as given (bad field, over a limit, unknown label): fix it and resubmit."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class ModelNotFound(Permanent, KeyError):
    """No model, version or alias of that name is published."""

    def __str__(self) -> str:  # KeyError quotes its message; say it plainly
        return str(self.args[0]) if self.args else "model not found"


class JobNotFound(GenqError, KeyError):
    """No job with that id (never existed, or its record expired)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "job not found"


class UnreadableRecord(JobNotFound):
    """A job record genq cannot read back (written by an older version or a bug); kept in ``genq:deadletter``.

    A :class:`JobNotFound`: whoever handles a job it cannot find (the sweeper, the watchdog, ``genq status``) handles
    this one the same way, with a message that says what happened."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(
            f"job {job_id!r} has a record genq cannot read ({reason}); it was kept in genq:deadletter for an operator"
        )
        self.job_id = job_id
        self.reason = reason


class JobEnded(GenqError):
    """The job already ended (succeeded, failed or canceled): only a queued or running job can be canceled."""

    def __init__(self, message: str, *, status: str) -> None:
        super().__init__(message)
        self.status = status


class IdempotencyConflict(GenqError):
    """The idempotency key was already used for a different request body."""


class Unauthorized(GenqError, PermissionError):
    """No API key, or one genq does not know: send ``Authorization: Bearer genq_...`` (``genq keys create``)."""


class KeyNotFound(GenqError, KeyError):
    """No API key, or more than one, matches the id prefix given (``genq keys revoke``): give more of the id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "API key not found"


class QuotaExceeded(GenqError):
    """A per-key quota or the request rate limit is used up: retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, *, limit: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s


class JobTimeout(GenqError, TimeoutError):
    """A job did not reach a terminal status within the time the caller was prepared to wait."""


class ConfigurationError(Permanent):
    """Settings are missing or unsafe (a placeholder secret outside dev, no bucket for S3 mode)."""


class CallbackUrlRefused(InvalidJob):
    """The callback URL reaches an address genq will not call (loopback, private, metadata...): permanent."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="callback.url")


class CallbackHostUnresolved(InvalidJob):
    """The callback URL's host does not resolve: a submit is refused; a delivery attempt fails and is retried."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="callback.url")
