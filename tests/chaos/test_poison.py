"""Poison messages pushed onto a queue by hand: each is dead-lettered once, with the reason and the raw body, and the
worker keeps serving.

Elements are pushed the way kombu's Redis transport stores messages: LPUSH of a JSON envelope whose ``body`` is the
base64 of Celery's ``[args, kwargs, embed]``; and, rawer, bytes that are no envelope at all.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import pytest
from api_server import publish_catalog
from invariants import wait_nothing_left
from stack import Stack, wait_until, worker_env

from producer.contract import GenerateRequest, JobStatus
from producer.core import constants

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

GOOD_JOB = {
    "kind": "generate",
    "job_id": "neverrecorded01",
    "model": "fmnist-cgan",
    "model_name": "fmnist-cgan",
    "model_version": "1",
    "items": [{"index": 1, "name": "trouser", "count": 1}],
    "seed": 1,
    "created_at": "2026-01-01T00:00:00Z",
}


def envelope(
    body: bytes,
    *,
    content_type: str = "application/json",
    task: str | None = "genq.generate",
    eta: str | None = None,
    queue: str = constants.GENERATE_QUEUE,
) -> bytes:
    """A kombu/Celery protocol 2 message as kombu's Redis transport stores it."""
    task_id = str(uuid.uuid4())
    headers: dict[str, Any] = {} if task is None else {"lang": "py", "task": task, "id": task_id, "retries": 0}
    if eta is not None:
        headers["eta"] = eta
    message = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(message).encode()


def call(*args: Any, **kwargs: Any) -> bytes:
    return envelope(json.dumps([list(args), kwargs, {}]).encode())


# (what it is, the list element, the stage that catches it, a piece of the recorded reason)
POISON = [
    ("bytes, not JSON", b"\xff\xfe\x00garbage", "transport", "JSONDecodeError"),
    ("JSON, not an envelope", b'{"hello": "world"}', "transport", "not a kombu message"),
    ("a JSON list", b"[1, 2, 3]", "transport", "not a kombu message"),
    ("pickle", envelope(b"\x80\x04\x95garbage", content_type="application/x-python-serialize"), "consumer", "pickle"),
    ("a body that is not JSON", envelope(b"{not json"), "consumer", "could not be decoded"),
    ("a body that is not [args, kwargs, embed]", envelope(b'"hello"'), "consumer", "not a task message Celery can run"),
    ("an unknown task", envelope(b"[[], {}, {}]", task="evil.task"), "consumer", "not a genq task: 'evil.task'"),
    (
        "Celery's own task",
        envelope(b"[[], {}, {}]", task="celery.backend_cleanup"),
        "consumer",
        "not a genq task: 'celery.backend_cleanup'",
    ),
    (
        "due in the year 2999",
        envelope(json.dumps([[GOOD_JOB], {}, {}]).encode(), eta="2999-01-01T00:00:00+00:00"),
        "consumer",
        "past the visibility timeout",
    ),
    ("no task header", envelope(b"[[], {}, {}]", task=None), "consumer", "no task header"),
    ("too many arguments", call(1, 2, 3, 4), "task", "TypeError"),
    ("kwargs not a mapping", envelope(b"[[], [], {}]"), "task", "keyword arguments is not a mapping"),
    ("not a GenerateJob", call({"job_id": "x", "seed": -1}), "task", "not a generate job: job_id"),
    ("a job nobody recorded", call(GOOD_JOB), "task", "no record of job neverrecorded01"),
]


def test_poison_messages_are_dead_lettered_with_the_reason_and_the_worker_keeps_serving(
    stack: Stack,
    start_worker,  # type: ignore[no-untyped-def]
) -> None:
    # A job whose shard already came back as often as allowed (its worker died each time) is dead-lettered too.
    publish_catalog(stack.redis)
    crashing = stack.client.submit(GenerateRequest(model="fmnist-cgan", label="bag", seed=9))
    stack.redis.hset(f"genq:job:{crashing.id}", "deliveries:0", 5)  # GENQ_CELERY__MAX_DELIVERIES's default

    worker = start_worker(worker_env(stack), concurrency=1)
    for _, element, _, _ in POISON:
        stack.redis.lpush(constants.GENERATE_QUEUE, element)
    good = stack.client.submit(GenerateRequest(model="fmnist-cgan", label="bag", count=2, seed=7))
    # The queue is FIFO: the good job, pushed last, runs after every poison message was dealt with.
    assert stack.client.wait(good.id, timeout=60).status is JobStatus.SUCCEEDED

    failed = stack.client.status(crashing.id)
    assert failed.status is JobStatus.FAILED and failed.error is not None and failed.error.type == "DeadLettered"
    letters = [json.loads(raw) for raw in reversed(stack.redis.lrange(constants.DEADLETTER_KEY, 0, -1))]
    assert len(letters) == len(POISON) + 1, [letter["reason"] for letter in letters]
    first, *rest = letters
    assert first["job_id"] == crashing.id and "delivered 6 times" in first["reason"] and first["stage"] == "task"
    for (what, _, stage, reason), letter in zip(POISON, rest, strict=True):
        assert (letter["stage"], reason in letter["reason"]) == (stage, True), (what, letter)
        assert letter["queue"] == constants.GENERATE_QUEUE and letter["at"], (what, letter)
        assert letter["body"] and letter["body_size"] > 0, (what, letter)
    assert rest[0]["body"] == "\\xff\\xfe\x00garbage"  # raw bytes kept; what is not UTF-8, escaped
    assert rest[-1]["job_id"] == "neverrecorded01" and "neverrecorded01" in rest[-1]["body"]

    assert stack.redis.llen(constants.GENERATE_QUEUE) == 0
    wait_nothing_left(stack.redis, [good.id, crashing.id, "neverrecorded01"])
    assert worker.proc.poll() is None and "Unrecoverable error" not in worker.log()


def test_poison_callback_messages_are_dead_lettered_not_dropped(stack: Stack, start_worker) -> None:  # type: ignore[no-untyped-def]
    start_worker(worker_env(stack), concurrency=1)  # its callbacks worker serves the callbacks queue
    before = stack.redis.llen(constants.DEADLETTER_KEY)  # the module's stack keeps the other test's letters
    task = constants.CALLBACK_TASK
    for body in ([[{"job_id": "x"}], {}, {}], [[1, 2, 3], {}, {}]):  # not an event; too many arguments
        element = envelope(json.dumps(body).encode(), task=task, queue=constants.CALLBACK_QUEUE)
        stack.redis.lpush(constants.CALLBACK_QUEUE, element)
    deadline = time.monotonic() + 60
    while stack.redis.llen(constants.DEADLETTER_KEY) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    letters = [json.loads(raw) for raw in reversed(stack.redis.lrange(constants.DEADLETTER_KEY, 0, 1))]
    assert [(letter["stage"], letter["task"]) for letter in letters] == [("task", task), ("task", task)], letters
    reasons = sorted(letter["reason"] for letter in letters)  # the callbacks worker's threads take them in any order
    assert "not a callback event" in reasons[0] and "TypeError" in reasons[1], reasons
    assert stack.redis.llen(constants.CALLBACK_QUEUE) == 0
    wait_until(lambda: stack.redis.hlen(constants.KOMBU_UNACKED_KEY) == 0, 30, "both to be acknowledged")
