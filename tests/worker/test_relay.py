"""The callback outbox and its relay, against a real Redis: events are written in the transition's own step, read
by the relays as one consumer group, sent once each in order, taken over from a relay that died, and an unreadable
entry is dead-lettered without holding up the others."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pytest
import redis
from factories import output_refs
from tcp_proxy import TcpProxy, redis_through
from tiny_runtime import tiny_job
from webhook_receiver import WebhookReceiver

from producer.contract import Callback, EventType, GenerateJob, JobError, JobStatus, plan_shards
from producer.core import constants
from producer.core.callbacks.delivery import SETTLED_OUTCOMES, CallbackLedger, Settle, run_delivery
from producer.core.callbacks.events import CallbackMessage
from producer.core.callbacks.outbox import OutboxEntry
from producer.core.settings import WebhookSettings
from producer.core.store import JobStore
from worker import deadletter
from worker.relay import Relay
from worker.reporting import RedisReporter

HOOK = "https://hooks.example/genq"


def _job(job_id: str, events: list[str] | None = None) -> GenerateJob:
    callback = {"url": HOOK} if events is None else {"url": HOOK, "events": events}
    return tiny_job(job_id, 1, callback=Callback.model_validate(callback))


def _relay(
    client: redis.Redis, sent: list[CallbackMessage], consumer: str = "relay-a", **options: float
) -> tuple[Relay, list[tuple[OutboxEntry, str]]]:
    dead: list[tuple[OutboxEntry, str]] = []
    relay = Relay(
        client,
        lambda message, _settle: sent.append(message),
        lambda entry, reason: dead.append((entry, reason)),
        consumer=consumer,
        **options,  # type: ignore[arg-type]
    )
    return relay, dead


def _run(store: JobStore, job: GenerateJob) -> None:
    """The transitions of a 1-image job, as a worker makes them."""
    store.start(job.job_id, 0, announce=True)
    store.set_progress(job.job_id, 0, 1, announce=True)
    outputs = output_refs(range(1), prefix=f"jobs/{job.job_id}/")
    store.mark_succeeded(job.job_id, outputs, f"jobs/{job.job_id}/manifest.json", announce=True)


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client, 3600)


def test_each_transition_is_announced_once_with_the_view_as_it_was_then(
    store: JobStore, redis_client: redis.Redis
) -> None:
    job = _job("job-relay-1")
    store.create(job, announce=True)  # the client's queued event, written with the record
    _run(store, job)
    store.start(job.job_id, 0, announce=True)  # a late redelivery: refused, announces nothing
    sent: list[CallbackMessage] = []
    relay, dead = _relay(redis_client, sent)

    assert relay.turn(block_ms=0) == 4

    assert [(m.event.type, m.event.seq, m.event.data.status) for m in sent] == [
        (EventType.QUEUED, 1, JobStatus.QUEUED),
        (EventType.RUNNING, 2, JobStatus.RUNNING),
        (EventType.PROGRESS, 3, JobStatus.RUNNING),
        (EventType.SUCCEEDED, 4, JobStatus.SUCCEEDED),
    ]
    assert sent[0].event.data.started_at is None and sent[0].event.data.created_at == job.created_at
    assert sent[2].event.data.progress.done == 1 and sent[1].event.data.progress.done == 0
    assert [o.key for o in sent[3].event.data.outputs] == ["jobs/job-relay-1/00000.png"]
    assert all(m.url == HOOK and m.job_id == job.job_id for m in sent)
    assert len({m.msg_id for m in sent}) == 4 and dead == []
    assert redis_client.xlen(constants.CALLBACK_OUTBOX_KEY) == 0  # acknowledged and deleted
    assert relay.turn(block_ms=0) == 0


def test_events_the_callback_does_not_ask_for_are_never_written(store: JobStore, redis_client: redis.Redis) -> None:
    job = _job("job-relay-2", events=["succeeded"])
    store.create(job)
    reporter = RedisReporter(store, 0.0)
    (shard,) = plan_shards(1, 1)

    assert reporter.started(job, shard)
    reporter.progress(job, shard, 1)
    reporter.succeeded(job, [], 1, "jobs/job-relay-2/manifest.json")

    events = [f[b"event"] for _id, f in redis_client.xrange(constants.CALLBACK_OUTBOX_KEY)]
    assert events == [b"succeeded"]


def test_a_failed_job_s_event_lists_every_output_its_shards_stored(store: JobStore, redis_client: redis.Redis) -> None:
    job = _job("job-relay-3")
    store.create(job, shards=2, shard_size=1)
    (first,) = output_refs(range(1), prefix="jobs/job-relay-3/")
    store.complete_shard(job.job_id, 0, 2, [first])
    store.mark_failed(job.job_id, JobError(type="StorageError", message="denied"), [], announce=True)
    sent: list[CallbackMessage] = []
    relay, _dead = _relay(redis_client, sent)

    relay.turn(block_ms=0)

    (message,) = sent
    assert message.event.type is EventType.FAILED
    assert [o.key for o in message.event.data.outputs] == [first.key]


def test_a_relay_that_died_before_acknowledging_has_its_entries_taken_over_with_the_same_webhook_ids(
    store: JobStore, redis_client: redis.Redis
) -> None:
    job = _job("job-relay-4")
    store.create(job)
    _run(store, job)
    crashed: list[CallbackMessage] = []
    dying, _ = _relay(redis_client, crashed, consumer="relay-dead")
    dying.outbox.read(block_ms=0)  # read, never acknowledged: the process was SIGKILLed here

    sent: list[CallbackMessage] = []
    alive, _ = _relay(redis_client, sent, consumer="relay-alive", claim_after_s=0.0)
    assert alive.turn(block_ms=0) == 3

    assert [m.event.type for m in sent] == [EventType.RUNNING, EventType.PROGRESS, EventType.SUCCEEDED]
    assert redis_client.xlen(constants.CALLBACK_OUTBOX_KEY) == 0
    pending = redis_client.xpending(constants.CALLBACK_OUTBOX_KEY, constants.CALLBACK_RELAY_GROUP)
    assert pending["pending"] == 0


def test_a_send_that_meets_a_redis_outage_is_retried_by_the_same_relay_with_the_same_webhook_id(
    store: JobStore, redis_client: redis.Redis
) -> None:
    job = _job("job-relay-5")
    store.create(job)
    _run(store, job)
    attempts: list[CallbackMessage] = []

    def send(message: CallbackMessage, _settle: Settle) -> None:  # the broker refuses the second publish
        attempts.append(message)
        if len(attempts) == 2:
            raise redis.ConnectionError("Connection reset by peer")

    relay = Relay(redis_client, send, lambda entry, reason: None, consumer="relay-b")
    with pytest.raises(redis.ConnectionError):
        relay.turn(block_ms=0)
    relay._own_pending = True  # what the relay's loop sets on an outage
    assert relay.turn(block_ms=0) == 2

    assert [m.event.type for m in attempts] == [
        EventType.RUNNING,
        EventType.PROGRESS,
        EventType.PROGRESS,
        EventType.SUCCEEDED,
    ]
    assert attempts[1].msg_id == attempts[2].msg_id  # one webhook-id: receivers deduplicate a copy that got through
    assert redis_client.xlen(constants.CALLBACK_OUTBOX_KEY) == 0


def test_an_unreadable_entry_is_dead_lettered_and_the_others_are_sent(
    store: JobStore, redis_client: redis.Redis
) -> None:
    job = _job("job-relay-6")
    store.create(job)
    store.start(job.job_id, 0, announce=True)
    redis_client.xadd(constants.CALLBACK_OUTBOX_KEY, {"job": "job-x", "event": "running", "seq": 1, "record": "{"})
    redis_client.xadd(constants.CALLBACK_OUTBOX_KEY, {"job": "job-y", "event": "exploded", "seq": 1, "record": "{}"})
    store.mark_failed(job.job_id, JobError(type="ModelError", message="nan"), [], announce=True)
    sent: list[CallbackMessage] = []
    relay = Relay(
        redis_client,
        lambda message, _settle: sent.append(message),
        lambda e, reason: deadletter.record_outbox_entry(redis_client, e, reason),
    )

    assert relay.turn(block_ms=0) == 2

    assert [m.event.type for m in sent] == [EventType.RUNNING, EventType.FAILED]
    letters = [json.loads(raw) for raw in redis_client.lrange(constants.DEADLETTER_KEY, 0, -1)]
    assert sorted(letter["job_id"] for letter in letters) == ["job-x", "job-y"]
    assert {letter["stage"] for letter in letters} == {"outbox"}
    assert redis_client.xlen(constants.CALLBACK_OUTBOX_KEY) == 0


def test_a_flushed_outbox_is_recreated_and_read_again(store: JobStore, redis_client: redis.Redis) -> None:
    sent: list[CallbackMessage] = []
    relay, _ = _relay(redis_client, sent)
    assert relay.turn(block_ms=0) == 0  # makes the group
    redis_client.delete(constants.CALLBACK_OUTBOX_KEY)  # the group goes with it (a Redis without AOF restarted)
    job = _job("job-relay-7")
    store.create(job)
    store.start(job.job_id, 0, announce=True)

    assert relay.turn(block_ms=0) == 0  # NOGROUP: the group is made again on the next read
    assert relay.turn(block_ms=0) == 1
    assert [m.event.type for m in sent] == [EventType.RUNNING]


def test_the_relay_thread_rides_out_a_redis_outage(
    store: JobStore, redis_client: redis.Redis, redis_url: str, proxy: TcpProxy
) -> None:
    sent: list[CallbackMessage] = []
    relay, _ = _relay(redis_through(proxy, redis_url), sent, block_ms=100)
    relay.start()
    try:
        proxy.down()
        job = _job("job-relay-8")
        store.create(job)
        _run(store, job)  # written while the relay cannot reach Redis
        proxy.up()
        _wait_for(lambda: len(sent) == 3)
    finally:
        relay.stop()
    assert [m.event.type for m in sent] == [EventType.RUNNING, EventType.PROGRESS, EventType.SUCCEEDED]


def _wait_for(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_with_threads_a_hanging_attempt_holds_its_own_thread_only_and_is_never_attempted_twice_at_once(
    store: JobStore, redis_client: redis.Redis
) -> None:
    hanging, quick = _job("job-relay-9"), _job("job-relay-10")
    for job in (hanging, quick):
        store.create(job)
    store.start(hanging.job_id, 0, announce=True)  # its receiver hangs
    release = threading.Event()
    attempted: list[str] = []

    def deliver(message: CallbackMessage, _settle: Settle) -> None:
        attempted.append(message.job_id)
        if message.job_id == hanging.job_id:
            release.wait(30)

    relay = Relay(redis_client, deliver, lambda entry, reason: None, threads=2, claim_after_s=0.0)
    try:
        assert relay.turn(block_ms=0) == 1
        _run(store, quick)
        relay._own_pending = True  # as after an outage: its own pending entries include the one in flight
        while relay.turn(block_ms=0):
            pass
        _wait_for(lambda: attempted.count(quick.job_id) == 3)
        assert attempted.count(hanging.job_id) == 1 and relay.in_flight() == 1
    finally:
        release.set()
        relay.stop()
    assert relay.in_flight() == 0
    assert redis_client.xlen(constants.CALLBACK_OUTBOX_KEY) == 0


def test_an_attempt_settles_its_entry_with_its_record_or_after_its_retry_exists(
    store: JobStore, redis_client: redis.Redis, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script([200, 500])  # the first event is delivered, the second retried
    job = tiny_job("job-relay-11", 1, callback=Callback.model_validate({"url": webhook_receiver.url}))
    store.create(job)
    store.start(job.job_id, 0, announce=True)
    store.mark_failed(job.job_id, JobError(type="ModelError", message="nan"), [], announce=True)
    webhook = WebhookSettings(allow_hosts=["127.0.0.1"], retry_schedule_s=[0, 60], jitter=0.0)
    ledger = CallbackLedger(redis_client, 3600)
    requeued: list[tuple[CallbackMessage, int]] = []
    settled_with_record: list[bool] = []

    def pending() -> int:
        return int(redis_client.xpending(constants.CALLBACK_OUTBOX_KEY, constants.CALLBACK_RELAY_GROUP)["pending"])

    def deliver(message: CallbackMessage, settle: Settle) -> bool:
        def requeue(later: CallbackMessage, _countdown: float) -> None:
            requeued.append((later, pending()))  # the entry is still pending while its retry is made

        outcome = run_delivery(message, webhook=webhook, ledger=ledger, requeue=requeue, max_hop_s=60, settle=settle)
        settled_with_record.append(outcome in SETTLED_OUTCOMES)
        if outcome in SETTLED_OUTCOMES:
            assert pending() == 0  # acknowledged by the record's own transaction, not after it
        return outcome in SETTLED_OUTCOMES

    relay = Relay(redis_client, deliver, lambda entry, reason: None)
    assert relay.turn(block_ms=0) == 2

    assert settled_with_record == [True, False]
    [(retry, pending_then)] = requeued
    assert retry.event.type is EventType.FAILED and retry.attempt == 2 and pending_then == 1
    records = ledger.redis.lrange(constants.JOB_EVENTS_KEY.format(job_id=job.job_id), 0, -1)
    assert [json.loads(r)["ok"] for r in records] == [True, False]
    assert pending() == 0 and redis_client.xlen(constants.CALLBACK_OUTBOX_KEY) == 0


def test_events_that_trickle_in_are_read_a_few_at_a_time_after_a_short_linger(
    store: JobStore, redis_client: redis.Redis
) -> None:
    sent: list[CallbackMessage] = []
    relay, _ = _relay(redis_client, sent, block_ms=100, linger_s=0.5)
    batches: list[int] = []
    read = relay.relay

    def counted(entries: list[OutboxEntry]) -> int:
        if entries:
            batches.append(len(entries))
        return read(entries)

    relay.relay = counted  # type: ignore[method-assign]
    first, second = _job("job-relay-12"), _job("job-relay-13")
    store.create(first)
    store.create(second)
    relay.start()
    try:
        store.start(first.job_id, 0, announce=True)
        _wait_for(lambda: len(sent) == 1)
        _run(store, second)  # three events while the relay lingers after the first
        _wait_for(lambda: len(sent) == 4)
    finally:
        relay.stop()
    assert batches == [1, 3]
    assert redis_client.xlen(constants.CALLBACK_OUTBOX_KEY) == 0
