"""Riding out a Redis outage: which errors mean Redis (the job store and the broker) is away, waiting for it to
answer again, and a backlog of the writes that must not be lost meanwhile.

A Redis restart is transient: a job that meets one is neither failed (that write needs Redis too) nor acknowledged
(``worker.tasks`` hands its message back once Redis answers). What a worker must record while Redis is away — a dead
letter, a callback event — waits in a :class:`Backlog` in memory and is written once Redis answers, instead of being
dropped; the backlog is bounded, and an entry refused because it is full is logged whole, as an error.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

import redis
from kombu.exceptions import OperationalError

log = logging.getLogger("genq.outage")

# Redis is away (refused, reset, timed out, still loading its data after a restart, a replica after a failover), or
# kombu could not publish to it. Any other Redis error is an answer: retrying the same command does not help.
OUTAGES: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.ReadOnlyError,
    OperationalError,
)


def wait_for_redis(
    client: redis.Redis,
    timeout_s: float,
    *,
    first_wait_s: float = 0.1,
    max_wait_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """PING ``client`` until Redis answers (True) or ``timeout_s`` has passed (False), waiting longer between tries."""
    deadline = time.monotonic() + timeout_s
    wait = first_wait_s
    while True:
        try:
            client.ping()
            return True
        except OUTAGES:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            sleep(min(wait, left))
            wait = min(wait * 2, max_wait_s)


Write = Callable[[], None]


class Backlog:
    """Writes that wait for Redis: each is retried, oldest first, by one daemon thread (started when the first is
    added, gone once all are written) with a backoff from ``first_wait_s`` to ``max_wait_s``, until it succeeds.

    A write that fails with anything but an outage is a bug, not Redis being away: it is logged and given up.

    >>> DEAD_LETTERS = Backlog("dead letters", limit=10_000)
    >>> if not DEAD_LETTERS.add(lambda: push(entry), what=f"dead letter {entry}"):
    ...     log.error(...)  # full: the caller logs the entry whole
    """

    def __init__(self, name: str, limit: int, *, first_wait_s: float = 0.2, max_wait_s: float = 5.0) -> None:
        self.name = name
        self.limit = limit
        self.first_wait_s = first_wait_s
        self.max_wait_s = max_wait_s
        self._items: deque[tuple[Write, str]] = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        # A forked child (a prefork pool process) leaves what its parent holds to the parent's thread.
        os.register_at_fork(after_in_child=self._forget)

    def add(self, write: Write, what: str) -> bool:
        """Keep ``write`` (described by ``what`` in the log) until it succeeds; False, keeping nothing, when full."""
        with self._lock:
            if len(self._items) >= self.limit:
                return False
            self._items.append((write, what))
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"genq-backlog-{self.name}", daemon=True)
                self._thread.start()
        return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def wait_written(self, timeout_s: float) -> bool:
        """Block until every write kept so far succeeded (True) or ``timeout_s`` passed (False)."""
        return self._idle.wait(timeout_s)

    def _run(self) -> None:
        wait = self.first_wait_s
        while True:
            with self._lock:
                if not self._items:
                    self._thread = None
                    self._idle.set()
                    return
                write, what = self._items[0]
            try:
                write()
            except OUTAGES as exc:
                log.debug("%s: Redis still away (%s); trying again in %.1f s", what, exc, wait)
                time.sleep(wait)
                wait = min(wait * 2, self.max_wait_s)
                continue
            except Exception:  # retrying a bug cannot help; the log keeps what it was
                log.exception("%s could not be written; given up", what)
            else:
                log.info("%s written now that Redis answers", what)
            wait = self.first_wait_s
            with self._lock:
                self._items.popleft()

    def _forget(self) -> None:
        self._items = deque()
        self._lock = threading.Lock()
        self._thread = None
        self._idle = threading.Event()
        self._idle.set()
