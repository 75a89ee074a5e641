"""A bulk job whose workers are SIGKILLed three times while they run its shards: two workers, each killed mid-shard
and replaced, then one of the replacements killed mid-shard too and replaced. The job ends with exactly its images,
byte for byte those of a clean run, nothing outside its manifest and nothing left in the broker or genq's indexes."""

from __future__ import annotations

import re
import time

import pytest
from invariants import assert_exact, assert_identical, wait_nothing_left
from stack import FAST_RECOVERY, Stack, wait_until, worker_env
from stack_fixtures import GENERATION_QUEUES, WorkerFactory
from tiny_model import TINY_NAME
from worker_process import WorkerProcess

from producer.client import Client
from producer.contract import GenerateRequest, JobStatus

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

COUNT = 1500
SHARD = 100  # 15 shards: each worker holds two at a time


def holds_a_shard(worker: WorkerProcess, job_id: str) -> bool:
    """The worker has taken a shard of the job that it has not finished: a kill now lands mid-shard."""
    log = worker.log()
    taken = set(re.findall(rf"genq\.generate\[({job_id}\.\d+)\] received", log))
    ended = set(re.findall(rf"genq\.generate\[({job_id}\.\d+)\] (?:succeeded|failed|retry|raised)", log))
    return bool(taken - ended)


def kill_mid_shard(workers: list[WorkerProcess], client: Client, job_id: str) -> WorkerProcess:
    """SIGKILL the first of ``workers`` seen holding a shard of the job (parent and pool at once: its shards'
    messages stay unacked until the visibility timeout); returns the one killed."""
    deadline = time.monotonic() + 90
    while (victim := next((w for w in workers if holds_a_shard(w, job_id)), None)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no worker took a shard of job {job_id} within 90 s")
        time.sleep(0.05)
    victim.kill()
    assert client.status(job_id).status is JobStatus.RUNNING, "the job ended before the kill: nothing was tested"
    return victim


def test_bulk_job_whose_workers_are_killed_three_times_stores_every_image_once_as_a_clean_run_does(
    stack: Stack, start_worker: WorkerFactory
) -> None:
    # A visibility timeout well above a shard's time even on a loaded machine (a shard's message restored while it
    # still runs would be a second delivery, not a fault), the sweeper and watchdog within seconds.
    env = worker_env(stack, GENQ_BATCHING__MAX_BATCH="16", GENQ_CELERY__VISIBILITY_TIMEOUT_S="5", **FAST_RECOVERY)

    def spawn() -> WorkerProcess:
        return start_worker(env, queues=GENERATION_QUEUES, concurrency=2, ready=False)

    first, second = spawn(), spawn()
    first.wait_ready(), second.wait_ready()
    client = Client(stack.client.settings.model_copy(update={"shard_size": SHARD}))
    request = GenerateRequest(model=TINY_NAME, counts={"bag": 700, "coat": 500, "sneaker": 300}, seed=17)
    job = client.submit(request)
    wait_until(lambda: client.status(job.id).progress.done >= COUNT // 10, 90, "a tenth of the job to be stored")

    kill_mid_shard([first], client, job.id)
    third = spawn()
    kill_mid_shard([second], client, job.id)  # no worker left until the replacements are ready
    fourth = spawn()
    replacements = [third.wait_ready(), fourth.wait_ready()]
    killed = kill_mid_shard(replacements, client, job.id)  # whichever takes a shard first
    survivor = next(w for w in replacements if w is not killed)
    spawn()
    view = client.wait(job.id, timeout=180)

    clean = client.wait(client.submit(request).id, timeout=120)
    assert_identical(stack, assert_exact(stack, view, COUNT), assert_exact(stack, clean, COUNT))
    wait_nothing_left(stack.redis, [job.id, clean.id])
    deliveries = [int(stack.redis.hget(f"genq:job:{job.id}", f"deliveries:{k}") or 0) for k in range(view.shards)]
    assert view.shards == COUNT // SHARD and min(deliveries) >= 1
    assert sum(deliveries) > view.shards, deliveries  # the killed workers' shards ran again elsewhere
    assert "Unrecoverable error" not in survivor.log()
