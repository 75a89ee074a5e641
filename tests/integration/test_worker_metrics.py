"""A worker's Prometheus metrics, scraped over HTTP after real jobs."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from stack import Stack, worker_env

from producer.contract import GenerateRequest, JobStatus

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
