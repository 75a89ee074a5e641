"""One attempt at delivering a callback event, and what follows it: the record, then a retry, a stop or a dead letter.

:func:`run_delivery` is a plain function with its side effects injected (the Redis :class:`CallbackLedger` and a
``requeue`` callable), called by the thin ``genq.deliver_callback`` task and tested directly.

Retries are explicit re-enqueues of the same message with ``attempt`` counted up and ``due_at`` set, not Celery's
``self.retry``: the attempt number and the due time travel in genq's own validated payload (and so in the dead-letter
record), nothing depends on Celery's ``max_retries`` and retry headers, and a long wait can be split into hops.
Splitting is needed on Redis: a ``countdown`` message sits unacknowledged in a worker's memory until it is due, and
after ``GENQ_CELERY__VISIBILITY_TIMEOUT_S`` Redis hands it to another worker as well (Celery's docs: ETA tasks longer
than the visibility timeout run again, and again), so no hop is longer than half the timeout
(:func:`producer.core.callbacks.send.hop_countdown`). A message that arrives before ``due_at`` is put back for the rest.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from datetime import datetime, timedelta
from enum import StrEnum

import redis

from producer.core import constants
from producer.core.callbacks.events import CallbackDeadLetter, CallbackMessage, DeliveryRecord
from producer.core.callbacks.send import DeliveryResult, deliver, hop_countdown, next_delay
from producer.core.callbacks.ssrf import vetted_addresses
from producer.core.clock import utcnow
from producer.core.settings import WebhookSettings
from producer.errors import CallbackHostUnresolved, CallbackUrlRefused

log = logging.getLogger("genq.callbacks")

DEAD_LETTER_CAP = 10_000  # newest kept: a receiver down for days must not grow Redis without bound
HOP_SLACK_S = 0.5  # a retry due this soon is sent now rather than put back for a moment (timer granularity, skew)

Requeue = Callable[[CallbackMessage, float], None]  # (message, countdown in seconds)

_rng = random.Random()


class Outcome(StrEnum):
    """What became of one run of the delivery task."""

    DELIVERED = "delivered"  # the receiver answered 2xx
    RETRYING = "retrying"  # the attempt failed; the next one is enqueued
    WAITING = "waiting"  # a retry that arrived before it was due, put back to wait
    DEAD_LETTERED = "dead_lettered"  # the attempt failed and the retry schedule is used up
    GONE = "gone"  # the receiver answered 410: no more events for this job
    SKIPPED = "skipped"  # not sent: the receiver answered 410 to an earlier event of this job
    REFUSED = "refused"  # not sent: the URL now reaches an address genq does not call (no retry)


class CallbackLedger:
    """What deliveries leave in Redis: attempts per job, the 410 flag per job, and the dead letters."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s

    def gone_url(self, job_id: str) -> str | None:
        """The URL that answered 410 to an event of this job, or None while its callbacks may still be sent."""
        raw = self.redis.get(constants.JOB_CALLBACK_GONE_KEY.format(job_id=job_id))
        return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)

    def mark_gone(self, job_id: str, url: str) -> None:
        self.redis.set(constants.JOB_CALLBACK_GONE_KEY.format(job_id=job_id), url, ex=self.ttl_s)

    def record(self, job_id: str, record: DeliveryRecord) -> None:
        key = constants.JOB_EVENTS_KEY.format(job_id=job_id)
        pipe = self.redis.pipeline()
        pipe.rpush(key, record.model_dump_json())
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def dead_letter(self, letter: CallbackDeadLetter) -> None:
        pipe = self.redis.pipeline()
        pipe.lpush(constants.CALLBACK_DEAD_KEY, letter.model_dump_json())
        pipe.ltrim(constants.CALLBACK_DEAD_KEY, 0, DEAD_LETTER_CAP - 1)
        pipe.execute()

    def dead_letters(self, limit: int = 100) -> list[CallbackDeadLetter]:
        """The newest dead letters first."""
        raw = self.redis.lrange(constants.CALLBACK_DEAD_KEY, 0, limit - 1)
        return [CallbackDeadLetter.model_validate_json(item) for item in raw]


def run_delivery(
    message: CallbackMessage,
    *,
    webhook: WebhookSettings,
    ledger: CallbackLedger,
    requeue: Requeue,
    max_hop_s: float,
    rng: random.Random | None = None,
    now: Callable[[], datetime] = utcnow,
) -> Outcome:
    """Make one attempt at delivering ``message`` (if it is due and may be sent), record it, and enqueue what follows.

    In order: a retry that is not due yet is put back (``requeue``) and nothing else happens; an event of a job whose
    receiver answered 410 earlier is not sent; a URL that now reaches a refused address (:mod:`.ssrf`, with
    ``webhook.allow_hosts``) is not sent and not retried; otherwise one signed POST, to the addresses just vetted.
    Only 2xx counts. A 410 stops every later event of the job. Any other failure (including a host that does not
    resolve) is retried after :func:`.send.next_delay`, or, once ``webhook.retry_schedule_s`` is used up,
    dead-lettered.
    Every attempt, and every event not sent, is recorded with its attempt number and next retry time.

    Args:
        message: the event, its URL, its ``webhook-id`` and attempt number.
        webhook: secret, timeout, schedule, jitter and allow-list.
        ledger: where records, the 410 flag and dead letters live.
        requeue: sends a message back to the callbacks queue to run after a countdown (seconds).
        max_hop_s: the longest countdown a message may wait on the broker (half the visibility timeout).
        rng: the jitter's random source (tests pass a seeded one).
        now: the clock.

    Raises:
        ValueError: the signing secret is malformed (a configuration error; nothing is sent).
    """
    started = now()
    if message.due_at is not None:
        remaining = (message.due_at - started).total_seconds()
        if remaining > HOP_SLACK_S:
            requeue(message, hop_countdown(remaining, max_hop_s))
            return Outcome.WAITING

    def record(**fields: object) -> None:
        base = {"msg_id": message.msg_id, "type": message.event.type.value, "url": message.url}
        ledger.record(message.job_id, DeliveryRecord.model_validate({**base, "attempt": message.attempt, **fields}))

    gone = ledger.gone_url(message.job_id)
    if gone is not None:
        record(ok=False, sent=False, error=f"not sent: {gone} answered 410 Gone to an earlier event", at=started)
        return Outcome.SKIPPED

    try:
        addresses = vetted_addresses(message.url, webhook.allow_hosts)
    except CallbackUrlRefused as exc:
        record(ok=False, sent=False, error=f"not sent: {_reason(exc)}", at=started)
        log.warning("callback %s of job %s refused: %s", message.msg_id, message.job_id, _reason(exc))
        return Outcome.REFUSED
    except CallbackHostUnresolved as exc:  # DNS may be back for the next attempt
        result = DeliveryResult(ok=False, status_code=None, error=_reason(exc), duration_ms=0.0)
    else:
        result = deliver(
            message.url,
            message.event,
            secret=webhook.secret,
            msg_id=message.msg_id,
            timeout_s=webhook.timeout_s,
            connect_to=addresses,  # the vetted addresses: no second lookup that could answer differently
        )

    attempted = {
        "ok": result.ok,
        "status_code": result.status_code,
        "error": result.error,
        "duration_ms": round(result.duration_ms, 1),
        "at": started,
    }
    if result.ok:
        record(**attempted)
        return Outcome.DELIVERED
    if result.gone:
        ledger.mark_gone(message.job_id, message.url)
        record(**{**attempted, "error": "HTTP 410 Gone: no more events of this job are sent"})
        log.info("callback receiver %s of job %s answered 410: stopping its events", message.url, message.job_id)
        return Outcome.GONE

    delay = next_delay(message.attempt, webhook.retry_schedule_s, webhook.jitter, rng or _rng)
    if delay is None:
        record(**attempted, dead_lettered=True)
        ledger.dead_letter(
            CallbackDeadLetter(
                message=message,
                attempts=message.attempt,
                last_error=result.error,
                last_status_code=result.status_code,
                at=now(),
            )
        )
        log.error(
            "callback %s (%s) of job %s dead-lettered after %d attempts: %s",
            message.msg_id,
            message.event.type.value,
            message.job_id,
            message.attempt,
            result.error,
        )
        return Outcome.DEAD_LETTERED
    # The delay runs from the end of the failed attempt: a receiver that timed out gets its full pause.
    due = now() + timedelta(seconds=delay)
    record(**attempted, next_retry_at=due)  # recorded before the retry exists, so records stay in attempt order
    requeue(message.model_copy(update={"attempt": message.attempt + 1, "due_at": due}), hop_countdown(delay, max_hop_s))
    log.warning(
        "callback %s of job %s failed (attempt %d: %s); next attempt in %.1f s",
        message.msg_id,
        message.job_id,
        message.attempt,
        result.error,
        delay,
    )
    return Outcome.RETRYING


def _reason(exc: Exception) -> str:
    return str(exc).removeprefix("callback.url: ")
