"""The callback relay: a daemon thread in each worker that serves the callbacks queue, making the first delivery
attempt of each event the store wrote to the outbox (:mod:`producer.core.callbacks.outbox`).

Generation workers never build, sign, publish or send a callback event: the store writes it in the same Lua step as
the change it announces, and this relay, beside the deliveries, attempts it; retries go through the ``callbacks``
queue. A hanging receiver or a slow delivery costs the callbacks worker, never the pool that generates.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import redis

from producer.core.callbacks.delivery import Settle
from producer.core.callbacks.events import CallbackMessage
from producer.core.callbacks.outbox import CLAIM_AFTER_S, Outbox, OutboxEntry, UnreadableEntry
from worker.outage import OUTAGES

log = logging.getLogger("genq.relay")

# After a read that found fewer events than the relay had room for, it waits this long before the next: events that
# trickle in (one per transition of each running job) are then read a few at a time, not one read each, for at most
# this much delay to their first attempt.
LINGER_S = 0.05

# Makes one attempt at a message; the callable it is given queues the entry's acknowledgement on a pipeline. Returns
# True when it ran that in the transaction of the attempt's record (``run_delivery``'s ``settle``), False (or None)
# when the relay must acknowledge the entry itself.
Deliver = Callable[[CallbackMessage, Settle], bool | None]
DeadLetter = Callable[[OutboxEntry, str], None]


def consumer_name() -> str:
    """This process's name in the relay group: unique per live process, readable in ``XINFO CONSUMERS``."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Relay:
    """Reads the outbox as one consumer of the relay group and makes each event's first delivery attempt; :meth:`turn`
    once, or :meth:`start` a daemon thread.

    ``deliver`` makes one attempt (``producer.core.callbacks.delivery.run_delivery``): what it cannot finish now — a
    retry, a host with its most attempts in flight — it puts on the ``callbacks`` queue, where Celery workers take
    over. So the common case, a receiver that answers, costs no broker message at all. With ``threads`` the attempts
    run on a pool of that many threads (a hanging receiver holds at most its host's share of them, each for at most
    the attempt deadline); with 0, in the relay's own thread. An entry is acknowledged once its attempt is done: in
    the transaction that records the attempt when nothing follows it (delivered, 410, not sent), else after what
    follows exists (a retry enqueued). A relay that dies mid-attempt leaves it to another relay's claim (so the
    event may arrive twice, with one ``webhook-id``).

    >>> relay = Relay(client, deliver=attempt, dead_letter=record_entry)
    >>> relay.turn(block_ms=0)  # events attempted
    3
    """

    def __init__(
        self,
        client: redis.Redis,
        deliver: Deliver,
        dead_letter: DeadLetter,
        *,
        threads: int = 0,
        consumer: str | None = None,
        block_ms: int = 1000,
        claim_every_s: float = 10.0,
        claim_after_s: float = CLAIM_AFTER_S,
        batch: int = 100,
        linger_s: float = LINGER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.outbox = Outbox(client, consumer or consumer_name(), batch=batch)
        self.deliver = deliver
        self.dead_letter = dead_letter
        self.block_ms = block_ms
        self.claim_every_s = claim_every_s
        self.claim_after_s = claim_after_s
        self.linger_s = linger_s
        self.clock = clock
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="genq-relay") if threads > 0 else None
        # At most this many entries read and not yet attempted: the outbox, not this process, holds a backlog.
        self._capacity = 2 * threads if threads > 0 else batch
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._claimed_at = float("-inf")
        self._own_pending = True  # first turn: entries this consumer name read and never acknowledged
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="genq-callback-relay", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _run(self) -> None:
        wait = 0.1
        while not self._stop.is_set():
            try:
                handed = self.turn(self.block_ms)
                wait = 0.1
                if 0 < handed < self._capacity:  # events trickling in: let a few gather before the next read
                    self._stop.wait(self.linger_s)
            except OUTAGES as exc:  # the entries stay in the outbox; this relay rereads its own once Redis answers
                log.warning("callback relay: Redis away (%s); retrying in %.1f s", exc, wait)
                self._own_pending = True
                self._stop.wait(wait)
                wait = min(wait * 2, 5.0)
            except Exception:  # a bug must not end the thread: the events would wait for another relay's claim
                log.exception("callback relay failed; retrying in 1 s")
                self._own_pending = True
                self._stop.wait(1.0)

    def in_flight(self) -> int:
        """Entries read and not yet attempted (or being attempted)."""
        with self._lock:
            return len(self._in_flight)

    def turn(self, block_ms: int) -> int:
        """Attempt the entries due: this relay's own unacknowledged ones after a failure, a dead relay's (every
        ``claim_every_s``), then new ones (waiting up to ``block_ms`` for one), as many as it has room for.
        Returns the events handed to ``deliver`` (or its pool)."""
        room = self._capacity - self.in_flight()
        if room <= 0:  # every thread busy and as many waiting: wait for one to finish
            self._finished.wait(block_ms / 1000)
            self._finished.clear()
            return 0
        entries: list[OutboxEntry] = []
        if self._own_pending:
            self._own_pending = False
            entries += self.outbox.read_own_pending()
        now = self.clock()
        if now - self._claimed_at >= self.claim_every_s:
            self._claimed_at = now
            entries += self.outbox.claim(self.claim_after_s)
        with self._lock:  # this relay's own entries in flight are in its pending list too: never twice at once
            entries = [e for e in entries if e.entry_id not in self._in_flight][:room]
        if not entries:
            entries = self.outbox.read(block_ms, count=room)
        return self.relay(entries)

    def relay(self, entries: list[OutboxEntry]) -> int:
        """Hand each entry's message to ``deliver``, dead-letter the unreadable ones, and acknowledge those with
        nothing to send; returns the messages handed on."""
        handed = 0
        nothing: list[str] = []
        try:
            for entry in entries:
                try:
                    message = entry.message()
                except UnreadableEntry as exc:  # one bad entry never holds up the others
                    self.dead_letter(entry, str(exc))
                    nothing.append(entry.entry_id)
                    continue
                if message is None:
                    nothing.append(entry.entry_id)
                    continue
                with self._lock:
                    self._in_flight.add(entry.entry_id)
                if self._pool is None:
                    self._attempt(entry, message, raise_outage=True)
                else:
                    self._pool.submit(self._attempt, entry, message, raise_outage=False)
                handed += 1
        finally:
            if nothing:
                self.outbox.done(nothing)
        return handed

    def _attempt(self, entry: OutboxEntry, message: CallbackMessage, *, raise_outage: bool) -> None:
        try:
            if not self.deliver(message, lambda pipe: self.outbox.settle(pipe, [entry.entry_id])):
                self.outbox.done([entry.entry_id])
        except OUTAGES as exc:  # unacknowledged: attempted again once Redis answers (by this relay, or a claim)
            self._own_pending = True
            log.warning(
                "callback %s of job %s: Redis away (%s); attempted again later", message.msg_id, entry.job_id, exc
            )
            if raise_outage:
                raise
        except Exception as exc:  # a bug: recorded, not retried for ever
            log.exception("callback %s of job %s could not be attempted", message.msg_id, entry.job_id)
            self.dead_letter(entry, f"the relay could not attempt it: {exc!r}")
            self.outbox.done([entry.entry_id])
        finally:
            with self._lock:
                self._in_flight.discard(entry.entry_id)
            self._finished.set()
