"""The second line, with real processes: a running shard whose worker was killed and whose message is gone (taken out
of kombu's unacked hash, as a Redis that lost it would) is found by its stopped heartbeat and runs again."""

from __future__ import annotations

import pytest
from stack import Stack, wait_until, worker_env

from producer.contract import GenerateRequest, JobStatus
from producer.core import constants

pytestmark = pytest.mark.integration

FAST_RECOVERY = {
    "GENQ_SWEEPER__INTERVAL_S": "1.5",
    "GENQ_SWEEPER__STRANDED_AFTER_S": "2",
    "GENQ_SWEEPER__CONFIRM_S": "1",
    "GENQ_SWEEPER__HEARTBEAT_S": "0.5",
    "GENQ_SWEEPER__ORPHANED_AFTER_S": "2",
}


def test_a_killed_workers_shard_whose_message_is_gone_is_sent_again_and_completes(stack: Stack, start_worker) -> None:  # type: ignore[no-untyped-def]
    # A visibility timeout far beyond the test: kombu's restore plays no part, and it has nothing to restore anyway.
    env = worker_env(stack, GENQ_BATCHING__MAX_BATCH="8", GENQ_CELERY__VISIBILITY_TIMEOUT_S="600", **FAST_RECOVERY)
    doomed = start_worker(env, concurrency=1)
    job = stack.client.submit(GenerateRequest(model="fmnist-cgan", label="coat", count=300, seed=12)).id
    wait_until(lambda: stack.client.status(job).progress.done >= 40, 60, "the job to be well under way")
    wait_until(lambda: stack.redis.zscore(constants.RUNNING_SHARDS_KEY, f"{job}.0") is not None, 10, "a heartbeat")
    doomed.kill()
    stack.redis.delete(constants.KOMBU_UNACKED_KEY, "unacked_index")  # its message: gone with it
    assert stack.client.status(job).status is JobStatus.RUNNING

    rescuer = start_worker(env, concurrency=1)
    view = stack.client.wait(job, timeout=45)

    assert view.status is JobStatus.SUCCEEDED, view.error
    keys = stack.keys(f"jobs/{job}/")
    assert keys == [f"jobs/{job}/{i:05d}.png" for i in range(300)] + [f"jobs/{job}/manifest.json"]
    assert f"job {job}: shard 0 was running on a worker that is gone" in rescuer.log()
    assert int(stack.redis.hget(f"genq:job:{job}", "deliveries:0") or 0) == 2  # the killed run and the rescue
    wait_until(lambda: stack.redis.zcard(constants.RUNNING_SHARDS_KEY) == 0, 10, "the shard to leave the set")
