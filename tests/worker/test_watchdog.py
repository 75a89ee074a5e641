"""The watchdog for running shards whose worker and message are gone, on a real Redis holding real Celery messages:
the client records and sends jobs, a "worker" counts and starts a shard as a task would, and losing its message is
taking it out of the queue (or out of kombu's unacked hash) for good."""

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

from producer.client import Client
from producer.contract import FineTuneRequest, GenerateRequest, JobError, OutputRef
from producer.core import constants
from producer.core.messages import JobMessage
from producer.core.settings import RedisSettings
from producer.errors import ConfigurationError
from producer.settings import ClientSettings
from worker.settings import SweeperSettings
from worker.sweeper import Stranded
from worker.watchdog import Heart, Watchdog

HOUR = 3600.0
RUNNING = constants.RUNNING_SHARDS_KEY


@pytest.fixture
def client(redis_client: redis.Redis, redis_url: str) -> Iterator[Client]:
    publish_catalog(redis_client)
    yield Client(ClientSettings(redis=RedisSettings(url=redis_url), shard_size=2))


class Sent(list[JobMessage]):
    def __call__(self, message: JobMessage) -> None:
        self.append(message)


def watchdog(
    client: Client, sent: Sent, *, later_s: float = HOUR, sleep: Callable[[float], None] = lambda _: None
) -> Watchdog:
    """A watchdog whose clock runs ``later_s`` ahead: every heartbeat written so far is old enough to look at."""
    settings = SweeperSettings(interval_s=30.0, stranded_after_s=60.0, confirm_s=5.0, heartbeat_s=10.0)
    return Watchdog(client.redis, client.store, sent, settings, clock=lambda: time.time() + later_s, sleep=sleep)


def submit(client: Client, count: int = 5) -> str:
    return client.submit(GenerateRequest(model="fmnist-cgan", label="bag", count=count, seed=7)).id


def run_shard(client: Client, job_id: str, shard: int) -> dict[str, Any]:
    """What a worker does with the message of ``shard``: take it off the queue, count the delivery, start the shard,
    beat for it. Returns the message, which is then nowhere in the broker (as if lost after its delivery)."""
    raw = next(r for r in client.redis.lrange(constants.GENERATE_QUEUE, 0, -1) if _id(r) == f"{job_id}.{shard}")
    client.redis.lrem(constants.GENERATE_QUEUE, 1, raw)
    client.store.count_delivery(job_id, shard)
    client.store.start(job_id, shard)
    client.redis.zadd(RUNNING, {f"{job_id}.{shard}": time.time()})
    return dict(json.loads(raw))


def store_shard(client: Client, job_id: str, shard: int, shards: int) -> bool:
    output = OutputRef(
        index=shard, label="bag", label_index=8, seed=1, key=f"k{shard}", sha256="0" * 64, content_type="image/png"
    )
    return client.store.complete_shard(job_id, shard, shards, [output])


def listed(client: Client) -> list[str]:
    return sorted(t.decode() for t in client.redis.zrange(RUNNING, 0, -1))


def test_a_running_shard_whose_worker_and_message_are_gone_is_sent_again_as_the_client_sent_it(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = submit(client)  # three shards of at most 2 images
    lost = run_shard(client, job_id, 1)
    sent = Sent()

    with caplog.at_level(logging.WARNING, logger="genq.watchdog"):
        assert watchdog(client, sent).sweep() == [Stranded(job_id, 1, constants.GENERATE_QUEUE)]

    (message,) = sent  # shards 0 and 2 wait on the queue: the sweeper's part of the turn leaves them alone
    assert (message.task, message.queue, message.task_id) == (constants.GENERATE_TASK, "generate", f"{job_id}.1")
    assert message.args == _args(lost)  # the job and shard {index 1, images 2-4 of 5} exactly as sent
    assert f"job {job_id}: shard 1 was running on a worker that is gone" in caplog.text
    assert listed(client) == [f"{job_id}.1"]  # watched again: sent again only if this copy is lost too
    assert watchdog(client, Sent(), later_s=0.0).sweep() == []  # ... and not before its new heartbeat is stale


def test_a_shard_whose_worker_still_beats_is_left_alone(client: Client) -> None:
    job_id = submit(client)
    run_shard(client, job_id, 0)  # beaten just now; its message is lost, but its worker still runs it
    sent = Sent()

    assert watchdog(client, sent, later_s=30.0).sweep() == []  # the heartbeat is 30 s old: under orphaned_after_s

    assert sent == [] and listed(client) == [f"{job_id}.0"]


def test_a_shard_whose_message_is_fetched_or_back_on_its_queue_is_left_alone(client: Client, redis_url: str) -> None:
    fetched, handed_back = submit(client, count=1), submit(client, count=1)
    with Connection(redis_url) as connection:  # a worker's fetch: kombu pops it and records it as unacked
        message = connection.default_channel.basic_get(constants.GENERATE_QUEUE, no_ack=False)
        assert message is not None and message.headers["id"] == f"{fetched}.0"
        client.store.count_delivery(fetched, 0)
        client.store.start(fetched, 0)
        # The other ran, met a Redis outage and was handed back: on its queue again, listed by the task.
        client.store.count_delivery(handed_back, 0)
        client.store.start(handed_back, 0)
        client.redis.zadd(RUNNING, {f"{fetched}.0": time.time(), f"{handed_back}.0": time.time()})
        sent = Sent()

        assert watchdog(client, sent).sweep() == []

    assert sent == [] and listed(client) == sorted([f"{fetched}.0", f"{handed_back}.0"])


def test_shards_of_ended_or_expired_jobs_and_stored_shards_leave_the_set(client: Client) -> None:
    failed, expired, running = submit(client), submit(client), submit(client)
    for job_id in (failed, expired, running):
        run_shard(client, job_id, 0)
        run_shard(client, job_id, 1)
    client.store.mark_failed(failed, JobError(type="StorageError", message="denied"))
    client.redis.delete(client.store.key(expired))
    store_shard(client, running, 0, 3)  # stored; shards 1 (lost) and 2 (on its queue) still owed
    client.redis.zadd(RUNNING, {"not-a-task-id": 0.0})
    sent = Sent()

    assert watchdog(client, sent).sweep() == [Stranded(running, 1, constants.GENERATE_QUEUE)]

    assert listed(client) == [f"{running}.1"]


def test_a_job_whose_every_shard_is_stored_but_whose_manifest_is_not_gets_a_run_that_writes_it(client: Client) -> None:
    # The run that recorded the last shard died before the manifest, and its message is gone too.
    job_id = submit(client, count=4)
    for shard in (0, 1):
        run_shard(client, job_id, shard)
    assert not store_shard(client, job_id, 0, 2)
    assert store_shard(client, job_id, 1, 2)  # the last one: its run was to write the manifest
    client.redis.zrem(RUNNING, f"{job_id}.0")  # its run ended and its worker dropped it
    assert client.store.awaiting_manifest(job_id)
    sent = Sent()

    assert watchdog(client, sent).sweep() == [Stranded(job_id, 1, constants.GENERATE_QUEUE)]
    assert [m.task_id for m in sent] == [f"{job_id}.1"]  # its rerun finds every shard stored: writes the manifest


def test_a_message_that_reappears_between_the_two_looks_is_not_sent_again(client: Client) -> None:
    job_id = submit(client, count=1)
    lost = run_shard(client, job_id, 0)

    def handed_back_meanwhile(_: float) -> None:  # the task's hand-back lands between the two looks
        client.redis.lpush(constants.GENERATE_QUEUE, json.dumps(lost))

    sent = Sent()
    assert watchdog(client, sent, sleep=handed_back_meanwhile).sweep() == []
    assert sent == []


def test_a_fine_tune_whose_worker_and_message_are_gone_is_sent_again(client: Client) -> None:
    tune = client.submit_finetune(FineTuneRequest(base="fmnist-cgan", dataset="abc123/", name="brand-x")).id
    client.redis.delete(constants.TRAIN_QUEUE)
    client.store.count_delivery(tune, 0)
    client.store.start(tune)
    client.redis.zadd(RUNNING, {f"{tune}.0": time.time()})
    sent = Sent()

    assert watchdog(client, sent).sweep() == [Stranded(tune, 0, constants.TRAIN_QUEUE)]
    assert [(m.task, m.queue) for m in sent] == [(constants.FINETUNE_TASK, constants.TRAIN_QUEUE)]


def test_the_heart_lists_shards_running_at_a_beat_and_drops_them_at_the_beat_after_they_end(
    client: Client,
) -> None:
    heart = Heart(client.redis, beat_s=HOUR)  # beats only when told: its thread sleeps an hour
    with heart.beating("short.0"):
        pass  # ended before any beat: never written
    with heart.beating("long.0"):
        heart.beat()
        assert listed(client) == ["long.0"]
        first = client.redis.zscore(RUNNING, "long.0")
        time.sleep(0.01)
        heart.beat()
        assert (client.redis.zscore(RUNNING, "long.0") or 0) > (first or 0)  # beaten again
    assert listed(client) == ["long.0"]
    heart.beat()
    assert listed(client) == []


def test_a_watched_shard_stays_listed_after_its_run_ends(client: Client) -> None:
    # A shard handed back after an outage: its run ended, but it must stay watched until another run takes it.
    heart = Heart(client.redis, beat_s=HOUR)
    with heart.beating("job.3"):
        heart.beat()
    heart.watch("job.3")
    heart.beat()
    assert listed(client) == ["job.3"]


def test_a_heartbeat_window_shorter_than_two_beats_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="GENQ_SWEEPER__ORPHANED_AFTER_S"):
        SweeperSettings(heartbeat_s=10, orphaned_after_s=15)


def _id(raw: bytes) -> str:
    return str(json.loads(raw)["headers"]["id"])


def _args(message: dict[str, Any]) -> list[Any]:
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return list(args)
