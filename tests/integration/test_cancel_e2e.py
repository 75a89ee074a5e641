"""Canceling jobs run by a real worker: a queued job never starts; a running one stops after its current batch and
lists exactly what it stored."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from api_server import publish_catalog
from stack import Stack, worker_env

from producer.contract import GenerateRequest, JobStatus

pytestmark = pytest.mark.integration


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def test_a_canceled_queued_job_never_starts(stack: Stack, start_worker) -> None:  # type: ignore[no-untyped-def]
    publish_catalog(stack.redis)  # no worker yet: what it would publish, so the job can be submitted
    job = stack.client.submit(GenerateRequest(model="fmnist-cgan", label="bag", count=4, seed=1))
    assert stack.client.cancel(job.id).status is JobStatus.CANCELED
    worker = start_worker(worker_env(stack), concurrency=1)
    # Queued behind the canceled job's message on the same queue: once it is done, that message was consumed.
    later = stack.client.submit(GenerateRequest(model="fmnist-cgan", label="bag", count=1, seed=2))
    assert stack.client.wait(later.id, timeout=60).status is JobStatus.SUCCEEDED

    view = stack.client.status(job.id)
    assert view.status is JobStatus.CANCELED and view.started_at is None
    assert view.outputs == [] and view.progress.done == 0 and view.manifest_key is None
    assert stack.keys(f"jobs/{job.id}/") == []
    assert f"job {job.id} shard 1/1 had already ended" in worker.log()


def test_a_running_job_stops_after_its_current_batch_and_lists_what_it_stored(stack: Stack, start_worker) -> None:  # type: ignore[no-untyped-def]
    batch = 8
    worker = start_worker(worker_env(stack, GENQ_BATCHING__MAX_BATCH=str(batch)), concurrency=1)
    job = stack.client.submit(GenerateRequest(model="fmnist-cgan", label="coat", count=400, seed=3))
    _wait_until(lambda: stack.client.status(job.id).progress.done >= 2 * batch, 60, "the first batches to be stored")
    canceled = stack.client.cancel(job.id)
    assert canceled.status is JobStatus.CANCELED and canceled.finished_at is not None
    _wait_until(lambda: f"job {job.id} shard 1/1 stopped after" in worker.log(), 30, "the worker to stop the job")

    view = stack.client.status(job.id)
    stored = len(view.outputs)
    # The batch in flight when the cancel landed is stored and listed; nothing after it.
    assert canceled.progress.done <= stored <= canceled.progress.done + batch and stored % batch == 0
    assert [o.index for o in view.outputs] == list(range(stored)) and view.progress.done == stored
    assert view.status is JobStatus.CANCELED and view.manifest_key is None and view.error is None
    assert stack.keys(f"jobs/{job.id}/") == [o.key for o in view.outputs]  # every listed object, and no manifest
    assert [stack.get(o.key)[:8] for o in view.outputs[:1]] == [b"\x89PNG\r\n\x1a\n"]
