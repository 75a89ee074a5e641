"""Callback retries through a real worker: a receiver that fails, one that is gone, and one that never recovers.

One worker with a short retry schedule and a single delivery thread, so the events of a job are delivered in the
order they were enqueued (the ``queued`` event is always handled before the job's later events).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from api_server import ApiServer, api_settings, make_key, session_for
from invariants import settle
from stack import Stack, deliveries_until, recorded, worker_env
from tiny_model import TINY_NAME
from webhook_receiver import WebhookReceiver
from worker_process import WorkerProcess

from producer.api import create_app
from producer.contract import GenerateRequest, JobStatus
from producer.core import constants
from producer.core.callbacks.events import CallbackDeadLetter

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

SCHEDULE = [0, 0.2, 0.2, 0.2]  # four attempts, 0.2 s apart


@pytest.fixture(scope="module")
def retry_worker(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    env = worker_env(
        stack,
        GENQ_WEBHOOK__RETRY_SCHEDULE_S=json.dumps(SCHEDULE),
        GENQ_WEBHOOK__JITTER="0",
        GENQ_WEBHOOK__CONCURRENCY="1",  # the callbacks worker beside it: one delivery at a time
    )
    log = tmp_path_factory.mktemp("retry-worker") / "worker.log"
    worker = WorkerProcess(env, log, queues="callbacks,generate", pool="threads", concurrency=1)
    try:
        yield worker.wait_ready()
    finally:
        worker.stop()


def _request(url: str, events: list[str] | None = None) -> GenerateRequest:
    callback: dict[str, Any] = {"url": url} if events is None else {"url": url, "events": events}
    return GenerateRequest.model_validate({"model": TINY_NAME, "label": "bag", "count": 1, "callback": callback})


def test_receiver_failing_three_times_gets_the_event_on_the_fourth_attempt_with_one_webhook_id(
    stack: Stack, retry_worker: WorkerProcess, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script([500, 500, 500], reject_unverified=True)  # then 200, only if signed and fresh
    job = stack.client.submit(_request(webhook_receiver.url, ["succeeded"]))
    assert stack.client.wait(job.id, timeout=60).status is JobStatus.SUCCEEDED

    received = webhook_receiver.wait_for(4, timeout=30)
    assert [r.status for r in received] == [500, 500, 500, 200]
    assert all(r.verified for r in received), [r.verify_error for r in received]  # signature and timestamp
    assert len({r.headers["webhook-id"] for r in received}) == 1
    assert {r.body for r in received} == {received[0].body}  # the same event, byte for byte
    assert (
        json.loads(received[-1].body)["type"] == "succeeded" and json.loads(received[-1].body)["data"]["id"] == job.id
    )
    gaps = [b.at - a.at for a, b in zip(received, received[1:], strict=False)]
    assert all(gap >= 0.15 for gap in gaps), gaps  # the schedule's 0.2 s between attempts
    timestamps = [int(r.headers["webhook-timestamp"]) for r in received]
    assert all(abs(ts - r.at) <= 2 for ts, r in zip(timestamps, received, strict=True))  # signed per attempt

    records = deliveries_until(stack, job.id, lambda rs: len(rs) >= 4)
    assert [r["attempt"] for r in records] == [1, 2, 3, 4]
    assert [r["ok"] for r in records] == [False, False, False, True]
    assert [r["status_code"] for r in records] == [500, 500, 500, 200]
    assert {r["msg_id"] for r in records} == {received[0].headers["webhook-id"]}
    assert all(r["next_retry_at"] for r in records[:3]) and records[3]["next_retry_at"] is None
    assert not any(r["dead_lettered"] for r in records)
    [settled] = settle(stack, [job.id], receiver=webhook_receiver).values()
    assert len(settled.delivered) == 1 and settled.attempts == 4  # the receiver saw each attempt the ledger did


def test_410_stops_every_later_event_of_the_job(
    stack: Stack, retry_worker: WorkerProcess, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script([], default_status=410)
    job = stack.client.submit(_request(webhook_receiver.url))  # every event: queued, running, progress, succeeded
    assert stack.client.wait(job.id, timeout=60).status is JobStatus.SUCCEEDED

    records = deliveries_until(stack, job.id, recorded("queued", "running", "succeeded"))
    # The events sent before the first 410 was recorded got 410 and no retry; every later one, the succeeded event at
    # least, was not sent. (This worker's relay has one thread: it attempts queued, running and succeeded in order.)
    sent = [r for r in records if r["sent"]]
    stopped = [r for r in records if not r["sent"]]
    assert sent and all((r["status_code"], r["next_retry_at"]) == (410, None) for r in sent)
    assert {r["type"] for r in records} >= {"queued", "running", "succeeded"}
    assert "succeeded" in {r["type"] for r in stopped} and all("410" in r["error"] for r in stopped)
    assert all(r["attempt"] == 1 for r in records)  # nothing retried
    time.sleep(0.5)  # a retry, had one been scheduled, would be due by now
    assert [r.status for r in webhook_receiver.received] == [410] * len(sent)
    events = ("queued", "running", "succeeded")
    [settled] = settle(stack, [job.id], types=events, receiver=webhook_receiver).values()
    assert not settled.delivered and not settled.dead_lettered and settled.attempts == len(sent)  # stopped by the 410
    assert stack.redis.get(constants.JOB_CALLBACK_GONE_KEY.format(job_id=job.id)) == webhook_receiver.url.encode()


def test_used_up_window_dead_letters_the_event_and_the_api_shows_it(
    stack: Stack, retry_worker: WorkerProcess, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script([], default_status=503)
    with (
        ApiServer(create_app(api_settings(stack.redis_url, stack.bucket))) as api,
        session_for(api, make_key(stack.redis, "acme")) as acme,
    ):
        body = {"model": TINY_NAME, "label": "bag", "callback": {"url": webhook_receiver.url, "events": ["succeeded"]}}
        created = acme.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        deliveries_until(stack, job_id, lambda rs: any(r["dead_lettered"] for r in rs))
        listed = acme.get(f"/v1/jobs/{job_id}/deliveries")

    assert listed.status_code == 200, listed.text
    deliveries = listed.json()
    assert [d["attempt"] for d in deliveries] == [1, 2, 3, 4]
    assert [d["dead_lettered"] for d in deliveries] == [False, False, False, True]
    assert all(d["status_code"] == 503 and not d["ok"] for d in deliveries)
    assert deliveries[-1]["next_retry_at"] is None
    assert len(webhook_receiver.received) == 4

    letters = [
        CallbackDeadLetter.model_validate_json(raw) for raw in stack.redis.lrange(constants.CALLBACK_DEAD_KEY, 0, -1)
    ]
    [letter] = [letter for letter in letters if letter.message.job_id == job_id]
    assert letter.attempts == 4 and letter.last_status_code == 503 and letter.last_error == "HTTP 503"
    assert letter.message.msg_id == deliveries[0]["msg_id"] and letter.message.event.type.value == "succeeded"
    time.sleep(0.5)
    assert len(webhook_receiver.received) == 4  # given up: no fifth attempt
    [settled] = settle(stack, [job_id], receiver=webhook_receiver).values()
    assert settled.dead_lettered == {letter.message.msg_id} and settled.attempts == 4
