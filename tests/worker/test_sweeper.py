"""The sweep for lost messages, on a real Redis holding real Celery messages: the client records and sends jobs, a
kombu channel fetches some as a worker would (unacked), and "losing" a message is popping it as a worker killed
between kombu's two round trips would."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from api_server import publish_catalog
from kombu import Connection
from stack import LOOPBACK_ALLOWED

from producer.client import Client
from producer.contract import FineTuneRequest, GenerateRequest, JobStatus
from producer.core import constants
from producer.core.callbacks.pending import PendingCallbacks
from producer.core.messages import JobMessage
from producer.core.settings import RedisSettings, WebhookSettings
from producer.errors import ConfigurationError
from producer.settings import ClientSettings
from worker.deadletter import DeadLetter
from worker.settings import SweeperSettings
from worker.sweeper import MAX_CALLBACK_RESENDS, Stranded, StrandedCallback, Sweeper, task_ids_in

HOUR = 3600.0


@pytest.fixture
def client(redis_client: redis.Redis, redis_url: str) -> Iterator[Client]:
    publish_catalog(redis_client)
    webhook = WebhookSettings(allow_hosts=LOOPBACK_ALLOWED)
    yield Client(ClientSettings(redis=RedisSettings(url=redis_url), shard_size=2, webhook=webhook))


class Sent(list[JobMessage]):
    """What a sweeper sent, in order."""

    def __call__(self, message: JobMessage) -> None:
        self.append(message)


def sweeper(
    client: Client,
    sent: Sent,
    *,
    later_s: float = HOUR,
    sleep: Callable[[float], None] = lambda _: None,
    **settings: Any,
) -> Sweeper:
    """A sweeper whose clock runs ``later_s`` ahead (every job recorded so far is old enough to look at)."""
    options = {"interval_s": 30.0, "stranded_after_s": 60.0, "confirm_s": 5.0, **settings}
    return Sweeper(
        client.redis,
        client.store,
        sent,
        SweeperSettings(**options),
        clock=lambda: time.time() + later_s,
        sleep=sleep,
    )


def submit(client: Client, count: int = 1, **fields: Any) -> str:
    return client.submit(GenerateRequest(model="fmnist-cgan", label="bag", count=count, seed=7, **fields)).id


def lose_front(client: Client, queue: str = constants.GENERATE_QUEUE) -> dict[str, Any]:
    """Pop the queue's front message as a worker does, and never record it: returns the message."""
    raw = client.redis.rpop(queue)
    assert isinstance(raw, bytes), f"{queue} is empty"
    return dict(json.loads(raw))


def canceled_with_callback(client: Client) -> str:
    """A job with a callback, canceled while queued: its ``canceled`` event is the client's callback message on the
    callbacks queue (its ``queued`` event went into the outbox with its record)."""
    job_id = submit(client, callback={"url": HOOK})
    client.cancel(job_id)
    return job_id


def body_args(message: dict[str, Any]) -> list[Any]:
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return list(args)


def test_a_lost_message_is_sent_again_as_the_client_sent_it(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    job_id = submit(client, count=5)  # three shards of at most 2 images
    lost = lose_front(client)
    assert lost["headers"]["id"] == f"{job_id}.0"
    sent = Sent()

    with caplog.at_level(logging.WARNING, logger="genq.sweeper"):
        assert sweeper(client, sent).sweep() == [Stranded(job_id, 0, constants.GENERATE_QUEUE)]

    (message,) = sent
    assert (message.task, message.queue, message.task_id) == (constants.GENERATE_TASK, "generate", f"{job_id}.0")
    assert message.args == body_args(lost)  # the job and the shard {index 0, images 0-2 of 5} exactly as sent
    assert f"job {job_id}: the message of shard 0 was nowhere in the broker" in caplog.text
    assert client.redis.llen(constants.GENERATE_QUEUE) == 2  # shards 1 and 2 untouched, nothing else resent


def test_messages_on_the_queue_or_fetched_by_a_worker_are_left_alone(client: Client, redis_url: str) -> None:
    jobs = [submit(client) for _ in range(3)]
    with Connection(redis_url) as connection:  # a worker's fetch: kombu pops it and records it as unacked
        fetched = connection.default_channel.basic_get(constants.GENERATE_QUEUE, no_ack=False)
        assert fetched is not None and fetched.headers["id"] == f"{jobs[0]}.0"
        assert client.redis.hlen(constants.KOMBU_UNACKED_KEY) == 1
        sent = Sent()

        assert sweeper(client, sent).sweep() == []

    assert sent == []
    index = constants.QUEUED_JOBS_KEY.format(queue=constants.GENERATE_QUEUE)
    assert sorted(j.decode() for j in client.redis.zrange(index, 0, -1)) == sorted(jobs)  # none was delivered yet


def test_a_message_that_reaches_a_worker_between_the_two_looks_is_not_sent_again(client: Client) -> None:
    job_id = submit(client)
    in_flight = client.redis.rpop(constants.GENERATE_QUEUE)  # popped; its worker records it a moment later

    def worker_catches_up(_: float) -> None:
        client.redis.hset(constants.KOMBU_UNACKED_KEY, "tag-1", json.dumps([json.loads(in_flight), "", "generate"]))

    sent = Sent()
    assert sweeper(client, sent, sleep=worker_catches_up).sweep() == []
    assert sent == []
    assert client.store.get(job_id).status is JobStatus.QUEUED


def test_jobs_recorded_less_than_stranded_after_s_ago_are_not_looked_at(client: Client) -> None:
    job_id = submit(client)
    lose_front(client)
    sent = Sent()

    assert sweeper(client, sent, later_s=0.0, stranded_after_s=60.0).sweep() == []
    assert sweeper(client, sent, later_s=61.0, stranded_after_s=60.0).sweep() == [
        Stranded(job_id, 0, constants.GENERATE_QUEUE)
    ]


def test_ended_expired_and_delivered_jobs_leave_the_index_and_are_never_resent(client: Client) -> None:
    canceled, expired, delivered, waiting = (submit(client) for _ in range(4))
    client.cancel(canceled)
    client.redis.delete(client.store.key(expired))
    client.store.count_delivery(delivered, 0)  # a task started it: kombu restores it from now on
    client.redis.delete(constants.GENERATE_QUEUE)  # every message lost
    sent = Sent()

    assert [s.job_id for s in sweeper(client, sent).sweep()] == [waiting]
    index = constants.QUEUED_JOBS_KEY.format(queue=constants.GENERATE_QUEUE)
    assert [j.decode() for j in client.redis.zrange(index, 0, -1)] == [waiting]


def test_a_message_deep_in_a_long_queue_is_found_and_a_lost_one_behind_it_is_not_missed(client: Client) -> None:
    jobs = [submit(client) for _ in range(1200)]  # more than two LRANGE chunks
    middle = jobs[700]
    client.redis.lrem(constants.GENERATE_QUEUE, 1, next(_element(client, f"{middle}.0")))
    sent = Sent()

    assert sweeper(client, sent).sweep() == [Stranded(middle, 0, constants.GENERATE_QUEUE)]


def test_each_priority_queue_and_the_train_queue_is_swept(client: Client) -> None:
    high = submit(client, priority="high")
    tune = client.submit_finetune(FineTuneRequest(base="fmnist-cgan", dataset="abc123/", name="brand-x")).id
    lose_front(client, constants.GENERATE_HIGH_QUEUE)
    lost_tune = lose_front(client, constants.TRAIN_QUEUE)
    sent = Sent()

    found = sweeper(client, sent).sweep()

    assert sorted(found, key=lambda s: s.queue) == [
        Stranded(high, 0, constants.GENERATE_HIGH_QUEUE),
        Stranded(tune, 0, constants.TRAIN_QUEUE),
    ]
    resent_tune = next(m for m in sent if m.queue == constants.TRAIN_QUEUE)
    assert resent_tune.task == constants.FINETUNE_TASK and resent_tune.args == body_args(lost_tune)


def test_one_worker_of_the_fleet_sweeps_per_interval(client: Client) -> None:
    first, second = (sweeper(client, Sent(), interval_s=0.5, confirm_s=0.1) for _ in range(2))
    assert first.take_turn() and not second.take_turn()
    time.sleep(0.6)  # the turn lasts one interval
    assert second.take_turn()


def test_a_running_sweeper_thread_resends_a_lost_message(client: Client) -> None:
    job_id = submit(client)
    lose_front(client)
    sent = Sent()
    thread = sweeper(client, sent, interval_s=0.05, confirm_s=0.01)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not sent and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        thread.stop()
    assert [m.task_id for m in sent] == [f"{job_id}.0"]


HOOK = "http://127.0.0.1:9/hook"  # never called here


def test_a_lost_callback_message_is_sent_again_as_it_was_sent(client: Client) -> None:
    job_id = canceled_with_callback(client)
    lost = lose_front(client, constants.CALLBACK_QUEUE)  # the canceled event
    task_id = lost["headers"]["id"]
    sent = Sent()

    assert sweeper(client, sent).sweep() == [StrandedCallback(task_id)]

    (message,) = sent
    assert (message.task, message.queue, message.task_id) == (constants.CALLBACK_TASK, "callbacks", task_id)
    assert message.args == body_args(lost) and message.args[0]["job_id"] == job_id
    assert message.args[0]["event"]["type"] == "canceled"


def test_a_callback_message_on_its_queue_fetched_or_started_is_not_sent_again(client: Client, redis_url: str) -> None:
    fetched, started, waiting = (canceled_with_callback(client) for _ in range(3))  # a canceled event each
    with Connection(redis_url) as connection:
        channel = connection.default_channel
        first = channel.basic_get(constants.CALLBACK_QUEUE, no_ack=False)  # in unacked
        second = channel.basic_get(constants.CALLBACK_QUEUE, no_ack=False)
        PendingCallbacks(client.redis).started(second.headers["id"])  # what the delivery task does first
        second.ack()
        sent = Sent()

        assert sweeper(client, sent).sweep() == []

        assert sent == []
        assert [m.decode()[0][0]["job_id"] for m in (first, second)] == [fetched, started]
        (left,) = (json.loads(raw) for raw in client.redis.lrange(constants.CALLBACK_QUEUE, 0, -1))
        assert body_args(left)[0]["job_id"] == waiting
        kept = {t.decode() for t in client.redis.zrange(constants.CALLBACKS_PENDING_KEY, 0, -1)}
        assert kept == {first.headers["id"], left["headers"]["id"]}  # the started one is forgotten


def test_a_callback_retry_is_not_looked_at_before_it_is_due(client: Client) -> None:
    pending = PendingCallbacks(client.redis)
    message = JobMessage(constants.CALLBACK_TASK, constants.CALLBACK_QUEUE, [{"job_id": "j"}], "cb.retry")
    pending.send(message, lambda m, countdown: None, countdown=2 * HOUR)  # "sent" (then lost) to run in two hours
    sent = Sent()

    assert sweeper(client, sent, later_s=HOUR).sweep() == []
    assert sweeper(client, sent, later_s=2 * HOUR + 61).sweep() == [StrandedCallback("cb.retry")]


def test_a_callback_message_that_keeps_vanishing_unstarted_is_sent_again_three_times_then_forgotten(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    # What a worker of an older version does: it runs the message and never tells PendingCallbacks.
    canceled_with_callback(client)
    sent = Sent()
    for _ in range(5):
        client.redis.delete(constants.CALLBACK_QUEUE)
        sweeper(client, sent).sweep()

    assert len(sent) == MAX_CALLBACK_RESENDS == 3
    assert client.redis.zcard(constants.CALLBACKS_PENDING_KEY) == 0
    assert client.redis.hlen(constants.CALLBACKS_RESENT_KEY) == 0
    assert "sent again 3 times and never started; forgotten" in caplog.text


def test_a_callback_that_could_not_be_sent_is_not_kept(client: Client) -> None:
    pending = PendingCallbacks(client.redis)
    message = JobMessage(constants.CALLBACK_TASK, constants.CALLBACK_QUEUE, [{"job_id": "j"}], "cb.1")

    def broker_down(_: JobMessage, __: float) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        pending.send(message, broker_down)
    assert pending.message("cb.1") is None and client.redis.zcard(constants.CALLBACKS_PENDING_KEY) == 0


@pytest.mark.parametrize(
    ("element", "ids"),
    [
        (b'{"body": "W10=", "headers": {"lang": "py", "task": "t", "id": "abc.0", "root_id": "abc.0"}}', {"abc.0"}),
        (b'[{"body": "W10=", "headers": {"id": "abc.1"}}, "", "generate"]', {"abc.1"}),  # an unacked entry
        (b'{"headers":{"root_id":"x","id":"abc.2"}}', {"abc.2"}),  # other spacing: parsed
        (b"not a kombu message", set()),
        (b'{"headers": {"argsrepr": "[{\\"id\\": \\"evil\\"}]"}}', set()),  # quotes inside a string do not count
    ],
)
def test_task_ids_are_read_from_kombu_messages_only(element: bytes, ids: set[str]) -> None:
    assert task_ids_in([element]) == ids


def test_a_confirmation_longer_than_the_interval_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="GENQ_SWEEPER__CONFIRM_S"):
        SweeperSettings(interval_s=5, confirm_s=5)


def _element(client: Client, task_id: str) -> Iterator[bytes]:
    for raw in client.redis.lrange(constants.GENERATE_QUEUE, 0, -1):
        if json.loads(raw)["headers"]["id"] == task_id:
            yield raw


def test_a_job_record_that_cannot_be_read_is_dead_lettered_once_and_never_stops_the_sweep(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    # The review's attack: a tenant's job whose record an older version stored with metadata 300 deep (pydantic's
    # JSON parser stops at 200), and whose message the broker lost. The sweep raised on it at every interval, in every
    # worker, so the lost job and callback of another tenant, recorded after it, were never sent again.
    poisoned = client.submit(GenerateRequest(model="fmnist-cgan", label="bag", seed=7), "mallory").id
    lose_front(client)
    key = constants.JOB_KEY.format(job_id=poisoned)
    spec = json.loads(client.redis.hget(key, "spec") or b"")
    deep: Any = []
    for _ in range(299):
        deep = [deep]
    client.redis.hset(key, "spec", json.dumps({**spec, "metadata": {"a": deep}}))
    lost = client.submit(GenerateRequest(model="fmnist-cgan", label="bag", seed=7), "acme").id
    lose_front(client)
    canceled_with_callback(client)
    event = lose_front(client, constants.CALLBACK_QUEUE)  # another job's canceled event, lost too
    sent = Sent()

    with caplog.at_level(logging.ERROR):
        first = sweeper(client, sent).sweep()
        second = sweeper(client, sent).sweep()  # the next interval: the poisoned job is not read again

    resent = [Stranded(lost, 0, constants.GENERATE_QUEUE), StrandedCallback(event["headers"]["id"])]
    assert first == second == resent
    assert [m.task_id for m in sent] == [f"{lost}.0", event["headers"]["id"]] * 2
    index = constants.QUEUED_JOBS_KEY.format(queue=constants.GENERATE_QUEUE)
    assert client.redis.zscore(index, poisoned) is None  # quarantined: no sweep reads it again
    (letter,) = [DeadLetter.model_validate_json(raw) for raw in client.redis.lrange(constants.DEADLETTER_KEY, 0, -1)]
    assert (letter.stage, letter.job_id) == ("record", poisoned)
    assert f"job {poisoned}: shard 0 lost by the broker cannot be sent again" in caplog.text


def test_a_bug_met_on_one_job_does_not_stop_the_sweep_for_the_others(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = submit(client), submit(client)
    lose_front(client)
    lose_front(client)
    sent = Sent()

    def send(message: JobMessage) -> None:
        if message.task_id == f"{first}.0":
            raise RuntimeError("a bug")
        sent(message)

    with caplog.at_level(logging.ERROR):
        swept = Sweeper(
            client.redis,
            client.store,
            send,
            SweeperSettings(interval_s=30.0, stranded_after_s=60.0, confirm_s=5.0),
            clock=lambda: time.time() + HOUR,
            sleep=lambda _: None,
        ).sweep()

    assert swept == [Stranded(second, 0, constants.GENERATE_QUEUE)] and [m.task_id for m in sent] == [f"{second}.0"]
    assert f"job {first}: shard 0 lost by the broker could not be sent again" in caplog.text
