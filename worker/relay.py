"""The callback relay: a daemon thread in each worker that serves the callbacks queue, handing the events the store
wrote to the outbox (:mod:`producer.core.callbacks.outbox`) to the delivery task.

Generation workers never build, sign or publish a callback event: the store writes it in the same Lua step as the
change it announces, and this relay, beside the deliveries, turns it into a message. A hanging receiver or a slow
delivery costs the callbacks worker, never the pool that generates.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis

from producer.core.callbacks.events import CallbackMessage
from producer.core.callbacks.outbox import CLAIM_AFTER_S, Outbox, OutboxEntry, UnreadableEntry
from worker.outage import OUTAGES

log = logging.getLogger("genq.relay")

Send = Callable[[CallbackMessage], None]
DeadLetter = Callable[[OutboxEntry, str], None]


def consumer_name() -> str:
    """This process's name in the relay group: unique per live process, readable in ``XINFO CONSUMERS``."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Relay:
    """Reads the outbox as one consumer of the relay group and sends each event on; :meth:`turn` once, or
    :meth:`start` a daemon thread.

    >>> relay = Relay(client, send=send_callback, dead_letter=record_entry)
    >>> relay.turn(block_ms=0)  # events handed on
    3
    """

    def __init__(
        self,
        client: redis.Redis,
        send: Send,
        dead_letter: DeadLetter,
        *,
        consumer: str | None = None,
        block_ms: int = 1000,
        claim_every_s: float = 10.0,
        claim_after_s: float = CLAIM_AFTER_S,
        batch: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.outbox = Outbox(client, consumer or consumer_name(), batch=batch)
        self.send = send
        self.dead_letter = dead_letter
        self.block_ms = block_ms
        self.claim_every_s = claim_every_s
        self.claim_after_s = claim_after_s
        self.clock = clock
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

    def _run(self) -> None:
        wait = 0.1
        while not self._stop.is_set():
            try:
                self.turn(self.block_ms)
                wait = 0.1
            except OUTAGES as exc:  # the entries stay in the outbox; this relay rereads its own once Redis answers
                log.warning("callback relay: Redis away (%s); retrying in %.1f s", exc, wait)
                self._own_pending = True
                self._stop.wait(wait)
                wait = min(wait * 2, 5.0)
            except Exception:  # a bug must not end the thread: the events would wait for another relay's claim
                log.exception("callback relay failed; retrying in 1 s")
                self._own_pending = True
                self._stop.wait(1.0)

    def turn(self, block_ms: int) -> int:
        """Hand on the entries due: this relay's own unacknowledged ones after a failure, a dead relay's (every
        ``claim_every_s``), then new ones (waiting up to ``block_ms`` for one). Returns the events sent."""
        entries: list[OutboxEntry] = []
        if self._own_pending:
            entries += self.outbox.read_own_pending()
            self._own_pending = False
        now = self.clock()
        if now - self._claimed_at >= self.claim_every_s:
            self._claimed_at = now
            entries += self.outbox.claim(self.claim_after_s)
        if not entries:
            entries = self.outbox.read(block_ms)
        return self.relay(entries)

    def relay(self, entries: list[OutboxEntry]) -> int:
        """Send each entry's message, dead-letter the unreadable ones, and acknowledge every one handled; returns
        the messages sent. An error sending one (Redis away) acknowledges those before it and raises."""
        handled: list[str] = []
        sent = 0
        try:
            for entry in entries:
                try:
                    message = entry.message()
                except UnreadableEntry as exc:  # one bad entry never holds up the others
                    self.dead_letter(entry, str(exc))
                    handled.append(entry.entry_id)
                    continue
                if message is not None:
                    self.send(message)
                    sent += 1
                handled.append(entry.entry_id)
        finally:
            if handled:
                self.outbox.done(handled)
        return sent
