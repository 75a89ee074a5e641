"""Canceling jobs run by a real worker: a queued job never starts; a running one stops after its current batch and
lists exactly what it stored; the cancel reaches a real receiver as a signed ``canceled`` event."""

from __future__ import annotations

import json
import re
import time

import pytest
from api_server import publish_catalog
from stack import Stack, wait_until, worker_env
from webhook_receiver import WebhookReceiver

from producer.contract import Callback, EventType, GenerateRequest, JobStatus

pytestmark = pytest.mark.integration


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
    wait_until(lambda: stack.client.status(job.id).progress.done >= 2 * batch, 60, "the first batches to be stored")
    canceled = stack.client.cancel(job.id)
    assert canceled.status is JobStatus.CANCELED and canceled.finished_at is not None
    wait_until(lambda: f"job {job.id} shard 1/1 stopped after" in worker.log(), 30, "the worker to stop the job")

    view = stack.client.status(job.id)
    stored = len(view.outputs)
    # The batch in flight when the cancel landed is stored and listed; nothing after it.
    assert canceled.progress.done <= stored <= canceled.progress.done + batch and stored % batch == 0
    assert [o.index for o in view.outputs] == list(range(stored)) and view.progress.done == stored
    assert view.status is JobStatus.CANCELED and view.manifest_key is None and view.error is None
    assert stack.keys(f"jobs/{job.id}/") == [o.key for o in view.outputs]  # every listed object, and no manifest
    assert [stack.get(o.key)[:8] for o in view.outputs[:1]] == [b"\x89PNG\r\n\x1a\n"]


def test_a_canceled_job_is_announced_by_a_signed_canceled_event_with_one_webhook_id(  # type: ignore[no-untyped-def]
    stack: Stack, start_worker, webhook_receiver: WebhookReceiver
) -> None:
    publish_catalog(stack.redis)  # no worker yet: the job stays queued until it is canceled
    webhook_receiver.script([500], reject_unverified=True)  # the first attempt fails; then 200 if signed and fresh
    callback = Callback(url=webhook_receiver.url, events={EventType.CANCELED})  # type: ignore[arg-type]
    job = stack.client.submit(GenerateRequest(model="fmnist-cgan", label="bag", count=4, seed=1, callback=callback))
    canceled = stack.client.cancel(job.id)
    start_worker(worker_env(stack, GENQ_WEBHOOK__RETRY_SCHEDULE_S="[0, 0.2]", GENQ_WEBHOOK__JITTER="0"), concurrency=1)

    first, retried = webhook_receiver.wait_for(2, timeout=60)
    assert [first.status, retried.status] == [500, 200]
    assert first.verified and retried.verified, [first.verify_error, retried.verify_error]
    webhook_id = first.headers["webhook-id"]
    assert re.fullmatch(r"msg_[0-9a-f]{32}", webhook_id) and retried.headers["webhook-id"] == webhook_id
    assert retried.body == first.body  # the same event, byte for byte; only timestamp and signature are fresh
    event = retried.json()
    assert event["type"] == "canceled"
    assert event["data"]["id"] == job.id and event["data"]["status"] == "canceled"
    assert event["data"]["finished_at"] == json.loads(canceled.model_dump_json())["finished_at"]
    assert event["data"]["started_at"] is None and event["data"]["outputs"] == []

    wait_until(lambda: len(stack.client.deliveries(job.id)) >= 2, 10, "the second attempt to be recorded")
    records = stack.client.deliveries(job.id)
    assert [(r["type"], r["attempt"], r["status_code"], r["ok"]) for r in records] == [
        ("canceled", 1, 500, False),
        ("canceled", 2, 200, True),
    ]
    assert {r["msg_id"] for r in records} == {webhook_id}
    time.sleep(0.5)  # a further attempt or another event (the filter asks for "canceled" only) would be here by now
    assert len(webhook_receiver.received) == 2
