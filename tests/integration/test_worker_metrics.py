"""A worker's Prometheus metrics, scraped over HTTP after real jobs, and its Celery task events."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request
from typing import Any

import pytest
from celery import Celery
from stack import Stack, wait_until, worker_env

from producer.contract import GenerateRequest, JobStatus
from producer.core.settings import RedisSettings
from worker.app import create_app
from worker.settings import WorkerSettings

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sample(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
    assert values, f"{name} not exposed"
    return sum(values)


def test_worker_exposes_images_batches_model_loads_and_shard_outcomes(stack: Stack, start_worker) -> None:  # type: ignore[no-untyped-def]
    port = _free_port()
    start_worker(worker_env(stack, GENQ_METRICS_PORT=str(port)), concurrency=2)
    ok = stack.client.wait(stack.client.submit(GenerateRequest(model="fmnist-cgan", label=1, count=5)).id, 60)
    bad = stack.client.wait(stack.client.submit(GenerateRequest(model="broken-cgan", label=1)).id, 60)
    assert ok.status is JobStatus.SUCCEEDED and bad.status is JobStatus.FAILED
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert _sample(text, 'genq_images_stored_total{model="fmnist-cgan"}') == 5
    assert _sample(text, 'genq_worker_shards_total{outcome="stored"}') == 1
    assert _sample(text, 'genq_worker_shards_total{outcome="failed"}') == 1
    assert _sample(text, "genq_batch_size_count") >= 1 and _sample(text, "genq_batch_size_sum") >= 5
    assert _sample(text, "genq_model_load_seconds_count") >= 1


class _EventLog:
    """Celery events on the stack's broker, captured by a real receiver on a thread of its own (what Flower runs)."""

    def __init__(self, app: Celery) -> None:
        self.types: list[str] = []
        self._lock = threading.Lock()
        self._connection = app.connection_for_read()
        self._receiver = app.events.Receiver(self._connection, handlers={"*": self._record})
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _record(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.types.append(str(event.get("type")))

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # the connection closes under it at the end
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def task_events(self) -> list[str]:
        with self._lock:
            return [t for t in self.types if t.startswith("task-")]

    def close(self) -> None:
        self._receiver.should_stop = True
        self._thread.join(5)
        self._connection.release()


def test_a_worker_sends_task_events_only_once_a_monitor_enables_them(stack: Stack, start_worker) -> None:  # type: ignore[no-untyped-def]
    start_worker(worker_env(stack), concurrency=2)
    app = create_app(WorkerSettings(redis=RedisSettings(url=stack.redis_url)))
    events = _EventLog(app)
    try:
        time.sleep(0.5)  # the receiver has subscribed
        request = GenerateRequest(model="fmnist-cgan", label=1)
        assert stack.client.wait(stack.client.submit(request).id, 60).status is JobStatus.SUCCEEDED
        time.sleep(1.0)
        assert events.task_events() == []  # the default: three Redis publishes per task saved

        replies = app.control.enable_events(reply=True, timeout=5)  # what Flower sends every few seconds
        assert replies, "no worker answered enable_events"
        assert stack.client.wait(stack.client.submit(request).id, 60).status is JobStatus.SUCCEEDED
        wait_until(lambda: "task-succeeded" in events.task_events(), 10, "a task-succeeded event")
        assert {"task-received", "task-started"} <= set(events.task_events())
    finally:
        events.close()
