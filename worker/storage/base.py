"""What the pipelines need of object storage: a :class:`Storage` (S3 in production, a folder in embedded mode), and
the :class:`RetryWindow` one shard's storage calls share, so an outage is waited out once per shard, not per call."""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import Callable
from typing import IO, Protocol, runtime_checkable


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


class Clock(Protocol):
    """Time as a retry window sees it: the system's in a worker, a fake one in tests."""

    def now(self) -> float:
        """Seconds on a monotonic clock."""
        ...

    def sleep(self, seconds: float, wake: threading.Event) -> None:
        """Wait ``seconds``, or less once ``wake`` is set."""
        ...


class SystemClock:
    """:class:`Clock` on :func:`time.monotonic`; a sleep ends early when woken."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float, wake: threading.Event) -> None:
        wake.wait(seconds)


SYSTEM_CLOCK = SystemClock()


class RetryWindow:
    """One retry window shared by every storage call of a shard, so an outage is detected once and waited out once.

    The window opens when a call meets a transient fault while the store was answering (at that call's start) and
    closes when any call succeeds; every call of the shard retries only until the same deadline. The first call to
    give up stops the others: queued ones are skipped, retrying ones stop at their next try instead of each spending
    a window of its own. A call also stops retrying once the job ended: ``keep_going`` is asked before each retry
    (never before a first try), and :meth:`end` says so at once.

    Args:
        clock: where time comes from.
        keep_going: whether the job still wants outputs (the job store's answer); None: always.
    """

    def __init__(self, clock: Clock = SYSTEM_CLOCK, *, keep_going: Callable[[], bool] | None = None) -> None:
        self.clock = clock
        self.ended = threading.Event()  # the job ended: nothing more is stored for it
        self.error: BaseException | None = None  # the error of the first call that gave up
        self._keep_going = keep_going
        self._gave_up = threading.Event()
        self._wake = threading.Event()  # cuts a retry's wait short: a call gave up, or the job ended
        self._lock = threading.Lock()
        self._since: float | None = None  # start of the first failed call of the current outage

    @property
    def stopped(self) -> bool:
        """No call of the shard should start or try again: one gave up, or the job ended."""
        return self._gave_up.is_set() or self.ended.is_set()

    def fault(self, started: float, window_s: float) -> float:
        """A call that started at ``started`` met a transient fault: seconds left until every call gives up (the
        window opens at ``started`` unless an outage is already being waited out)."""
        with self._lock:
            if self._since is None:
                self._since = started
            return self._since + window_s - self.clock.now()

    def opened(self) -> float:
        """Seconds since the current outage began (0 when the store answers)."""
        since = self._since
        return 0.0 if since is None else self.clock.now() - since

    def answered(self) -> None:
        """A call succeeded: the outage is over, and the next fault opens a new window."""
        with self._lock:
            self._since = None

    def may_retry(self) -> bool:
        """Whether a call that just failed may try again: nothing gave up and the job still wants outputs."""
        if self.stopped:
            return False
        if self._keep_going is not None and not self._keep_going():
            self.end()
            return False
        return True

    def give_up(self, exc: BaseException) -> None:
        """A call failed for good with ``exc``: the shard's other calls stop (the first error is kept)."""
        with self._lock:
            if self.error is None:
                self.error = exc
        self._gave_up.set()
        self._wake.set()

    def end(self) -> None:
        """The job ended: no call starts or tries again, and those waiting to retry stop now."""
        self.ended.set()
        self._wake.set()

    def sleep(self, seconds: float) -> None:
        """Wait before a retry; cut short when a call gives up or the job ends."""
        self.clock.sleep(seconds, self._wake)


@runtime_checkable
class Windowed(Protocol):
    """A storage that retries transient faults and can share one :class:`RetryWindow` between calls."""

    def within(self, window: RetryWindow) -> Storage:
        """This storage, its calls retrying inside ``window``."""
        ...


def within(storage: Storage, window: RetryWindow) -> Storage:
    """``storage`` with its calls sharing ``window``; one that never retries (a local folder) is returned as is."""
    return storage.within(window) if isinstance(storage, Windowed) else storage
