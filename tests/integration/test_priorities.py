"""Priorities with a real worker: separate queues, served strictly high, normal, low.

In a module of its own: the low jobs it leaves queued go with this module's stack (flushed at its end).
"""

from __future__ import annotations

import pytest
from api_server import publish_catalog
from stack import Stack, wait_until, worker_env

from producer.client import Client
from producer.contract import GenerateRequest, JobStatus
from producer.core import constants
from producer.core.store import JobStore

pytestmark = pytest.mark.integration

LOW = 1000


def test_high_jobs_submitted_behind_a_thousand_low_ones_start_before_them(stack: Stack, start_worker) -> None:  # type: ignore[no-untyped-def]
    publish_catalog(stack.redis)  # no worker yet: what it would publish, so jobs can be submitted

    def submit(priority: str, seed: int) -> str:
        request = GenerateRequest(model="fmnist-cgan", label="bag", count=1, seed=seed, priority=priority)  # type: ignore[arg-type]
        return stack.client.submit(request).id

    low = [submit("low", i) for i in range(LOW)]
    # Three high and two normal ones: kombu's default round-robin would serve high, normal, low, high, ...;
    # strict order serves every high job, then every normal one, then the low ones.
    high = [submit("high", i) for i in range(3)]
    normal = [submit("normal", i) for i in range(2)]
    depths = {queue: stack.redis.llen(queue) for queue in constants.GENERATE_QUEUES.values()}
    assert depths == {"generate.high": 3, "generate": 2, "generate.low": LOW}

    start_worker(worker_env(stack), concurrency=1)  # one job at a time: start order is the order served
    for job_id in [*high, *normal, *low[:3]]:  # each queue is FIFO: low[2] done means low[0..2] ran
        assert stack.client.wait(job_id, timeout=120).status is JobStatus.SUCCEEDED

    def started(ids: list[str]) -> list[float]:
        views = [stack.client.status(job_id) for job_id in ids]
        return sorted(v.started_at.timestamp() for v in views if v.started_at is not None)

    high_started, normal_started, low_started = started(high), started(normal), started(low)
    assert len(high_started) == 3 and len(normal_started) == 2 and 3 <= len(low_started) < LOW
    assert high_started[-1] < normal_started[0] < normal_started[-1] < low_started[0]


SHARDS = 20  # low bulk shards, more than the worker has threads
SHARD = 400  # images per shard: 100 forward passes of MAX_BATCH, so a shard runs for seconds
THREADS = 4


def test_a_high_job_starts_while_prefetched_low_bulk_shards_wait_for_a_bulk_slot(  # type: ignore[no-untyped-def]
    stack: Stack, start_worker
) -> None:
    stack.redis.flushdb()  # whatever the test before left queued
    publish_catalog(stack.redis)
    client = Client(stack.client.settings.model_copy(update={"shard_size": SHARD}))

    def submit(priority: str, count: int) -> str:
        request = GenerateRequest(model="fmnist-cgan", label="bag", count=count, seed=3, priority=priority)  # type: ignore[arg-type]
        return client.submit(request).id

    low = submit("low", SHARDS * SHARD)
    env = worker_env(
        stack,
        GENQ_BATCHING__MAX_BATCH="4",  # every low shard is bulk; the 4-image high job is one forward pass
        GENQ_BATCHING__MAX_BULK_SHARDS="1",
        GENQ_BATCHING__BULK_WAIT_CHECK_S="0.2",
        GENQ_SWEEPER__ENABLED="false",
    )
    start_worker(env, concurrency=THREADS)  # each thread takes a low shard; one runs, the others find no free slot

    def every_thread_took_a_low_shard() -> bool:
        fetched = stack.redis.hlen(constants.KOMBU_UNACKED_KEY)
        return client.status(low).status is JobStatus.RUNNING and fetched >= THREADS

    wait_until(every_thread_took_a_low_shard, 60, "a low shard running and one fetched by every thread")

    high = submit("high", 4)
    assert client.wait(high, timeout=60).status is JobStatus.SUCCEEDED

    # Holding their messages, the low shards waiting for the slot would have kept every thread until the running one
    # finished; handed back, they leave a thread to the high job while the first low shard still runs.
    shards_done = int(stack.redis.hget(JobStore.key(low), "shards_done") or 0)
    assert client.status(low).status is JobStatus.RUNNING and shards_done == 0
    client.cancel(low)
