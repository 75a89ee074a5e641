"""Fixtures of the real stack (Redis, moto S3, `genq worker` subprocesses), shared by tests/integration, tests/chaos
and tests/producer/api.

Conftests import them by name; they are defined once, here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
import redis
from stack import AWS_ENV, LOOPBACK_ALLOWED, Stack, boto_kwargs, worker_env
from tiny_model import make_tiny_model
from worker_process import WorkerProcess

from producer.client import Client
from producer.core import constants
from producer.core.settings import RedisSettings, S3Settings, WebhookSettings
from producer.settings import ClientSettings


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Extra models beside the shipped zoo: a tiny working one and one whose weights are corrupt."""
    root = tmp_path_factory.mktemp("models")
    make_tiny_model(root)
    broken = make_tiny_model(root, name="broken-cgan")
    (broken / "weights.safetensors").write_bytes(b"this is not a safetensors file")
    return root


@pytest.fixture(scope="module")
def stack(redis_url: str, s3_endpoint: str, model_root: Path) -> Iterator[Stack]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    bucket = f"genq-it-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, **boto_kwargs()).create_bucket(Bucket=bucket)
    with pytest.MonkeyPatch.context() as mp:  # the client's own boto3 reads the standard AWS variables
        mp.setenv("AWS_ENDPOINT_URL", s3_endpoint)
        for name, value in AWS_ENV.items():
            mp.setenv(name, value)
        settings = ClientSettings(
            redis=RedisSettings(url=redis_url),
            s3=S3Settings(bucket=bucket),
            webhook=WebhookSettings(allow_hosts=LOOPBACK_ALLOWED),
        )
        yield Stack(redis_url, client, s3_endpoint, bucket, model_root, Client(settings))
    client.flushdb()
    client.close()


WorkerFactory = Callable[..., WorkerProcess]
WORKER_QUEUES = ",".join(constants.WORKER_QUEUES)  # what `genq worker` consumes by default
# The generation queues alone: a worker with no callbacks worker beside it (a child process of its own)
GENERATION_QUEUES = ",".join(q for q in constants.WORKER_QUEUES if q != constants.CALLBACK_QUEUE)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[WorkerFactory]:
    """Start `genq worker` subprocesses (ready to consume when returned, unless ``ready=False``: then call
    ``wait_ready()``); all are stopped after the test."""
    started: list[WorkerProcess] = []

    def start(
        env: dict[str, str],
        *,
        queues: str = WORKER_QUEUES,
        pool: str = "threads",
        concurrency: int = 2,
        ready: bool = True,
    ) -> WorkerProcess:
        log = tmp_path / f"worker-{len(started)}.log"
        worker = WorkerProcess(env, log, queues=queues, pool=pool, concurrency=concurrency)
        started.append(worker)
        return worker.wait_ready() if ready else worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def module_worker(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """One worker shared by the tests of a module that need nothing special."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    worker = WorkerProcess(worker_env(stack), log, queues=WORKER_QUEUES, pool="threads", concurrency=3)
    try:
        yield worker.wait_ready()
    finally:
        worker.stop()
