"""Dynamic batching through a real worker: batched and unbatched outputs are byte-identical, and one poisoned job
inside a shared forward pass fails alone while the others succeed."""

from __future__ import annotations

import uuid

import pytest
from shipped import CGAN_LATEST
from stack import Stack, worker_env

from producer.contract import GenerateJob, GenerateRequest, JobStatus, LabelCount
from producer.core.clock import utcnow
from producer.core.messages import job_messages

pytestmark = pytest.mark.integration


def test_batched_and_unbatched_outputs_are_byte_identical(stack: Stack, start_worker) -> None:  # type: ignore[no-untyped-def]
    request = GenerateRequest(model="fmnist-cgan", counts={"bag": 6, "sneaker": 10}, seed=77)
    digests = []
    for max_batch in ("64", "1"):
        worker = start_worker(worker_env(stack, GENQ_BATCHING__MAX_BATCH=max_batch), concurrency=1)
        job = stack.client.submit(request)
        view = stack.client.wait(job.id, timeout=60)
        assert view.status is JobStatus.SUCCEEDED, view.error
        digests.append([o.sha256 for o in view.outputs])
        worker.stop()
    assert len(digests[0]) == 16 and digests[0] == digests[1]


def test_a_worker_runs_its_forward_passes_as_its_inference_settings_say(stack: Stack, start_worker) -> None:  # type: ignore[no-untyped-def]
    request = GenerateRequest(model="fmnist-cgan", counts={"bag": 6, "sneaker": 10}, seed=77)
    digests = []
    for bf16 in ("false", "true"):
        env = worker_env(stack, GENQ_INFERENCE__BF16=bf16, GENQ_INFERENCE__CHANNELS_LAST=bf16)
        worker = start_worker(env, concurrency=1)
        view = stack.client.wait(stack.client.submit(request).id, timeout=60)
        assert view.status is JobStatus.SUCCEEDED, view.error
        digests.append([o.sha256 for o in view.outputs])
        worker.stop()
    assert len(digests[1]) == 16 and digests[0] != digests[1]  # bfloat16 reached the generator: other bytes


def test_a_poisoned_job_in_a_shared_forward_pass_fails_alone(stack: Stack, start_worker) -> None:  # type: ignore[no-untyped-def]
    # A long wait gathers the jobs' samples into one forward pass; the poisoned one makes that pass raise.
    worker = start_worker(
        worker_env(stack, GENQ_BATCHING__MAX_WAIT_MS="400", GENQ_BATCHING__MAX_BATCH="64"), concurrency=12
    )
    # Label 12 of a 10-class model: the client would refuse it, so the message is crafted by hand, as a buggy or
    # hostile producer could.
    poisoned = GenerateJob(
        job_id=uuid.uuid4().hex,
        model="fmnist-cgan",
        model_name="fmnist-cgan",
        model_version=CGAN_LATEST,  # latest, the good jobs' version: only then can they share its forward pass
        items=[LabelCount(index=12, name="not-a-class", count=1)],
        seed=1,
        created_at=utcnow(),
    )
    stack.client.store.create(poisoned)
    good = [stack.client.submit(GenerateRequest(model="fmnist-cgan", label=i % 10, count=1, seed=i)) for i in range(5)]
    (message,) = job_messages(poisoned, shard_size=1)
    celery = stack.client._celery_app()  # noqa: SLF001 - the test plays a producer that skipped validation
    celery.send_task(message.task, args=message.args, queue=message.queue, task_id=message.task_id)
    good += [stack.client.submit(GenerateRequest(model="fmnist-cgan", label=i % 10, count=1, seed=i)) for i in range(5)]

    failed = stack.client.wait(poisoned.job_id, timeout=60)
    assert failed.status is JobStatus.FAILED and failed.error is not None
    assert "label index 12 out of range" in failed.error.message
    for job in good:
        view = stack.client.wait(job.id, timeout=60)
        assert view.status is JobStatus.SUCCEEDED and len(view.outputs) == 1, view.error
    assert "bisecting" in worker.log()  # the poisoned sample did share a forward pass with others


def test_concurrent_jobs_on_a_threads_worker_never_throw_an_s3_connection_away(stack: Stack, start_worker) -> None:  # type: ignore[no-untyped-def]
    # A long wait gathers 12 jobs into each forward pass; then their 12 task threads store a WebDataset shard and a
    # manifest each, all at once: a pool sized for the 2 upload threads alone discards connections at every burst
    # (urllib3: "Connection pool is full").
    env = worker_env(stack, GENQ_BATCHING__UPLOAD_WORKERS="2", GENQ_BATCHING__MAX_WAIT_MS="300")
    worker = start_worker(env, concurrency=12)
    assert "S3 client: up to 18 connections (2 upload threads, 12 task threads)" in worker.log()

    request = GenerateRequest(model="fmnist-cgan", label=1, output="webdataset")
    jobs = [stack.client.submit(request.model_copy(update={"seed": i})) for i in range(60)]
    for job in jobs:
        view = stack.client.wait(job.id, timeout=60)
        assert view.status is JobStatus.SUCCEEDED, view.error
    assert "Connection pool is full" not in worker.log()
