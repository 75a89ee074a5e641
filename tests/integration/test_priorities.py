"""Priorities with a real worker: separate queues, served strictly high, normal, low.

In a module of its own: the low jobs it leaves queued go with this module's stack (flushed at its end).
"""

from __future__ import annotations

import pytest
from api_server import publish_catalog
from stack import Stack, worker_env

from producer.contract import GenerateRequest, JobStatus
from producer.core import constants

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
