"""Flower against genq's broker, unchanged: ``celery -A worker.app:app flower`` shows the queues and their lengths.

Flower picks its broker client by the scheme of the app's broker URL (``flower.utils.broker.Broker``); genq's Redis
transport (``worker.deadletter.Transport``) used to make that URL ``worker.deadletter:Transport://…``, and Flower
answered "'redis' broker is not supported". Real Redis, Flower's own code and, in the last test, a real Flower.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from producer.core.settings import RedisSettings
from worker.app import TRANSPORT, create_app
from worker.settings import WorkerSettings

flower_broker = pytest.importorskip("flower.utils.broker", reason="Flower is in the dev and monitoring extras")

ROOT = Path(__file__).resolve().parents[2]


def test_flower_reads_queue_lengths_through_genqs_broker_url(redis_url: str, redis_client: redis.Redis) -> None:
    app = create_app(WorkerSettings(redis=RedisSettings(url=redis_url)))
    with app.connection() as connection:
        assert connection.transport_cls == TRANSPORT  # the dead-letter guard is what the workers consume through
        uri = connection.as_uri(include_password=True)
    assert uri == redis_url
    # What Flower's broker page and /api/queues/length do (flower.views.BaseHandler.get_broker).
    broker = flower_broker.Broker(
        uri, http_api=None, broker_options=app.conf.broker_transport_options, broker_use_ssl=app.conf.broker_use_ssl
    )
    assert isinstance(broker, flower_broker.Redis)
    redis_client.rpush("generate", "a", "b", "c")
    redis_client.rpush("generate.low.bulk", "d")
    queues = asyncio.run(broker.queues(["generate", "generate.low.bulk", "callbacks"]))
    assert queues == [
        {"name": "generate", "messages": 3},
        {"name": "generate.low.bulk", "messages": 1},
        {"name": "callbacks", "messages": 0},
    ]


def test_only_the_url_text_names_redis_clones_and_pickles_keep_the_guard() -> None:
    app = create_app(WorkerSettings(redis=RedisSettings(url="redis://:pw@127.0.0.1:6379/3")))
    connection = app.connection()
    assert connection.as_uri() == "redis://:**@127.0.0.1:6379/3"  # the password still masked
    assert connection.as_uri(include_password=True) == "redis://:pw@127.0.0.1:6379/3"
    assert connection.clone().transport_cls == TRANSPORT
    assert pickle.loads(pickle.dumps(connection)).transport_cls == TRANSPORT
    # Other schemes keep kombu's own transport and URL.
    tls = create_app(WorkerSettings(redis=RedisSettings(url="rediss://cache.example:6380/0"))).connection()
    assert tls.as_uri().startswith("rediss://")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def flower(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """``celery -A worker.app:app flower`` on a free loopback port, as docs/operations.md runs it; its URL."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "CELERY_"))}
    env["GENQ_REDIS__URL"] = redis_url
    log = (tmp_path / "flower.log").open("wb")
    argv = [sys.executable, "-m", "celery", "-A", "worker.app:app", "flower", "--address=127.0.0.1", f"--port={port}"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


@pytest.mark.integration
def test_flowers_broker_page_shows_genqs_queue_and_its_length(
    flower: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    redis_client.rpush("generate", "a", "b", "c")
    deadline = time.monotonic() + 60
    while True:
        try:
            page = httpx.get(f"{flower}/broker", timeout=10)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                pytest.fail("Flower did not answer within 60 s:\n" + (tmp_path / "flower.log").read_text()[-4000:])
            time.sleep(0.2)
    assert page.status_code == 200, page.text[-2000:]  # 404 "'redis' broker is not supported" before
    assert "redis://" in page.text
    # No worker runs: Flower lists the app's default queue, with its length from Redis.
    row = re.search(r'<tr id="generate">\s*<td>generate</td>\s*<td[^>]*>(\d+)</td>', page.text)
    assert row and row.group(1) == "3", page.text[-3000:]
