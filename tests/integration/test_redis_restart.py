"""Redis restarting under running jobs, with real processes: a `genq worker` subprocess against a redis-server of the
test's own (AOF, ``appendfsync everysec``), shut down or killed mid-job and started again on the same data folder.
Every job ends ``succeeded`` with exactly its images stored, and nothing is left behind in queues or indexes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import redis
from redis_server import RedisServer
from stack import AWS_ENV, LOOPBACK_ALLOWED, Stack, boto_kwargs, wait_until, worker_env

from producer.client import Client
from producer.contract import GenerateRequest, JobStatus, JobView, Manifest
from producer.core import constants
from producer.core.settings import RedisSettings, S3Settings, WebhookSettings
from producer.settings import ClientSettings

pytestmark = pytest.mark.integration

# Fast second line: heartbeats every 0.5 s, a shard unbeaten for 2 s is looked at, one sweep every 1.5 s.
FAST_RECOVERY = {
    "GENQ_SWEEPER__INTERVAL_S": "1.5",
    "GENQ_SWEEPER__STRANDED_AFTER_S": "2",
    "GENQ_SWEEPER__CONFIRM_S": "1",
    "GENQ_SWEEPER__HEARTBEAT_S": "0.5",
    "GENQ_SWEEPER__ORPHANED_AFTER_S": "2",
}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder).start()
    yield server
    server.kill()


@pytest.fixture
def own_stack(own_redis: RedisServer, s3_endpoint: str, model_root: Path) -> Iterator[Stack]:
    bucket = f"genq-rr-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, **boto_kwargs()).create_bucket(Bucket=bucket)
    client = redis.Redis.from_url(own_redis.url)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", s3_endpoint)
        for name, value in AWS_ENV.items():
            mp.setenv(name, value)
        settings = ClientSettings(
            redis=RedisSettings(url=own_redis.url),
            s3=S3Settings(bucket=bucket),
            webhook=WebhookSettings(allow_hosts=LOOPBACK_ALLOWED),
            shard_size=100,  # the big job runs as three shards at once
        )
        yield Stack(own_redis.url, client, s3_endpoint, bucket, model_root, Client(settings))
    client.close()


def _assert_complete(stack: Stack, view: JobView, count: int) -> None:
    assert view.status is JobStatus.SUCCEEDED, view.error
    keys = stack.keys(f"jobs/{view.id}/")
    assert keys == [f"jobs/{view.id}/{i:05d}.png" for i in range(count)] + [f"jobs/{view.id}/manifest.json"]
    manifest = Manifest.model_validate_json(stack.get(f"jobs/{view.id}/manifest.json"))
    assert [o.index for o in manifest.outputs] == list(range(count))
    assert view.progress.done == count


def _nothing_left(stack: Stack) -> bool:
    """No message on any queue or in kombu's unacked hash, no job indexed as queued, no shard listed as running."""
    r = stack.redis
    queues = [*constants.GENERATE_QUEUES.values(), constants.CALLBACK_QUEUE]
    indexes = [constants.QUEUED_JOBS_KEY.format(queue=q) for q in constants.GENERATE_QUEUES.values()]
    return (
        sum(int(r.llen(q)) for q in queues) == 0
        and int(r.hlen(constants.KOMBU_UNACKED_KEY)) == 0
        and sum(int(r.zcard(i)) for i in indexes) == 0
        and int(r.zcard(constants.RUNNING_SHARDS_KEY)) == 0
    )


def _wait_all(stack: Stack, jobs: dict[str, int], timeout: float) -> None:
    for job_id, count in jobs.items():
        _assert_complete(stack, stack.client.wait(job_id, timeout=timeout), count)


def _restart_under_jobs(stack: Stack, server: RedisServer, start_worker, *, kill: bool) -> dict[str, int]:  # type: ignore[no-untyped-def]
    # Small jobs wait 100 ms for company in their forward pass: several are in flight when Redis goes.
    env = worker_env(
        stack,
        GENQ_BATCHING__MAX_BATCH="8",
        GENQ_BATCHING__MAX_WAIT_MS="100",
        GENQ_CELERY__VISIBILITY_TIMEOUT_S="60",  # far longer than the test: kombu's restore plays no part
        **FAST_RECOVERY,
    )
    worker = start_worker(env, concurrency=4)
    big = stack.client.submit(GenerateRequest(model="fmnist-cgan", label="bag", count=300, seed=11)).id
    wait_until(lambda: stack.client.status(big).progress.done >= 40, 60, "the big job to be well under way")
    small = {
        stack.client.submit(GenerateRequest(model="fmnist-cgan", label=i, count=3 + i % 2, seed=20 + i)).id: 3 + i % 2
        for i in range(8)
    }
    (server.kill if kill else server.shutdown)()
    time.sleep(1.5)  # the worker's Redis calls fail meanwhile
    server.start()
    jobs = {big: 300} | small
    try:
        _wait_all(stack, jobs, timeout=45)
        wait_until(lambda: _nothing_left(stack), 15, "queues, unacked and indexes to drain")
    except BaseException:
        print(worker.log()[-6000:])
        raise
    # The big job's shards met the outage mid-run and were handed back, not failed: each ran again, once.
    handed_back = [k for k in range(3) if f"{big}.{k}: Redis did not answer" in worker.log()]
    assert handed_back, "no shard of the big job met the outage: nothing was tested"
    deliveries = [int(stack.redis.hget(f"genq:job:{big}", f"deliveries:{k}") or 0) for k in range(3)]
    assert deliveries == [2 if k in handed_back else 1 for k in range(3)]
    assert "Unrecoverable error" not in worker.log()  # the worker rode the restart out
    return jobs


def test_redis_shut_down_mid_job_every_job_still_succeeds(
    own_stack: Stack, own_redis: RedisServer, start_worker
) -> None:  # type: ignore[no-untyped-def]
    _restart_under_jobs(own_stack, own_redis, start_worker, kill=False)
    dead = [json.loads(e) for e in own_stack.redis.lrange(constants.DEADLETTER_KEY, 0, -1)]
    assert dead == []  # nothing was refused: the outage is no fault of the jobs


def test_redis_killed_mid_job_every_job_still_succeeds(own_stack: Stack, own_redis: RedisServer, start_worker) -> None:  # type: ignore[no-untyped-def]
    _restart_under_jobs(own_stack, own_redis, start_worker, kill=True)
