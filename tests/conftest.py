"""Shared fixtures: real Redis (a dedicated DB, flushed per test) and a real S3 server (moto) on loopback."""

from __future__ import annotations

import os

# Two cores run the test process and worker subprocesses at once: torch's default of one thread per core in each
# oversubscribes them and OpenMP spin-waits make everything several times slower. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import boto3  # noqa: E402
import pytest  # noqa: E402
import redis  # noqa: E402
from webhook_receiver import WebhookReceiver  # noqa: E402

from producer.settings import DEV_WEBHOOK_SECRET  # noqa: E402

REDIS_URL = os.environ.get("GENQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - CI starts Redis; say so when it is missing
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}); start redis-server or set GENQ_TEST_REDIS_URL")
    return REDIS_URL


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free 127.0.0.1 port, reached over HTTP by real boto3."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point boto3 (in this process and in child processes) at the moto server with dummy credentials."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_endpoint


@pytest.fixture
def s3_bucket(aws_env: str) -> str:
    """A fresh, empty bucket per test."""
    name = f"genq-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=aws_env).create_bucket(Bucket=name)
    return name


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """A started receiver that verifies against the dev secret and answers 200; ``script()`` changes that."""
    receiver = WebhookReceiver(secret=DEV_WEBHOOK_SECRET)
    receiver.start()
    yield receiver
    receiver.stop()
