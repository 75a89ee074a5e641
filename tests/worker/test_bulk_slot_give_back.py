"""A bulk shard waiting for a bulk slot gives way to messages on queues served before its own: it hands its message
back instead of holding a pool thread, with nothing counted against it (neither a delivery nor a retry). With nothing
ahead of it, it waits for its slot as before; jobs of one forward pass never wait."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import redis
from celery.app.trace import LOG_REJECTED
from celery.exceptions import Reject
from celery.utils.saferepr import saferepr
from tiny_runtime import tiny_job as _job
from tiny_runtime import tiny_runtime

from producer.contract import JobStatus, plan_shards
from producer.core.constants import WORKER_QUEUES
from worker.app import GIVEN_BACK
from worker.jobs import NoBulkSlot, execute_generate, messages_ahead
from worker.reporting import RedisReporter
from worker.runtime import Runtime
from worker.settings import BatchingSettings, CelerySettings


@pytest.fixture
def runtime(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[Runtime]:
    with tiny_runtime(
        redis_url,
        tmp_path,
        batching=BatchingSettings(max_batch=4, max_wait_ms=1, max_bulk_shards=1, bulk_wait_check_s=0.01),
        celery=CelerySettings(max_deliveries=2),
    ) as runtime:
        yield runtime


def _reporter(runtime: Runtime) -> RedisReporter:
    return RedisReporter(runtime.store)


def test_a_bulk_shard_giving_way_is_handed_back_uncounted_and_runs_later(
    runtime: Runtime, redis_client: redis.Redis
) -> None:
    job, shards = _job("job-bulk", 16), plan_shards(16, 8)  # 2 shards of 8 images, max_batch 4: bulk
    runtime.store.create(job, shards=len(shards))

    with runtime.bulk_slots:  # the only bulk slot is taken
        with pytest.raises(NoBulkSlot):
            execute_generate(job, runtime, _reporter(runtime), shards[0], give_way=lambda: True)

    fields = cast(dict[bytes, bytes], redis_client.hgetall(runtime.store.key(job.job_id)))
    assert not any(name.startswith(b"deliveries:") for name in fields), "a hand-back is not a delivery"
    assert runtime.store.get(job.job_id).status is JobStatus.QUEUED
    record = runtime.store.undelivered([job.job_id])[job.job_id]
    assert record is not None and record.waiting == (0, 1)  # undelivered yet: the sweeper still looks after them

    for shard in shards:  # the slot is free again: the shards run
        assert execute_generate(job, runtime, _reporter(runtime), shard, give_way=lambda: True)
    assert runtime.store.get(job.job_id).status is JobStatus.SUCCEEDED


def test_a_shard_handed_back_more_often_than_max_deliveries_is_not_dead_lettered(runtime: Runtime) -> None:
    job = _job("job-patient", 8)  # one bulk shard of two forward passes
    runtime.store.create(job)
    limit = runtime.settings.celery.max_deliveries

    with runtime.bulk_slots:
        for _ in range(3 * limit):  # given way every time, far more often than max_deliveries
            with pytest.raises(NoBulkSlot):
                execute_generate(job, runtime, _reporter(runtime), give_way=lambda: True)

    assert execute_generate(job, runtime, _reporter(runtime), give_way=lambda: True)
    view = runtime.store.get(job.job_id)
    assert view.status is JobStatus.SUCCEEDED, view.error


def test_a_job_of_one_forward_pass_runs_while_every_bulk_slot_is_taken(runtime: Runtime) -> None:
    job = _job("job-small", 4)  # max_batch images: one forward pass, needs no slot
    runtime.store.create(job)

    with runtime.bulk_slots:
        assert execute_generate(job, runtime, _reporter(runtime), give_way=lambda: True)

    assert runtime.store.get(job.job_id).status is JobStatus.SUCCEEDED


def test_celery_logs_no_warning_for_a_hand_back_but_does_for_other_rejects(caplog: pytest.LogCaptureFixture) -> None:
    trace = logging.getLogger("celery.app.trace")  # where Celery logs a task's Reject, with this context

    with caplog.at_level(logging.INFO):
        for reason in (GIVEN_BACK, "Redis did not answer"):
            context = {"id": "job.0", "name": "genq.generate", "exc": saferepr(Reject(reason, requeue=True))}
            trace.warning(LOG_REJECTED, {**context, "description": "rejected"})

    assert [r.getMessage() for r in caplog.records] == [
        "Task genq.generate[job.0] reject requeue=True: Redis did not answer"
    ]


def test_a_bulk_shard_with_nothing_ahead_of_it_waits_for_its_slot(runtime: Runtime) -> None:
    job = _job("job-waits", 8)
    runtime.store.create(job)
    asked: list[bool] = []

    def nothing_ahead() -> bool:
        asked.append(True)
        if len(asked) == 5:  # a shard running elsewhere in the process ends
            runtime.bulk_slots.release()
        return False

    runtime.bulk_slots.acquire()
    assert execute_generate(job, runtime, _reporter(runtime), give_way=nothing_ahead)

    assert len(asked) == 5 and runtime.store.get(job.job_id).status is JobStatus.SUCCEEDED


@pytest.mark.parametrize(
    ("queue", "waiting_on", "served", "gives_way"),
    [
        ("generate.low", "generate.high", WORKER_QUEUES, True),
        ("generate.low", "generate", WORKER_QUEUES, True),
        ("generate.low", "generate.low", WORKER_QUEUES, False),  # its siblings: they would wait the same
        ("generate", "generate.low", WORKER_QUEUES, False),
        ("generate.high", "generate", WORKER_QUEUES, False),
        ("generate.high", "callbacks", WORKER_QUEUES, True),  # --inline-callbacks
        ("generate.low", "callbacks", ("generate.high", "generate", "generate.low"), False),  # not served here
        ("generate.low", "generate.high", ("generate", "generate.low"), False),
    ],
)
def test_a_bulk_shard_gives_way_only_to_messages_its_worker_serves_before_its_own_queue(
    runtime: Runtime, redis_client: redis.Redis, queue: str, waiting_on: str, served: tuple[str, ...], gives_way: bool
) -> None:
    check = messages_ahead(runtime, queue, served)
    assert not check()  # every queue empty

    redis_client.lpush(waiting_on, "a message")

    assert check() is gives_way
