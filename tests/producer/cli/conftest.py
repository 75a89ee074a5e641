"""The `genq` command in process (typer's CliRunner) against real Redis, moto S3 or a port nothing listens on."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest
import redis
from factories import output_refs

from producer.core import constants
from producer.core.store import JobStore


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No GENQ_* or AWS_* variable of the developer's shell reaches the command; dummy S3 credentials."""
    for name in list(os.environ):
        if name.startswith(("GENQ_", "AWS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return monkeypatch


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (the OS just handed it out and took it back)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def job_completer(redis_client: redis.Redis) -> Iterator[None]:
    """What a worker would record, without one: the first job queued in this test's database runs and succeeds with
    one output (nothing is stored in S3)."""
    stop = threading.Event()

    def complete() -> None:
        store = JobStore(redis_client, 3600)
        queued = constants.QUEUED_JOBS_KEY.format(queue="generate")
        while not stop.wait(0.05):
            for raw in redis_client.zrange(queued, 0, 0):
                job_id = raw.decode()
                store.start(job_id)
                store.set_progress(job_id, 0, 1)
                manifest = f"jobs/{job_id}/manifest.json"
                store.mark_succeeded(job_id, output_refs(range(1), prefix=f"jobs/{job_id}/"), manifest)
                return

    thread = threading.Thread(target=complete, name="job-completer", daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(5)
