"""Redis restarting under jobs, with real processes: a `genq worker` subprocess against a redis-server of the test's
own (AOF, ``appendfsync everysec``), shut down or killed while jobs run, or shut down while jobs only wait in their
queues, and started again on the same data folder. Every job ends ``succeeded`` with exactly its images, byte for
byte those of a clean run, and nothing is left behind in queues or indexes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import redis
from api_server import publish_catalog
from invariants import assert_exact, assert_identical, wait_nothing_left
from redis_server import RedisServer
from stack import AWS_ENV, FAST_RECOVERY, LOOPBACK_ALLOWED, Stack, boto_kwargs, wait_until, worker_env

from producer.client import Client
from producer.contract import GenerateRequest
from producer.core import constants
from producer.core.settings import RedisSettings, S3Settings, WebhookSettings
from producer.settings import ClientSettings

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


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


def _requests(small_jobs: int = 8) -> tuple[GenerateRequest, list[GenerateRequest]]:
    """A 300-image job (three shards) and ``small_jobs`` 3- and 4-image jobs."""
    big = GenerateRequest(model="fmnist-cgan", label="bag", count=300, seed=11)
    small = [GenerateRequest(model="fmnist-cgan", label=i, count=3 + i % 2, seed=20 + i) for i in range(small_jobs)]
    return big, small


def _assert_as_clean_runs(stack: Stack, jobs: dict[str, GenerateRequest], timeout: float) -> None:
    """Every job succeeded with exactly its images, byte for byte those of a clean run of its spec (run now, on the
    same stack), and nothing is left in Redis: no message, no queued-index entry, no running shard."""
    views = {job_id: stack.client.wait(job_id, timeout=timeout) for job_id in jobs}
    faulted = {job_id: assert_exact(stack, view, jobs[job_id].total_images) for job_id, view in views.items()}
    clean = {job_id: stack.client.submit(request).id for job_id, request in jobs.items()}
    for job_id, clean_id in clean.items():
        reference = stack.client.wait(clean_id, timeout=timeout)
        assert_identical(stack, faulted[job_id], assert_exact(stack, reference, jobs[job_id].total_images))
    wait_nothing_left(stack.redis, everything=True, timeout=15)  # the test's own Redis: nothing at all


def _restart_under_jobs(stack: Stack, server: RedisServer, start_worker, *, kill: bool) -> None:  # type: ignore[no-untyped-def]
    # Small jobs wait 100 ms for company in their forward pass: several are in flight when Redis goes.
    env = worker_env(
        stack,
        GENQ_BATCHING__MAX_BATCH="8",
        GENQ_BATCHING__MAX_WAIT_MS="100",
        GENQ_CELERY__VISIBILITY_TIMEOUT_S="60",  # far longer than the test: kombu's restore plays no part
        **FAST_RECOVERY,
    )
    worker = start_worker(env, concurrency=4)
    big_request, small_requests = _requests()
    big = stack.client.submit(big_request).id
    wait_until(lambda: stack.client.status(big).progress.done >= 40, 60, "the big job to be well under way")
    jobs = {big: big_request} | {stack.client.submit(r).id: r for r in small_requests}
    (server.kill if kill else server.shutdown)()
    time.sleep(1.5)  # an outage, not a condition: the worker's Redis calls fail meanwhile
    server.start()
    try:
        _assert_as_clean_runs(stack, jobs, timeout=45)
    except BaseException:
        print(worker.log()[-6000:])
        raise
    # The big job's shards met the outage mid-run and were handed back, not failed: each ran again, once.
    handed_back = [k for k in range(3) if f"{big}.{k}: Redis did not answer" in worker.log()]
    assert handed_back, "no shard of the big job met the outage: nothing was tested"
    deliveries = [int(stack.redis.hget(f"genq:job:{big}", f"deliveries:{k}") or 0) for k in range(3)]
    assert deliveries == [2 if k in handed_back else 1 for k in range(3)]
    assert "Unrecoverable error" not in worker.log()  # the worker rode the restart out


def test_redis_shut_down_mid_job_every_job_still_succeeds(
    own_stack: Stack, own_redis: RedisServer, start_worker
) -> None:  # type: ignore[no-untyped-def]
    _restart_under_jobs(own_stack, own_redis, start_worker, kill=False)
    dead = [json.loads(e) for e in own_stack.redis.lrange(constants.DEADLETTER_KEY, 0, -1)]
    assert dead == []  # nothing was refused: the outage is no fault of the jobs


def test_redis_killed_mid_job_every_job_still_succeeds(own_stack: Stack, own_redis: RedisServer, start_worker) -> None:  # type: ignore[no-untyped-def]
    _restart_under_jobs(own_stack, own_redis, start_worker, kill=True)


def test_redis_shut_down_while_jobs_are_only_queued_keeps_them_and_a_worker_started_after_runs_each_once(
    own_stack: Stack, own_redis: RedisServer, start_worker
) -> None:  # type: ignore[no-untyped-def]
    publish_catalog(own_stack.redis)  # no worker yet: what it would publish, so the jobs can be submitted
    big_request, small_requests = _requests(small_jobs=3)
    jobs = {own_stack.client.submit(r).id: r for r in [big_request, *small_requests]}
    queued = {q: own_stack.redis.llen(q) for q in constants.WORKER_QUEUES}
    assert sum(queued.values()) == 3 + len(small_requests)  # one message per shard, waiting

    own_redis.shutdown()  # SHUTDOWN fsyncs the AOF first: what it had, it keeps
    own_redis.start()
    assert {q: own_stack.redis.llen(q) for q in constants.WORKER_QUEUES} == queued
    assert own_stack.redis.hlen(constants.KOMBU_UNACKED_KEY) == 0

    worker = start_worker(worker_env(own_stack, **FAST_RECOVERY), concurrency=4)
    _assert_as_clean_runs(own_stack, jobs, timeout=45)
    for job_id, request in jobs.items():  # each shard ran once: nothing was lost or sent twice
        shards = -(-request.total_images // own_stack.client.settings.shard_size)
        deliveries = [own_stack.redis.hget(f"genq:job:{job_id}", f"deliveries:{k}") for k in range(shards)]
        assert deliveries == [b"1"] * shards, (job_id, deliveries)
    assert "nowhere in the broker" not in worker.log()  # no message was missing: the sweeper resent none
