"""The retry policy (pure) and one delivery run against real Redis and a real loopback receiver, without Celery."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis
from keepalive_receiver import KeepAliveReceiver
from webhook_receiver import WebhookReceiver

from producer.contract import Callback, EventType, JobStatus, JobView, Progress
from producer.core import constants
from producer.core.callbacks.delivery import (
    SETTLED_OUTCOMES,
    CallbackLedger,
    Deliverer,
    HostSlots,
    Outcome,
    Settle,
    run_delivery,
)
from producer.core.callbacks.events import CallbackMessage, DeliveryRecord, callback_message
from producer.core.callbacks.send import hop_countdown, next_delay
from producer.core.settings import STANDARD_RETRY_SCHEDULE_S, WebhookSettings

SHORT = [0.0, 0.2, 0.2, 0.2]
STANDARD = list(STANDARD_RETRY_SCHEDULE_S)


class Fixed(random.Random):
    """An rng whose uniform(a, b) always lands at the same fraction of the interval."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


@pytest.mark.parametrize(
    ("attempt", "schedule", "expected"),
    [
        (1, STANDARD, 5.0),
        (2, STANDARD, 300.0),
        (3, STANDARD, 1800.0),
        (4, STANDARD, 7200.0),
        (9, STANDARD, 86400.0),
        (10, STANDARD, None),  # ten attempts in all: the window is used up
        (11, STANDARD, None),
        (1, SHORT, 0.2),
        (3, SHORT, 0.2),
        (4, SHORT, None),
        (1, [0.0], None),  # a single attempt, no retries
    ],
)
def test_next_delay_follows_the_schedule_without_jitter(
    attempt: int, schedule: list[float], expected: float | None
) -> None:
    assert next_delay(attempt, schedule, 0.0, random.Random(1)) == expected


@pytest.mark.parametrize(
    ("fraction", "jitter", "expected"),
    [(0.0, 0.1, 270.0), (0.5, 0.1, 300.0), (1.0, 0.1, 330.0), (0.0, 1.0, 0.0), (1.0, 1.0, 600.0), (0.25, 0.2, 270.0)],
)
def test_jitter_scales_the_delay_within_one_plus_or_minus_the_fraction(
    fraction: float, jitter: float, expected: float
) -> None:
    assert next_delay(2, STANDARD, jitter, Fixed(fraction)) == pytest.approx(expected)


def test_jittered_delays_spread_and_stay_in_bounds() -> None:
    rng = random.Random(42)
    delays = [next_delay(3, STANDARD, 0.1, rng) for _ in range(500)]
    assert all(d is not None and 1620.0 <= d <= 1980.0 for d in delays)
    assert len({round(d or 0, 3) for d in delays}) > 400  # not one value: retries of an outage spread out


def test_the_standard_window_is_about_three_days() -> None:
    window_h = sum(next_delay(a, STANDARD, 0.0, random.Random()) or 0 for a in range(1, 10)) / 3600
    assert window_h == pytest.approx(75.6, abs=0.1)


@pytest.mark.parametrize(("attempt", "jitter"), [(0, 0.1), (-1, 0.1), (1, -0.1), (1, 1.5)])
def test_next_delay_refuses_nonsense(attempt: int, jitter: float) -> None:
    with pytest.raises(ValueError):
        next_delay(attempt, STANDARD, jitter, random.Random())


@pytest.mark.parametrize(
    ("remaining", "max_hop", "expected"),
    [(0.2, 1800.0, 0.2), (300.0, 1800.0, 300.0), (7200.0, 1800.0, 1800.0), (86400.0, 1800.0, 1800.0), (-3.0, 60, 0.0)],
)
def test_hop_countdown_never_exceeds_the_hop(remaining: float, max_hop: float, expected: float) -> None:
    assert hop_countdown(remaining, max_hop) == expected


def test_hop_countdown_needs_a_positive_hop() -> None:
    with pytest.raises(ValueError):
        hop_countdown(10.0, 0.0)


# -- host slots: pure, with a fake clock -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_host_gets_at_most_its_slots_and_other_hosts_are_unaffected() -> None:
    slots = HostSlots(2, wait_s=0.0, clock=Clock())
    first, second = slots.acquire("slow.example"), slots.acquire("slow.example")
    assert first is not None and second is not None
    assert slots.acquire("slow.example") is None  # full: turned away at once, no thread held
    assert slots.acquire("fast.example") is not None
    slots.release("slow.example", first)
    assert slots.acquire("slow.example") is not None and slots.in_flight("slow.example") == 2


def test_deferred_turns_follow_each_other_at_the_pace_of_the_hosts_attempts() -> None:
    clock = Clock()
    slots = HostSlots(2, wait_s=0.0, clock=clock)
    started = [slots.acquire("hang.example") for _ in range(2)]
    clock.t += 10.0  # both still in flight after 10 s: the host takes at least that long per attempt
    assert [round(slots.turn_in("hang.example"), 6) for _ in range(3)] == [5.0, 10.0, 15.0]
    for start in started:
        assert start is not None
        slots.release("hang.example", start)  # each took 10 s
    clock.t += 15.0  # the turns handed out are past: the next one starts from now, at the measured pace
    assert slots.turn_in("hang.example") == pytest.approx(5.0)
    assert slots.turn_in("quick.example") == pytest.approx(0.2)  # unknown and idle: the shortest wait


def test_an_attempt_waits_briefly_for_a_quick_hosts_slot() -> None:
    slots = HostSlots(1, wait_s=2.0)
    held = slots.acquire("quick.example")
    assert held is not None
    timer = threading.Timer(0.1, slots.release, ("quick.example", held))
    timer.start()
    assert slots.acquire("quick.example") is not None  # waited ~0.1 s instead of going back on the broker
    timer.join()


def test_each_freed_slot_goes_to_one_waiting_attempt_in_turn_and_none_waits_out_its_time() -> None:
    slots = HostSlots(1, wait_s=5.0)
    held = slots.acquire("quick.example")
    other = slots.acquire("other.example")  # another host's attempt in flight: its slot is not for these
    assert held is not None and other is not None
    got: list[float | None] = []
    lock = threading.Lock()

    def attempt() -> None:
        started = slots.acquire("quick.example")
        with lock:
            got.append(started)
        if started is not None:
            time.sleep(0.02)
            slots.release("quick.example", started)

    waiting = [threading.Thread(target=attempt) for _ in range(6)]
    for thread in waiting:
        thread.start()
    time.sleep(0.1)  # all six waiting for the one slot
    begun = time.monotonic()
    slots.release("quick.example", held)
    for thread in waiting:
        thread.join(10)
    assert len(got) == 6 and None not in got
    assert time.monotonic() - begun < 2.0  # handed on as each frees, never after a waiter's 5 s ran out
    assert slots.in_flight("quick.example") == 0 and slots.in_flight("other.example") == 1


# -- one delivery run, against real Redis and a real receiver ---------------------------------------------------

JOB_ID = "job-delivery-1"
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def _message(url: str, event: EventType = EventType.SUCCEEDED, seq: int = 3, job_id: str = JOB_ID) -> CallbackMessage:
    view = JobView(
        id=job_id,
        status=JobStatus.SUCCEEDED,
        model="fmnist-cgan",
        model_version="fmnist-cgan@1",
        seed=1,
        progress=Progress(done=1, total=1),
        created_at=T0,
    )
    message = callback_message(Callback.model_validate({"url": url}), event, view, seq)
    assert message is not None
    return message


class Harness:
    """run_delivery with a controllable clock and the requeued messages collected instead of sent."""

    def __init__(
        self,
        client: redis.Redis,
        webhook: WebhookSettings,
        max_hop_s: float = 1800.0,
        deliverer: Deliverer | None = None,
    ) -> None:
        self.ledger = CallbackLedger(client, ttl_s=3600)
        self.webhook = webhook
        self.max_hop_s = max_hop_s
        self.deliverer = deliverer
        self.now = T0
        self.requeued: list[tuple[CallbackMessage, float]] = []

    def run(self, message: CallbackMessage, settle: Settle | None = None) -> Outcome:
        clock: Callable[[], datetime] = lambda: self.now  # noqa: E731
        return run_delivery(
            message,
            webhook=self.webhook,
            ledger=self.ledger,
            requeue=lambda m, countdown: self.requeued.append((m, countdown)),
            max_hop_s=self.max_hop_s,
            deliverer=self.deliverer,
            rng=random.Random(7),
            now=clock,
            settle=settle,
        )

    def records(self, job_id: str = JOB_ID) -> list[DeliveryRecord]:
        raw = self.ledger.redis.lrange(constants.JOB_EVENTS_KEY.format(job_id=job_id), 0, -1)
        return [DeliveryRecord.model_validate_json(item) for item in raw]


def _webhook(**fields: object) -> WebhookSettings:
    return WebhookSettings.model_validate(
        {"retry_schedule_s": SHORT, "jitter": 0.0, "allow_hosts": ["127.0.0.1"], "timeout_s": 5.0, **fields}
    )


def test_first_attempt_delivered_is_recorded_and_nothing_is_requeued(
    redis_client: redis.Redis, webhook_receiver: WebhookReceiver
) -> None:
    harness = Harness(redis_client, _webhook())
    assert harness.run(_message(webhook_receiver.url)) is Outcome.DELIVERED
    [record] = harness.records()
    assert record.ok and record.sent and record.attempt == 1 and record.status_code == 200
    assert record.next_retry_at is None and not record.dead_lettered and record.at == T0
    assert harness.requeued == []


def test_failures_are_retried_with_the_same_webhook_id_until_delivered(
    redis_client: redis.Redis, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script([500, 503, 408], reject_unverified=True)
    harness = Harness(redis_client, _webhook())
    message = _message(webhook_receiver.url)
    outcomes = []
    for _ in range(4):
        outcomes.append(harness.run(message))
        if harness.requeued:
            message, countdown = harness.requeued.pop()
            assert countdown == pytest.approx(0.2)
            assert message.due_at == harness.now + timedelta(seconds=0.2)
            harness.now = message.due_at
    assert outcomes == [Outcome.RETRYING] * 3 + [Outcome.DELIVERED]

    received = webhook_receiver.wait_for(4)
    assert [r.status for r in received] == [500, 503, 408, 200]
    assert {r.headers["webhook-id"] for r in received} == {message.msg_id}
    assert received[-1].verified, received[-1].verify_error
    records = harness.records()
    assert [r.attempt for r in records] == [1, 2, 3, 4]
    assert [r.status_code for r in records] == [500, 503, 408, 200]
    assert [r.next_retry_at for r in records] == [T0 + timedelta(seconds=0.2 * i) for i in (1, 2, 3)] + [None]
    assert {r.msg_id for r in records} == {message.msg_id}


def test_a_used_up_schedule_dead_letters_the_event(
    redis_client: redis.Redis, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script([], default_status=500)
    harness = Harness(redis_client, _webhook(retry_schedule_s=[0, 0.2]))
    first = _message(webhook_receiver.url)
    assert harness.run(first) is Outcome.RETRYING
    retry, _ = harness.requeued.pop()
    harness.now = retry.due_at or T0
    assert harness.run(retry) is Outcome.DEAD_LETTERED
    assert harness.requeued == []

    last = harness.records()[-1]
    assert last.dead_lettered and last.attempt == 2 and last.next_retry_at is None and last.error == "HTTP 500"
    [letter] = harness.ledger.dead_letters()
    assert letter.attempts == 2 and letter.last_status_code == 500 and letter.last_error == "HTTP 500"
    assert letter.message.msg_id == first.msg_id and letter.message.event == first.event


def test_410_stops_this_and_every_later_event_of_the_job_only(
    redis_client: redis.Redis, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script([410])
    harness = Harness(redis_client, _webhook())
    assert harness.run(_message(webhook_receiver.url, EventType.RUNNING, seq=1)) is Outcome.GONE
    assert harness.run(_message(webhook_receiver.url, EventType.SUCCEEDED, seq=2)) is Outcome.SKIPPED
    assert harness.requeued == []
    assert len(webhook_receiver.received) == 1

    gone, skipped = harness.records()
    assert gone.status_code == 410 and gone.sent and gone.next_retry_at is None and not gone.dead_lettered
    assert not skipped.sent and skipped.status_code is None and "410" in (skipped.error or "")
    assert redis_client.ttl(constants.JOB_CALLBACK_GONE_KEY.format(job_id=JOB_ID)) > 0

    other = _message(webhook_receiver.url, job_id="job-delivery-2")
    assert harness.run(other) is Outcome.DELIVERED  # another job's callbacks are unaffected


def test_a_url_that_now_reaches_a_refused_address_is_recorded_and_not_retried(
    redis_client: redis.Redis, webhook_receiver: WebhookReceiver
) -> None:
    harness = Harness(redis_client, _webhook(allow_hosts=[]))  # the worker's allow-list no longer has loopback
    assert harness.run(_message(webhook_receiver.url)) is Outcome.REFUSED
    assert harness.requeued == [] and webhook_receiver.received == []
    [record] = harness.records()
    assert not record.ok and not record.sent and record.attempt == 1
    assert record.error is not None and record.error.startswith("not sent: callback host '127.0.0.1'")
    assert "loopback" in record.error


def test_a_host_that_stops_resolving_is_a_failed_attempt_and_retried(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_dns(host: str) -> list[str]:
        raise OSError(-3, "Temporary failure in name resolution")

    monkeypatch.setattr("producer.core.callbacks.ssrf.resolve_host", no_dns)
    harness = Harness(redis_client, _webhook())
    assert harness.run(_message("https://hooks.shop.test/genq")) is Outcome.RETRYING
    [record] = harness.records()
    assert record.sent and record.error is not None and "does not resolve" in record.error
    [(retry, _)] = harness.requeued
    assert retry.attempt == 2


def test_a_long_wait_is_made_of_hops_inside_the_visibility_timeout(
    redis_client: redis.Redis, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script([500])
    harness = Harness(redis_client, _webhook(retry_schedule_s=[0, 7200]), max_hop_s=1800.0)
    assert harness.run(_message(webhook_receiver.url)) is Outcome.RETRYING
    retry, countdown = harness.requeued.pop()
    assert countdown == 1800.0 and retry.due_at == T0 + timedelta(hours=2) and retry.attempt == 2

    for hop in range(1, 4):  # arrives after each hop: put back for the rest, nothing sent or recorded
        harness.now = T0 + timedelta(seconds=1800 * hop)
        assert harness.run(retry) is Outcome.WAITING
        again, countdown = harness.requeued.pop()
        assert again == retry and countdown == 1800.0
    harness.now = T0 + timedelta(hours=2, seconds=-0.1)  # due within the slack: sent now
    assert harness.run(retry) is Outcome.DELIVERED
    assert [r.attempt for r in harness.records()] == [1, 2]
    assert len(webhook_receiver.received) == 2


def test_the_post_goes_to_the_vetted_address_without_a_second_lookup(
    redis_client: redis.Redis, webhook_receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[str] = []
    answers = iter([["127.0.0.1"], ["10.0.0.1"]])  # a rebinding DNS: the second answer would be internal

    def rebinding(host: str) -> list[str]:
        lookups.append(host)
        return next(answers)

    monkeypatch.setattr("producer.core.callbacks.ssrf.resolve_host", rebinding)
    port = webhook_receiver.url.rsplit(":", 1)[1].split("/")[0]
    harness = Harness(redis_client, _webhook())
    assert harness.run(_message(f"http://hooks.shop.test:{port}/hook")) is Outcome.DELIVERED
    assert lookups == ["hooks.shop.test"]  # one lookup: checked and connected to the same answer
    [received] = webhook_receiver.wait_for(1)
    assert received.headers["host"] == f"hooks.shop.test:{port}" and received.verified


def test_an_event_whose_host_is_busy_goes_back_for_a_later_turn_unsent_and_unrecorded(
    redis_client: redis.Redis, webhook_receiver: WebhookReceiver
) -> None:
    webhook = _webhook(max_in_flight_per_host=1)
    deliverer = Deliverer(webhook)
    harness = Harness(redis_client, webhook, deliverer=deliverer)
    held = deliverer.slots.acquire("127.0.0.1")  # another thread's attempt, hanging
    assert held is not None
    message = _message(webhook_receiver.url)
    assert harness.run(message) is Outcome.DEFERRED
    [(later, countdown)] = harness.requeued
    assert later.attempt == 1 and later.msg_id == message.msg_id  # not an attempt: the same one, later
    assert later.due_at == T0 + timedelta(seconds=countdown) and countdown >= 0.2
    assert harness.records() == [] and webhook_receiver.received == []

    deliverer.slots.release("127.0.0.1", held)
    harness.now = later.due_at or T0
    assert harness.run(later) is Outcome.DELIVERED
    assert [r.attempt for r in harness.records()] == [1]
    deliverer.close()


def test_a_reused_client_still_refuses_a_host_that_rebinds_to_an_internal_address(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = iter([["127.0.0.1"], ["10.0.0.1"], ["127.0.0.1"]])  # public (allow-listed), rebound, back again
    monkeypatch.setattr("producer.core.callbacks.ssrf.resolve_host", lambda host: next(answers))
    webhook = _webhook()
    deliverer = Deliverer(webhook)
    harness = Harness(redis_client, webhook, deliverer=deliverer)
    with KeepAliveReceiver() as receiver:
        url = f"http://hooks.shop.test:{receiver.port}/hook"
        assert harness.run(_message(url, seq=1)) is Outcome.DELIVERED
        assert deliverer.client().connections() == 1  # kept alive, to 127.0.0.1
        assert harness.run(_message(url, seq=2)) is Outcome.REFUSED  # vetted again: the live connection is no pass
        assert harness.run(_message(url, seq=3)) is Outcome.DELIVERED
    first, third = receiver.requests  # the refused event never reached the receiver
    assert first.peer == third.peer  # the connection had stayed open all along
    refused = harness.records()[1]
    assert not refused.sent and refused.error is not None and "10.0.0.1 (private)" in refused.error
    deliverer.close()


def test_a_trickling_receiver_fails_the_attempt_at_its_deadline_and_it_is_retried(redis_client: redis.Redis) -> None:
    webhook = _webhook(timeout_s=5.0, attempt_deadline_s=0.8, retry_schedule_s=[0, 0.2])
    deliverer = Deliverer(webhook)
    harness = Harness(redis_client, webhook, deliverer=deliverer)
    with KeepAliveReceiver(trickle_s=0.25) as tarpit:
        assert harness.run(_message(tarpit.url())) is Outcome.RETRYING
        [(retry, _)] = harness.requeued
        harness.now = retry.due_at or T0
        assert harness.run(retry) is Outcome.DEAD_LETTERED
    first, last = harness.records()
    assert first.error is not None and first.error.startswith("no answer within the attempt deadline of 0.8 s")
    assert 750 <= first.duration_ms < 2000 and last.dead_lettered
    assert deliverer.slots.in_flight("127.0.0.1") == 0  # both slots given back
    [letter] = harness.ledger.dead_letters()
    assert letter.attempts == 2 and letter.last_error == last.error
    deliverer.close()


SETTLED_KEY = "test:settled"


@pytest.mark.parametrize(
    ("statuses", "fields", "url", "outcome"),
    [
        ([200], {}, None, Outcome.DELIVERED),
        ([410], {}, None, Outcome.GONE),
        ([500], {}, None, Outcome.RETRYING),
        ([500], {"retry_schedule_s": [0]}, None, Outcome.DEAD_LETTERED),
        ([], {}, "http://10.0.0.1/hook", Outcome.REFUSED),
    ],
)
def test_settle_runs_in_the_records_transaction_only_when_the_record_is_the_attempts_last_write(
    redis_client: redis.Redis,
    webhook_receiver: WebhookReceiver,
    statuses: list[int],
    fields: dict[str, object],
    url: str | None,
    outcome: Outcome,
) -> None:
    webhook_receiver.script(statuses)
    harness = Harness(redis_client, _webhook(**fields))
    settle: Settle = lambda pipe: pipe.incr(SETTLED_KEY)  # noqa: E731

    assert harness.run(_message(url or webhook_receiver.url), settle) is outcome

    assert len(harness.records()) == 1  # every outcome here records its attempt (or why it was not sent)
    assert int(redis_client.get(SETTLED_KEY) or 0) == (1 if outcome in SETTLED_OUTCOMES else 0)
    if outcome is Outcome.GONE:  # a later event of the job is not sent, and its record settles it too
        assert harness.run(_message(webhook_receiver.url, seq=4), settle) is Outcome.SKIPPED
        assert int(redis_client.get(SETTLED_KEY) or 0) == 2
