"""One attempt at delivering a callback event, and what follows it: the record, then a retry, a stop or a dead letter.

:func:`run_delivery` is a plain function with its side effects injected (the Redis :class:`CallbackLedger`, a
``requeue`` callable and the process's :class:`Deliverer`), called by the thin ``genq.deliver_callback`` task and
tested directly.

A :class:`Deliverer` is what a delivery process keeps between attempts: one :class:`.send.WebhookClient` per thread
(connections kept alive per receiver host) and :class:`HostSlots`, at most ``GENQ_WEBHOOK__MAX_IN_FLIGHT_PER_HOST``
attempts at once to one receiver host. An event whose host has them all in flight goes back on the broker for a
later turn instead of holding a thread: a receiver that hangs holds that many threads, each for at most
``GENQ_WEBHOOK__ATTEMPT_DEADLINE_S``, and delays its own events only.

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
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from urllib.parse import urlsplit

import redis

from producer.core import constants
from producer.core.callbacks.events import CallbackDeadLetter, CallbackMessage, DeliveryRecord
from producer.core.callbacks.send import DeliveryResult, WebhookClient, deliver, hop_countdown, next_delay
from producer.core.callbacks.ssrf import redact_url, vetted_addresses
from producer.core.clock import utcnow
from producer.core.settings import WebhookSettings
from producer.errors import CallbackHostUnresolved, CallbackUrlRefused

log = logging.getLogger("genq.callbacks")

DEAD_LETTER_CAP = 10_000  # newest kept: a receiver down for days must not grow Redis without bound
HOP_SLACK_S = 0.5  # a retry due this soon is sent now rather than put back for a moment (timer granularity, skew)
HOST_WAIT_S = 0.5  # how long an attempt waits for a slot of a host that answers faster than this; slower: none
MIN_TURN_S = 0.2  # the shortest a deferred event waits on the broker before its next turn
PACE_WEIGHT = 0.3  # the weight of the latest attempt in a host's moving average of attempt durations
MAX_HOSTS_PACED = 10_000  # hosts whose pace a process remembers (the oldest forgotten first)

Requeue = Callable[[CallbackMessage, float], None]  # (message, countdown in seconds)
# Queues, on the transaction that writes an attempt's record, the commands that settle the event's source (the
# relay's acknowledgement of its outbox entry): recorded and settled in one round trip, never one without the other.
Settle = Callable[["redis.client.Pipeline"], None]

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
    DEFERRED = "deferred"  # not sent yet: its host had its most attempts in flight; put back for a later turn


# The outcomes whose record is the last thing an attempt writes: run_delivery's ``settle`` runs in its transaction.
SETTLED_OUTCOMES = frozenset({Outcome.DELIVERED, Outcome.GONE, Outcome.SKIPPED, Outcome.REFUSED})


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

    def record(self, job_id: str, record: DeliveryRecord, settle: Settle | None = None) -> None:
        """Append ``record`` to the job's delivery records; with ``settle``, its commands run in the same
        transaction, after the record."""
        key = constants.JOB_EVENTS_KEY.format(job_id=job_id)
        pipe = self.redis.pipeline()
        pipe.rpush(key, record.model_dump_json())
        pipe.expire(key, self.ttl_s)
        if settle is not None:
            settle(pipe)
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


@dataclass
class _Waiters:
    """The attempts of one host waiting for a slot: woken one per slot freed."""

    freed: threading.Condition
    count: int = 0


class HostSlots:
    """At most ``per_host`` attempts at once to one receiver host in this process, and when a deferred one may return.

    An attempt that finds its host's slots taken waits up to ``wait_s`` for one while the host answers faster than
    that (a burst to a healthy receiver), and otherwise is deferred at once (:meth:`turn_in`), so a receiver that
    hangs holds ``per_host`` threads, never the pool. Thread-safe.
    """

    def __init__(self, per_host: int, *, wait_s: float = HOST_WAIT_S, clock: Callable[[], float] = time.monotonic):
        if per_host < 1:
            raise ValueError(f"per_host must be >= 1, got {per_host}")
        self.per_host = per_host
        self.wait_s = wait_s
        self._clock = clock
        self._lock = threading.Lock()
        # host -> its attempts waiting for a slot (only hosts with some): a slot that frees wakes one attempt of its
        # own host, not every waiting thread of every host (which then found it taken: with 16 threads on one
        # receiver, a dozen context switches per event).
        self._waiters: dict[str, _Waiters] = {}
        self._running: dict[str, list[float]] = {}  # host -> start times of its attempts in flight
        self._pace: dict[str, float] = {}  # host -> moving average of its attempts' durations, in seconds
        self._next_turn: dict[str, float] = {}  # host -> the latest turn given to a deferred event (clock time)

    def acquire(self, host: str) -> float | None:
        """Take a slot of ``host``: its start time (to give to :meth:`release`), or None when none came free."""
        with self._lock:
            now = self._clock()
            give_up = now + (0.0 if self._slow(host, now) else self.wait_s)
            if len(self._running.get(host, ())) >= self.per_host:
                waiters = self._waiters.setdefault(host, _Waiters(threading.Condition(self._lock)))
                waiters.count += 1
                try:
                    while len(self._running.get(host, ())) >= self.per_host:
                        left = give_up - self._clock()
                        if left <= 0:
                            return None
                        waiters.freed.wait(left)
                finally:
                    waiters.count -= 1
                    if not waiters.count:
                        del self._waiters[host]
            started = self._clock()
            self._running.setdefault(host, []).append(started)
            return started

    def release(self, host: str, started: float) -> None:
        """Give back the slot taken at ``started``; the attempt's duration updates the host's pace."""
        with self._lock:
            running = self._running.get(host, [])
            running.remove(started)
            if not running:
                del self._running[host]
                self._forget_turns(host)
            took = max(0.0, self._clock() - started)
            previous = self._pace.pop(host, None)  # re-inserted last: the dict keeps hosts in order of use
            self._pace[host] = took if previous is None else (1 - PACE_WEIGHT) * previous + PACE_WEIGHT * took
            while len(self._pace) > MAX_HOSTS_PACED:
                del self._pace[next(iter(self._pace))]
            waiters = self._waiters.get(host)
            if waiters is not None:
                # One slot freed, one waiter woken. One whose wait ran out as it was woken still finds the slot
                # free when it checks, before it gives up, and takes it: the wake-up is never lost.
                waiters.freed.notify()

    def in_flight(self, host: str) -> int:
        with self._lock:
            return len(self._running.get(host, ()))

    def turn_in(self, host: str) -> float:
        """Seconds a deferred event of ``host`` should wait before it tries again.

        Deferred events get turns one after another, spaced by the time an attempt at this host takes (its moving
        average, or the age of its oldest attempt in flight if that is longer: a host that hangs has no finished
        attempt yet) divided by ``per_host``: about when a slot frees, in their order of arrival, and a host that
        hangs costs its events' turns at that pace only.
        """
        with self._lock:
            now = self._clock()
            spacing = max(self._pace.get(host, 0.0), self._oldest_age(host, now)) / self.per_host
            turn = max(now, self._next_turn.get(host, now)) + max(spacing, MIN_TURN_S / self.per_host)
            self._next_turn[host] = turn
            return max(MIN_TURN_S, turn - now)

    def _slow(self, host: str, now: float) -> bool:
        return max(self._pace.get(host, 0.0), self._oldest_age(host, now)) >= self.wait_s

    def _oldest_age(self, host: str, now: float) -> float:
        running = self._running.get(host)
        return now - min(running) if running else 0.0

    def _forget_turns(self, host: str) -> None:
        # Turns handed out and not due yet still pace the events holding them; past ones pace nothing.
        if self._next_turn.get(host, 0.0) <= self._clock():
            self._next_turn.pop(host, None)


class Deliverer:
    """What a delivery process keeps between attempts: a :class:`WebhookClient` per thread and the host slots."""

    def __init__(self, webhook: WebhookSettings) -> None:
        self.slots = HostSlots(webhook.max_in_flight_per_host)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[WebhookClient] = []

    def client(self) -> WebhookClient:
        """The calling thread's client, made on its first attempt."""
        client: WebhookClient | None = getattr(self._local, "client", None)
        if client is None or client.is_closed:
            client = WebhookClient()
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    @contextmanager
    def turn(self, host: str) -> Iterator[bool]:
        """Hold a slot of ``host`` for the block; yields False (and holds nothing) when none came free."""
        started = self.slots.acquire(host)
        try:
            yield started is not None
        finally:
            if started is not None:
                self.slots.release(host, started)

    def close(self) -> None:
        """Close every thread's connections."""
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()


def _secrets_of(
    message: CallbackMessage, webhook: WebhookSettings, signing_secrets: Callable[[str], list[str] | None] | None
) -> list[str]:
    """What signs ``message``: its tenant's own secrets, or the deployment's (no tenant, or one made before tenants
    had secrets)."""
    tenant = message.event.data.tenant
    own = signing_secrets(tenant) if tenant is not None and signing_secrets is not None else None
    return own or [webhook.secret]


def run_delivery(
    message: CallbackMessage,
    *,
    webhook: WebhookSettings,
    ledger: CallbackLedger,
    requeue: Requeue,
    max_hop_s: float,
    deliverer: Deliverer | None = None,
    signing_secrets: Callable[[str], list[str] | None] | None = None,
    rng: random.Random | None = None,
    now: Callable[[], datetime] = utcnow,
    settle: Settle | None = None,
) -> Outcome:
    """Make one attempt at delivering ``message`` (if it is due and may be sent), record it, and enqueue what follows.

    In order: a retry that is not due yet is put back (``requeue``) and nothing else happens; an event of a job whose
    receiver answered 410 earlier is not sent; an event whose receiver host has its most attempts in flight in this
    process (``deliverer.slots``) is put back for a later turn, unrecorded and not counted as an attempt; a URL that
    now reaches a refused address (:mod:`.ssrf`, with ``webhook.allow_hosts``) is not sent and not retried;
    otherwise one signed POST, to the addresses just vetted, cut off at ``webhook.attempt_deadline_s``.
    Only 2xx counts. A 410 stops every later event of the job. Any other failure (including a host that does not
    resolve and a passed deadline) is retried after :func:`.send.next_delay`, or, once ``webhook.retry_schedule_s``
    is used up, dead-lettered.
    Every attempt, and every event not sent, is recorded with its attempt number and next retry time.

    Args:
        message: the event, its URL, its ``webhook-id`` and attempt number.
        webhook: secret, timeouts, schedule, jitter and allow-list.
        ledger: where records, the 410 flag and dead letters live.
        requeue: sends a message back to the callbacks queue to run after a countdown (seconds).
        max_hop_s: the longest countdown a message may wait on the broker (half the visibility timeout).
        deliverer: the process's clients and host slots; None: a client for this attempt alone, no host limit.
        signing_secrets: a tenant's signing secrets (:class:`.secrets.TenantSecrets`), None for a tenant without
            any; events of such tenants and of jobs without one are signed with ``webhook.secret``.
        rng: the jitter's random source (tests pass a seeded one).
        now: the clock.
        settle: what closes the event's source (the relay's acknowledgement of its outbox entry), run in the
            transaction of the attempt's record when that record is the last thing written: on the outcomes of
            :data:`SETTLED_OUTCOMES`. On the others (a retry or a deferral enqueued, a dead letter) it is not run:
            the caller settles once ``run_delivery`` has returned, after what follows the attempt exists.

    Raises:
        ValueError: the signing secret is malformed (a configuration error; nothing is sent).
    """
    started = now()
    if message.due_at is not None:
        remaining = (message.due_at - started).total_seconds()
        if remaining > HOP_SLACK_S:
            requeue(message, hop_countdown(remaining, max_hop_s))
            return Outcome.WAITING

    def record(settling: Settle | None = None, /, **fields: object) -> None:
        # ``settle`` rides on the record that is the attempt's last write: acknowledged exactly when recorded.
        base = {"msg_id": message.msg_id, "type": message.event.type.value, "url": message.url}
        entry = DeliveryRecord.model_validate({**base, "attempt": message.attempt, **fields})
        ledger.record(message.job_id, entry, settling)

    gone = ledger.gone_url(message.job_id)
    if gone is not None:
        record(
            settle, ok=False, sent=False, error=f"not sent: {gone} answered 410 Gone to an earlier event", at=started
        )
        return Outcome.SKIPPED

    host = _host_of(message.url)
    with _turn(deliverer, host) as busy_for:
        if busy_for is not None:  # the host has its most attempts in flight: back on the broker for a later turn
            later = message.model_copy(update={"due_at": started + timedelta(seconds=busy_for)})
            requeue(later, hop_countdown(busy_for, max_hop_s))
            log.debug("callback %s of job %s deferred %.1f s: %s busy", message.msg_id, message.job_id, busy_for, host)
            return Outcome.DEFERRED
        try:
            addresses = vetted_addresses(message.url, webhook.allow_hosts)
        except CallbackUrlRefused as exc:
            refusal = _reason(exc)
            record(settle, ok=False, sent=False, error=f"not sent: {refusal}", at=started)
            log.warning("callback %s of job %s refused: %s", message.msg_id, message.job_id, refusal)
            return Outcome.REFUSED
        except CallbackHostUnresolved as exc:  # DNS may be back for the next attempt
            result = DeliveryResult(ok=False, status_code=None, error=_reason(exc), duration_ms=0.0)
        else:
            result = deliver(
                message.url,
                message.event,
                secret=_secrets_of(message, webhook, signing_secrets),
                msg_id=message.msg_id,
                timeout_s=webhook.timeout_s,
                deadline_s=webhook.attempt_deadline_s,
                client=None if deliverer is None else deliverer.client(),
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
        record(settle, **attempted)
        return Outcome.DELIVERED
    if result.gone:
        ledger.mark_gone(message.job_id, message.url)
        record(settle, **{**attempted, "error": "HTTP 410 Gone: no more events of this job are sent"})
        receiver = redact_url(message.url)
        log.info("callback receiver %s of job %s answered 410: stopping its events", receiver, message.job_id)
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


def _host_of(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:  # malformed: the SSRF check refuses it, under one shared key
        return ""


@contextmanager
def _turn(deliverer: Deliverer | None, host: str) -> Iterator[float | None]:
    # Holds a slot of the host for the block and yields None; or, none free, holds nothing and yields how long the
    # event should wait before its next turn.
    if deliverer is None:
        yield None
        return
    with deliverer.turn(host) as admitted:
        yield None if admitted else deliverer.slots.turn_in(host)
