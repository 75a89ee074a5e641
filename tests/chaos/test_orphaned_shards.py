"""The second line, with real processes: a running shard whose worker was killed and whose message is gone (taken out
of kombu's unacked hash, as a Redis that lost it would) is found by its stopped heartbeat and runs again, storing
exactly the bytes of a clean run."""

from __future__ import annotations

import pytest
from invariants import assert_exact, assert_identical, wait_nothing_left
from stack import FAST_RECOVERY, Stack, wait_until, worker_env

from producer.contract import GenerateRequest, JobStatus
from producer.core import constants

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def test_a_killed_workers_shard_whose_message_is_gone_is_sent_again_and_completes(stack: Stack, start_worker) -> None:  # type: ignore[no-untyped-def]
    # A visibility timeout far beyond the test: kombu's restore plays no part, and it has nothing to restore anyway.
    env = worker_env(stack, GENQ_BATCHING__MAX_BATCH="8", GENQ_CELERY__VISIBILITY_TIMEOUT_S="600", **FAST_RECOVERY)
    doomed = start_worker(env, concurrency=1)
    request = GenerateRequest(model="fmnist-cgan", label="coat", count=300, seed=12)
    job = stack.client.submit(request).id
    wait_until(lambda: stack.client.status(job).progress.done >= 40, 60, "the job to be well under way")
    wait_until(lambda: stack.redis.zscore(constants.RUNNING_SHARDS_KEY, f"{job}.0") is not None, 10, "a heartbeat")
    doomed.kill()
    stack.redis.delete(constants.KOMBU_UNACKED_KEY, "unacked_index")  # its message: gone with it
    assert stack.client.status(job).status is JobStatus.RUNNING

    rescuer = start_worker(env, concurrency=1)
    view = stack.client.wait(job, timeout=45)

    rescued = assert_exact(stack, view, 300)
    assert f"job {job}: shard 0 was running on a worker that is gone" in rescuer.log()
    assert int(stack.redis.hget(f"genq:job:{job}", "deliveries:0") or 0) == 2  # the killed run and the rescue
    clean = stack.client.wait(stack.client.submit(request).id, timeout=45)
    assert_identical(stack, rescued, assert_exact(stack, clean, 300))
    wait_nothing_left(stack.redis, [job, clean.id])  # the rescued shard has left genq:shards:running too
