"""Callbacks never cost generation, on the real stack: `genq worker` delivers them from a worker process of its own,
a receiver that trickles its answer is cut off at the attempt deadline, and one that hangs holds a few delivery
threads and its own events only — never lost: each is delivered or dead-lettered."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from invariants import settle
from stack import Stack, wait_until, worker_env
from stack_fixtures import WorkerFactory
from tarpit import Tarpit
from tiny_model import TINY_NAME
from webhook_receiver import WebhookReceiver

from producer.client import Client
from producer.contract import GenerateRequest, JobStatus
from producer.core import constants
from producer.core.callbacks.events import CallbackDeadLetter
from producer.core.settings import RedisSettings, S3Settings, WebhookSettings
from producer.settings import ClientSettings

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

NORMAL_LATENCY_S = 10.0  # a 1-image job takes well under a second here; generous for a loaded two-core machine


def _request(url: str, events: list[str] | None = None) -> GenerateRequest:
    callback: dict[str, Any] = {"url": url} if events is None else {"url": url, "events": events}
    return GenerateRequest.model_validate({"model": TINY_NAME, "label": "bag", "count": 1, "callback": callback})


def _records(stack: Stack, job_ids: list[str]) -> list[dict[str, Any]]:
    return [record for job_id in job_ids for record in stack.client.deliveries(job_id)]


def _dead_letters(stack: Stack) -> list[CallbackDeadLetter]:
    raw = stack.redis.lrange(constants.CALLBACK_DEAD_KEY, 0, -1)
    return [CallbackDeadLetter.model_validate_json(item) for item in raw]


def test_a_trickling_receiver_is_cut_off_at_the_attempt_deadline_then_retried_and_dead_lettered(
    stack: Stack, start_worker: WorkerFactory
) -> None:
    env = worker_env(
        stack,
        GENQ_WEBHOOK__ATTEMPT_DEADLINE_S="1.5",
        GENQ_WEBHOOK__TIMEOUT_S="10",  # each byte comes in 0.5 s: the per-read timeout alone would wait ~20 s
        GENQ_WEBHOOK__RETRY_SCHEDULE_S="[0, 0.3]",
        GENQ_WEBHOOK__JITTER="0",
    )
    start_worker(env)
    with Tarpit(interval_s=0.5) as tarpit:
        job = stack.client.submit(_request(tarpit.url, ["succeeded"]))
        assert stack.client.wait(job.id, timeout=60).status is JobStatus.SUCCEEDED
        wait_until(lambda: any(r["dead_lettered"] for r in _records(stack, [job.id])), 30, "the dead letter")
        records = stack.client.deliveries(job.id)

    assert [r["attempt"] for r in records] == [1, 2]
    for record in records:
        assert record["sent"] and not record["ok"] and record["status_code"] is None
        assert record["error"].startswith("no answer within the attempt deadline of 1.5 s"), record["error"]
        assert 1400 <= record["duration_ms"] < 4000, record["duration_ms"]
    assert tarpit.accepted == 2  # one connection per attempt, each given up
    [letter] = [letter for letter in _dead_letters(stack) if letter.message.job_id == job.id]
    assert letter.attempts == 2 and letter.message.msg_id == records[0]["msg_id"]
    [settled] = settle(stack, [job.id]).values()  # dead-lettered, not lost; nothing left waiting anywhere
    assert settled.dead_lettered == {letter.message.msg_id} and settled.attempts == tarpit.accepted


def test_while_a_hanging_receiver_holds_its_events_other_jobs_and_their_events_keep_normal_latency(
    stack: Stack, start_worker: WorkerFactory, webhook_receiver: WebhookReceiver
) -> None:
    # The hanging receiver is another host (127.0.0.2) than the healthy one (127.0.0.1): slots are per host.
    allow = json.dumps(["127.0.0.0/8"])
    env = worker_env(
        stack,
        GENQ_WEBHOOK__ALLOW_HOSTS=allow,
        GENQ_WEBHOOK__ATTEMPT_DEADLINE_S="2",
        GENQ_WEBHOOK__TIMEOUT_S="10",
        GENQ_WEBHOOK__MAX_IN_FLIGHT_PER_HOST="2",
        GENQ_WEBHOOK__RETRY_SCHEDULE_S="[0, 0.5]",
        GENQ_WEBHOOK__JITTER="0",
    )
    start_worker(env, concurrency=2)
    client = Client(
        ClientSettings(
            redis=RedisSettings(url=stack.redis_url),
            s3=S3Settings(bucket=stack.bucket),
            webhook=WebhookSettings(allow_hosts=["127.0.0.0/8"]),
        )
    )
    healthy: list[str] = []
    with Tarpit(interval_s=0.5, host="127.0.0.2") as tarpit:
        hung = [client.submit(_request(tarpit.url, ["succeeded"])).id for _ in range(6)]
        tarpit.wait_open(2, timeout=60)  # its two slots taken: the other four events wait their turn

        for _ in range(4):  # another tenant's 1-image jobs, one after another, with a healthy receiver
            submitted = time.monotonic()
            job = client.submit(_request(webhook_receiver.url, ["succeeded"]))
            healthy.append(job.id)
            assert client.wait(job.id, timeout=60).status is JobStatus.SUCCEEDED
            wait_until(
                lambda job_id=job.id: any(r.json()["data"]["id"] == job_id for r in webhook_receiver.received),
                NORMAL_LATENCY_S,
                "the healthy receiver's event",
            )
            assert time.monotonic() - submitted < NORMAL_LATENCY_S

        def settled() -> bool:
            return sum(r["dead_lettered"] for r in _records(stack, hung)) == len(hung)

        wait_until(settled, 60, "every event of the hanging receiver to be dead-lettered")
        assert tarpit.peak_open <= 2  # never more than its slots at once
        assert tarpit.accepted == 2 * len(hung)  # two attempts each: none skipped, none lost
    letters = {letter.message.job_id for letter in _dead_letters(stack)}
    assert letters >= set(hung)
    assert all(r.verified and r.status == 200 for r in webhook_receiver.received)
    # Every event ended once, none lost: the hanging receiver's, dead-lettered after as many attempts as it saw
    # connections; the healthy one's, delivered once each, as its own count says.
    hanging = settle(stack, hung).values()
    assert all(len(s.dead_lettered) == 1 for s in hanging)
    assert sum(s.attempts for s in hanging) == tarpit.accepted
    delivered = settle(stack, healthy, receiver=webhook_receiver).values()
    assert all(len(s.delivered) == 1 and s.attempts == 1 for s in delivered)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_genq_worker_delivers_callbacks_from_a_worker_of_its_own_restarted_if_it_dies_and_gone_with_it(
    stack: Stack, start_worker: WorkerFactory, webhook_receiver: WebhookReceiver
) -> None:
    worker = start_worker(worker_env(stack))
    wait_until(lambda: "worker ready: callbacks only" in worker.log(), 60, "the callbacks worker")
    [first] = worker.children()
    argv = Path(f"/proc/{first}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"-Q") + 1] == constants.CALLBACK_QUEUE.encode()
    assert os.getpriority(os.PRIO_PROCESS, first) > os.getpriority(os.PRIO_PROCESS, worker.pid)  # yields the CPU

    os.kill(first, signal.SIGKILL)  # the callbacks worker alone dies: the generation worker starts another
    wait_until(lambda: worker.children() not in ([], [first]), 30, "a new callbacks worker")
    [child] = worker.children()
    wait_until(lambda: worker.log().count("worker ready: callbacks only") == 2, 60, "it to be ready")
    assert "the callbacks worker exited with -9; starting it again" in worker.log()

    job = stack.client.submit(_request(webhook_receiver.url, ["succeeded"]))
    assert stack.client.wait(job.id, timeout=60).status is JobStatus.SUCCEEDED
    [received] = webhook_receiver.wait_for(1, timeout=30)
    assert received.verified and received.json()["data"]["id"] == job.id
    [settled] = settle(stack, [job.id], receiver=webhook_receiver).values()
    assert len(settled.delivered) == 1  # delivered once by the restarted callbacks worker, none lost

    os.kill(worker.pid, signal.SIGKILL)  # the generation worker alone, as an out-of-memory kill would
    wait_until(lambda: not _alive(child), 20, "the orphaned callbacks worker to stop")
