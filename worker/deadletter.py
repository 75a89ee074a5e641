"""Dead letters: messages a worker cannot run, acked and kept in Redis with the reason instead of lost or looping.

A message on a generate queue can be poison: not a kombu message at all (pushed by hand, a bug elsewhere), a
Celery envelope whose body does not decode or has a refused content type (pickle), a task genq does not know, a
body that is not Celery's ``[args, kwargs, embed]``, arguments that are not a ``GenerateJob``, a job with no record,
or a job that crashed its worker on every delivery. Retrying helps none of them, so each is recorded once at the
head of the Redis list ``genq:deadletter`` (:class:`DeadLetter` as JSON; the newest ``MAX_ENTRIES`` kept) and the
worker goes on serving. Where each kind is caught:

- the transport (:class:`Transport`): kombu decodes a list element inside the worker's event loop, and an element
  that is not JSON stops the whole worker ("Unrecoverable error"); this transport records it instead.
- the consumer (:class:`Consumer`): Celery's hooks for messages it refuses (undecodable body, refused content
  type, unknown task, no task header), and any other error turning a message into a request (a body that is not
  a 3-item list raises out of Celery's handler and stops the worker, the message coming back for the next one).
- the task (:func:`record_task`, from ``worker.tasks``): arguments that are not a job, a job with no record, a task
  that raised; and ``worker.jobs`` for a job delivered more than ``GENQ_CELERY__MAX_DELIVERIES`` times.
- the callback outbox (stage ``outbox``, ``worker.relay``): an event entry the relay cannot turn into a message.
- the job record (stage ``record``, written by ``producer.core.store``, which cannot import this module): a record
  no reader can parse, recorded once by the first reader that meets it; the readers skip it.
"""

from __future__ import annotations

import functools
import json
import logging
from datetime import UTC, datetime
from queue import Empty
from typing import Any, Literal

import redis
from celery import Task
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.message import Message
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from pydantic import BaseModel

from producer.core import constants
from producer.core.callbacks.outbox import OutboxEntry
from producer.core.clock import utcnow
from worker.outage import OUTAGES, Backlog

log = logging.getLogger("genq.deadletter")

MAX_BODY_CHARS = 4096  # of a dead letter's body; enough to see what it was, bounded whatever was pushed
MAX_ENTRIES = 10_000  # the list is trimmed to this many: a flood of garbage cannot fill Redis
# Dead letters recorded while Redis is away, written once it answers (at most as many as the list keeps).
BACKLOG = Backlog("dead-letters", limit=MAX_ENTRIES)

Stage = Literal["transport", "consumer", "task", "record", "outbox"]


class DeadLetter(BaseModel):
    """One message a worker gave up on: why, what it was (raw body, truncated), where it was caught, when."""

    reason: str
    # transport: not a kombu message; consumer: Celery refused it; task: genq refused or it raised; record: a job
    # record genq cannot read (written by producer.core.store, which the first reader to meet it records)
    stage: Stage
    queue: str | None = None
    task: str | None = None  # Celery task name, when the message had one
    message_id: str | None = None  # Celery task id, when the message had one
    job_id: str | None = None  # when the message named a job
    body: str  # the raw body as text (bytes that are not UTF-8 escaped), at most MAX_BODY_CHARS
    body_size: int  # the whole body's length, in bytes
    at: datetime


def record(
    client: redis.Redis,
    reason: str,
    body: bytes | str,
    *,
    stage: Stage,
    queue: str | None = None,
    task: str | None = None,
    message_id: str | None = None,
    job_id: str | None = None,
) -> DeadLetter:
    """Log and push a dead letter onto ``genq:deadletter``; returns it. Never raises for Redis being away: the
    entry then waits in memory (:data:`BACKLOG`) and is written once Redis answers; the worker goes on either way."""
    raw = body if isinstance(body, bytes) else body.encode()
    entry = DeadLetter(
        reason=reason,
        stage=stage,
        queue=queue,
        task=task,
        message_id=message_id,
        job_id=job_id,
        body=raw.decode("utf-8", errors="backslashreplace")[:MAX_BODY_CHARS],
        body_size=len(raw),
        at=utcnow(),
    )
    log.error(
        "dead-lettered message %s (task %s, job %s) from %s (%s stage): %s",
        message_id or "?",
        task or "?",
        job_id or "?",
        queue or "?",
        stage,
        reason,
    )
    payload = entry.model_dump_json()
    try:
        _push(client, payload)
    except OUTAGES as exc:  # Redis is away: the entry waits in memory and is written once Redis answers
        if BACKLOG.add(
            functools.partial(_push, client, payload), what=f"the dead letter of {message_id or queue or 'a message'}"
        ):
            log.warning("could not store the dead letter yet (%s); it is written once Redis answers", exc)
        else:
            log.error("could not store the dead letter (%s) and %d wait already: %s", exc, BACKLOG.limit, payload)
    except redis.RedisError as exc:  # an answer (out of memory, a wrong type): retrying the same write cannot help
        log.error("could not store the dead letter (%s): %s", exc, payload)
    return entry


def record_outbox_entry(client: redis.Redis, entry: OutboxEntry, reason: str) -> DeadLetter:
    """Dead-letter a callback outbox entry the relay cannot read (its event cannot be sent; the others are)."""
    body = json.dumps({"job": entry.job_id, "event": entry.event, "seq": entry.seq, "record": entry.record})
    return record(client, reason, body, stage="outbox", queue=constants.CALLBACK_OUTBOX_KEY, job_id=entry.job_id)


def _push(client: redis.Redis, payload: str) -> None:
    pipe = client.pipeline()
    pipe.lpush(constants.DEADLETTER_KEY, payload)
    pipe.ltrim(constants.DEADLETTER_KEY, 0, MAX_ENTRIES - 1)
    pipe.execute()


@functools.cache
def client_for(url: str) -> redis.Redis:
    """One client per URL and process (redis-py reopens its connections in a forked child)."""
    return redis.Redis.from_url(url)


def record_task(task: Task, reason: str, args: Any, *, job_id: str | None = None, request: Any = None) -> DeadLetter:
    """Dead-letter the message ``task`` was delivered (``args``: its arguments, as JSON).

    ``request``: the message's request (a Celery signal's dict or context); default the task's current one.
    """
    request = task.request if request is None else request
    delivery_info = _field(request, "delivery_info")
    message_id = _field(request, "id")
    return record(
        client_for(task.app.conf.broker_url),
        reason,
        json.dumps(args, default=str),
        stage="task",
        queue=delivery_info.get("routing_key") if isinstance(delivery_info, dict) else None,
        task=task.name,
        message_id=None if message_id is None else str(message_id),
        job_id=job_id,
    )


def _field(request: Any, name: str) -> Any:
    return request.get(name) if isinstance(request, dict) else getattr(request, name, None)


# -- the transport ---------------------------------------------------------------------------------------------


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, except that a list element that is not a kombu message is dead-lettered instead of
    raising out of the event loop (which stops the worker). Only the event loop's read (BRPOP) is guarded: every
    pool ``genq worker`` offers (threads, prefork, solo) consumes through it.

    It also keeps working after Celery collected its connection. When the broker connection is lost (Redis
    restarting), Celery's consumer collects the connection, which forgets the broker's address, then closes this
    channel: kombu's channel then needs that address to restore its unacknowledged messages and raised
    AttributeError, an "Unrecoverable error" that stopped the worker (kombu 5.7); and the tasks still running
    acknowledge (or hand back) their messages through this channel when they end. The channel keeps the address, so
    these reach Redis once it answers (the unacked hash lives in Redis, so an ack by delivery tag works from any
    connection)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._broker = self.connection.client  # kombu's Connection: the broker URL and its options

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:  # collected after a connection loss: this channel outlives it
            self.connection.client = getattr(self, "_broker", None)
        return super()._connparams(asynchronous=asynchronous)

    def _brpop_read(self, **options: Any) -> bool:
        # kombu 5.7's _brpop_read with the decoding guarded; keep in step with kombu when upgrading it
        # (tests/chaos/test_poison.py pushes such elements at a real worker).
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next iteration reconnects
                raise
            if not reply:
                raise Empty()
            key, raw = reply
            queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            payload = self._decode_or_dead_letter(raw, queue)
            if payload is not None:
                self.connection._deliver(payload, queue)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu itself sets None here
            self._flush_brpop_reauth()

    def _decode_or_dead_letter(self, raw: bytes, queue: str) -> dict[str, Any] | None:
        """The kombu message in ``raw``, or None after dead-lettering an element that is not one."""
        try:
            payload = loads(bytes_to_str(raw))
            message = self.Message(payload, channel=self)  # what the consumer builds next: fails the same way
            if not isinstance(message.delivery_tag, str):
                raise ValueError(f"delivery_tag must be a string, not {type(message.delivery_tag).__name__}")
        except Exception as exc:  # anything in it may be wrong: it came from outside
            with self.conn_or_acquire() as client:
                record(client, f"not a kombu message ({_describe(exc)})", raw, stage="transport", queue=queue)
            return None
        return dict(payload)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel` (``broker_transport`` of genq's Celery app)."""

    Channel = Channel


# -- the consumer ----------------------------------------------------------------------------------------------


class Consumer(CeleryConsumer):
    """Celery's consumer, recording every message it refuses as a dead letter (``worker_consumer`` setting)."""

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        self._dead_letter(message, f"the body could not be decoded ({_describe(exc)})")
        super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Message) -> None:
        self._dead_letter(message, "not a Celery task message (no task header)")
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        self._dead_letter(message, f"unknown task {_headers(message).get('task')!r} (genq runs genq.* tasks)")
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        self._dead_letter(message, f"invalid task message ({_describe(exc)})")
        super().on_invalid_task(body, message, exc)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)
        connection_errors = self.connection_errors

        def on_task_received(message: Message) -> Any:
            refusal = self._refusal(message)
            if refusal is not None:  # acked and recorded before Celery runs it or holds it in memory
                self._dead_letter(message, refusal)
                message.reject_log_error(log, connection_errors)  # on Redis: removed for good
                return None
            try:
                return handle(message)
            except connection_errors:  # the broker went away: Celery reconnects
                raise
            except Exception as exc:  # a message Celery cannot turn into a request; raising would stop the worker
                self._dead_letter(message, f"not a task message Celery can run ({_describe(exc)})")
                if not message.acknowledged:
                    message.reject_log_error(log, connection_errors)  # on Redis: removed for good
                return None

        return on_task_received

    def _refusal(self, message: Message) -> str | None:
        """Why genq will not run a message Celery would: not one of genq's tasks (Celery's own, such as
        ``celery.backend_cleanup``, are registered in every app), or due so far ahead that it would sit in the
        worker's memory past the visibility timeout (genq's own retries wait at most half of it)."""
        headers = _headers(message)
        task = headers.get("task")
        if isinstance(task, str) and not task.startswith(constants.TASK_PREFIX):
            return f"not a genq task: {task!r} (genq workers run genq.* tasks only)"
        eta = headers.get("eta")
        if eta:
            try:
                due = datetime.fromisoformat(str(eta))
            except ValueError:
                return f"an eta that is not a time: {str(eta)[:64]!r}"
            if due.tzinfo is None:
                due = due.replace(tzinfo=UTC)
            horizon = float(self.app.conf.broker_transport_options.get("visibility_timeout", 3600))
            if (due - datetime.now(UTC)).total_seconds() > horizon:
                return f"due at {due.isoformat()}, past the visibility timeout ({horizon:g} s) from now"
        return None

    def _dead_letter(self, message: Message, reason: str) -> None:
        headers = _headers(message)
        body = message.body if isinstance(message.body, bytes | str) else repr(message.body)
        record(
            client_for(self.app.conf.broker_url),
            reason,
            body,
            stage="consumer",
            queue=(message.delivery_info or {}).get("routing_key"),
            task=_text(headers.get("task")),
            message_id=_text(headers.get("id")),
        )


def _headers(message: Message) -> dict[str, Any]:
    headers = message.headers
    return headers if isinstance(headers, dict) else {}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
