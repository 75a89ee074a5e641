"""The callback outbox: events written by the store in the same step as the change they announce, read by relays.

A worker that moves a job (running, progress, succeeded, failed) asks the store to announce the change; the store's
Lua script appends ``{job, event, seq, record}`` to the Redis stream ``genq:callbacks:outbox`` in the same step
(``producer/core/lua/announce.lua``). So an event exists exactly when its change does, whatever happens to the
worker next, and generation pays one stream append instead of reading the job back, signing nothing yet and
publishing a message per event. Relays (``worker.relay``, in every worker that serves the callbacks queue) read the
stream as one consumer group, turn each entry into a :class:`CallbackMessage` built from the record as it was at
the change, make its first delivery attempt (retries go through the ``callbacks`` queue), then acknowledge and
delete the entry.

Delivery is at least once: a relay that dies between attempting an event and acknowledging it leaves the entry
pending, and another relay claims it after ``claim_after_s`` and attempts it again, with the same ``webhook-id``
(the message id is derived from the job, the event and its sequence number), which is what receivers deduplicate on.

>>> outbox = Outbox(client, consumer="worker-1@host")
>>> entries = outbox.read(block_ms=1000)   # new entries, then outbox.claim(...) for a dead relay's
>>> outbox.done([e.entry_id for e in entries])
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import cast

import redis

from producer.contract import EventType
from producer.core import constants
from producer.core.callbacks.events import CallbackMessage, callback_message
from producer.core.records import CORRUPT, JOB_SPEC, as_text, record_view

# An entry read by a relay that has not acknowledged it this long is taken over by another relay: far longer than
# handing a batch on takes (one Redis round trip per event), short enough that a restart delays events by seconds.
CLAIM_AFTER_S = 30.0


class UnreadableEntry(ValueError):
    """An outbox entry that cannot be turned into a message (a bug or a hand-written entry): dead-letter it."""


@dataclass(frozen=True)
class OutboxEntry:
    """One event as the store wrote it: the job's record (fields as text) at the change it announces."""

    entry_id: str
    job_id: str
    event: str
    seq: int
    record: str  # JSON object: the job hash's fields (announce.lua says which are left out)

    def message(self) -> CallbackMessage | None:
        """The callback message for this event, built from the record as it was at the change; None when the job
        has no callback or filters this event out, or for a progress event recorded after the job ended.

        Raises:
            UnreadableEntry: the entry's record or event cannot be read.
        """
        try:
            if not self.job_id or self.seq < 1:
                raise TypeError("the entry has no job id or sequence number")
            event = EventType(self.event)
            fields = json.loads(self.record)
            if not isinstance(fields, dict):
                raise TypeError(f"the record is a JSON {type(fields).__name__}, not an object")
            spec = JOB_SPEC.validate_json(fields["spec"])
            view = record_view(self.job_id, {str(k): str(v) for k, v in fields.items()}, spec)  # read once
        except CORRUPT as exc:
            raise UnreadableEntry(f"outbox entry {self.entry_id} of job {self.job_id}: {exc}") from exc
        if event is EventType.PROGRESS and view.status.is_terminal():
            return None  # a chunk that landed after a cancel: receivers already heard the job's last word
        return callback_message(spec.callback, event, view, self.seq)


class Outbox:
    """Reading the outbox as one relay of the consumer group :data:`constants.CALLBACK_RELAY_GROUP`."""

    def __init__(self, client: redis.Redis, consumer: str, batch: int = 100) -> None:
        self.redis = client
        self.consumer = consumer
        self.batch = batch
        self._group_made = False

    def read(self, block_ms: int, count: int | None = None) -> list[OutboxEntry]:
        """Entries no relay has read yet, at most ``count`` (default ``batch``), waiting up to ``block_ms`` for the
        first (0: not at all; Redis reads a BLOCK of 0 as for ever)."""
        return self._read(">", block_ms or None, min(count or self.batch, self.batch))

    def read_own_pending(self) -> list[OutboxEntry]:
        """Entries this consumer read and has not acknowledged (it failed half-way, or restarted under its name)."""
        return self._read("0", None, self.batch)

    def _read(self, start: str, block_ms: int | None, count: int) -> list[OutboxEntry]:
        self._make_group()
        try:
            answer = self.redis.xreadgroup(
                constants.CALLBACK_RELAY_GROUP,
                self.consumer,
                {constants.CALLBACK_OUTBOX_KEY: start},
                count=count,
                block=block_ms,
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._group_made = False  # the stream was deleted (FLUSHDB, a Redis without persistence restarted)
            return []
        entries: list[OutboxEntry] = []
        for _stream, items in cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], answer or []):
            # An entry deleted while pending comes back without fields: nothing to send.
            entries += [_entry(entry_id, fields) for entry_id, fields in items if fields]
        return entries

    def claim(self, idle_s: float = CLAIM_AFTER_S) -> list[OutboxEntry]:
        """Entries another relay read and has not acknowledged for ``idle_s`` (it died): now this relay's."""
        self._make_group()
        try:
            answer = self.redis.xautoclaim(
                constants.CALLBACK_OUTBOX_KEY,
                constants.CALLBACK_RELAY_GROUP,
                self.consumer,
                min_idle_time=int(idle_s * 1000),
                start_id="0-0",
                count=self.batch,
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._group_made = False
            return []
        claimed = cast(list[tuple[bytes, dict[bytes, bytes] | None]], answer[1])
        # An entry deleted while pending comes back without fields (Redis 7 lists its id among the deleted).
        return [_entry(entry_id, fields) for entry_id, fields in claimed if fields]

    def done(self, entry_ids: list[str]) -> None:
        """Acknowledge and delete handled entries (one round trip)."""
        if not entry_ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        self.settle(pipe, entry_ids)
        pipe.execute()

    def settle(self, pipe: redis.client.Pipeline, entry_ids: list[str]) -> None:
        """Queue the acknowledgement and deletion of handled entries on ``pipe`` (another write's transaction: the
        attempt's record, so that the entry is acknowledged exactly when its attempt is recorded)."""
        pipe.xack(constants.CALLBACK_OUTBOX_KEY, constants.CALLBACK_RELAY_GROUP, *entry_ids)
        pipe.xdel(constants.CALLBACK_OUTBOX_KEY, *entry_ids)

    def backlog(self) -> int:
        """Entries in the outbox: not yet handed on, or handed on and not yet acknowledged."""
        return int(self.redis.xlen(constants.CALLBACK_OUTBOX_KEY))

    def _make_group(self) -> None:
        if self._group_made:
            return
        try:
            # From the stream's start: events written before any relay ever ran are relayed too.
            self.redis.xgroup_create(
                constants.CALLBACK_OUTBOX_KEY, constants.CALLBACK_RELAY_GROUP, id="0", mkstream=True
            )
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_made = True


def _entry(entry_id: bytes | str, fields: dict[bytes, bytes]) -> OutboxEntry:
    text = {as_text(k): as_text(v) for k, v in fields.items()}
    seq = text.get("seq", "")
    return OutboxEntry(
        entry_id=as_text(entry_id),
        job_id=text.get("job", ""),
        event=text.get("event", ""),
        seq=int(seq) if seq.isdigit() else 0,
        record=text.get("record", ""),
    )
