"""The queued-jobs index (``genq:queued:<queue>``) lists only jobs that may still be owed a message: a job leaves it in
the transition that ends it, whatever ends it, with no sweep needed; a sweep that reads the index while a worker
hands a message back to its queue does not take that message for lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from api_server import publish_catalog
from kombu import Connection
from stack import LOOPBACK_ALLOWED
from tiny_model import TINY_NAME
from tiny_runtime import tiny_runtime

from producer.client import Client
from producer.contract import GenerateJob, GenerateRequest, JobError, LabelCount, plan_shards
from producer.core import constants
from producer.core.messages import JobMessage
from producer.core.records import as_text
from producer.core.settings import RedisSettings, WebhookSettings
from producer.core.store import QUEUED_INDEXES
from producer.settings import ClientSettings
from worker.jobs import execute_generate
from worker.reporting import RedisReporter
from worker.runtime import Runtime
from worker.settings import CelerySettings, SweeperSettings
from worker.sweeper import Sweeper


@pytest.fixture
def runtime(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[Runtime]:
    with tiny_runtime(
        redis_url,
        tmp_path,
        celery=CelerySettings(max_deliveries=2),
    ) as runtime:
        yield runtime


def _job(job_id: str, count: int = 2, priority: str = "normal", model: str = TINY_NAME) -> GenerateJob:
    return GenerateJob(
        job_id=job_id,
        model=model,
        model_name=model,
        model_version="1",
        items=[LabelCount(index=8, name="bag", count=count)],
        seed=7,
        priority=priority,  # type: ignore[arg-type]
        created_at=datetime(2026, 11, 30, tzinfo=UTC),
    )


def _indexed(client: redis.Redis) -> set[str]:
    return {as_text(member) for index in QUEUED_INDEXES for member in cast(list[bytes], client.zrange(index, 0, -1))}


def test_jobs_that_end_leave_the_queued_index_however_they_end(runtime: Runtime, redis_client: redis.Redis) -> None:
    reporter = RedisReporter(runtime.store)
    succeeded, failed = _job("job-succeeded", priority="high"), _job("job-failed", model="no-such-model")
    sharded, shards = _job("job-sharded", 12, priority="low"), plan_shards(12, 4)
    canceled, dead, enqueue_failed = _job("job-canceled"), _job("job-dead"), _job("job-enqueue-failed")
    waiting, running = _job("job-waiting"), _job("job-running", 8)
    for job in (succeeded, failed, canceled, dead, enqueue_failed, waiting, running):
        runtime.store.create(job)
    runtime.store.create(sharded, shards=len(shards), shard_size=4)
    assert _indexed(redis_client) == {
        "job-succeeded", "job-failed", "job-sharded", "job-canceled", "job-dead", "job-enqueue-failed",
        "job-waiting", "job-running",
    }  # fmt: skip

    assert execute_generate(succeeded, runtime, reporter)
    assert execute_generate(failed, runtime, reporter)  # an unknown model: failed, not retried
    for shard in shards:
        assert execute_generate(sharded, runtime, reporter, shard)
    runtime.store.mark_canceled(canceled.job_id)  # what Client.cancel does
    for _ in range(runtime.settings.celery.max_deliveries):  # its worker died every time it ran it
        runtime.store.count_delivery(dead.job_id)
    assert execute_generate(dead, runtime, reporter)  # one delivery too many: dead-lettered
    runtime.store.mark_failed(enqueue_failed.job_id, JobError(type="EnqueueFailed", message="broker away"))
    runtime.store.start(running.job_id, 0)

    statuses = {j: runtime.store.get(j).status.value for j in ("job-succeeded", "job-sharded", "job-canceled")}
    assert statuses == {"job-succeeded": "succeeded", "job-sharded": "succeeded", "job-canceled": "canceled"}
    error = runtime.store.get(dead.job_id).error
    assert error is not None and error.type == "DeadLettered"
    assert _indexed(redis_client) == {"job-waiting", "job-running"}  # only the jobs still active


def test_a_refused_transition_leaves_the_index_as_it_was(runtime: Runtime, redis_client: redis.Redis) -> None:
    job = _job("job-active")
    runtime.store.create(job)

    runtime.store.start(job.job_id, 0)  # running: still owed nothing, but not ended either
    assert _indexed(redis_client) == {"job-active"}
    assert runtime.store.mark_canceled(job.job_id)
    assert not runtime.store.mark_canceled(job.job_id)
    assert _indexed(redis_client) == set()


class HandsBackWhileTheSweeperLooks:
    """The sweeper's Redis client, except that a worker hands its fetched message back to the queue (kombu's reject
    with requeue: out of the unacked hash, onto the queue, in one transaction) just after the sweeper read the queue
    and before it reads the unacked entries: the worst moment, each time the sweeper looks."""

    def __init__(self, client: redis.Redis, channel: Any) -> None:
        self.client = client
        self.channel = channel
        self.fetched: Any = None

    def fetch(self) -> None:
        self.fetched = self.channel.basic_get(constants.GENERATE_QUEUE, no_ack=False)
        assert self.fetched is not None

    def hscan_iter(self, *args: Any, **kwargs: Any) -> Any:
        if self.fetched is not None:
            self.fetched.reject(requeue=True)
            self.fetched = None
        return self.client.hscan_iter(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_a_message_handed_back_to_its_queue_while_the_sweeper_looks_is_not_sent_again(
    redis_client: redis.Redis, redis_url: str
) -> None:
    publish_catalog(redis_client)
    client = Client(
        ClientSettings(redis=RedisSettings(url=redis_url), webhook=WebhookSettings(allow_hosts=LOOPBACK_ALLOWED))
    )
    job_id = client.submit(GenerateRequest(model="fmnist-cgan", label="bag", count=1, seed=7)).id
    sent: list[JobMessage] = []
    with Connection(redis_url) as connection:
        worker = HandsBackWhileTheSweeperLooks(redis_client, connection.default_channel)
        sweeper = Sweeper(
            redis_client,
            client.store,
            sent.append,
            SweeperSettings(interval_s=30.0, stranded_after_s=60.0, confirm_s=5.0),
            clock=lambda: time.time() + 3600,  # every job recorded so far is old enough to look at
            sleep=lambda _: worker.fetch(),  # fetched again between the two looks: the same race again
        )
        sweeper.redis = worker  # type: ignore[assignment]
        worker.fetch()

        assert sweeper.sweep() == []

    assert sent == []
    assert redis_client.llen(constants.GENERATE_QUEUE) == 1  # its one message, back on its queue
    assert client.store.get(job_id).status.value == "queued"
