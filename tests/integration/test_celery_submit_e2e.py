"""Any Celery client can enqueue: a bare ``Celery(broker=...).send_task("genq.submit", kwargs=request)`` in a process
that imports nothing of genq makes the same job as the Python client; a request genq refuses is dead-lettered with a
reason naming the field, and nothing is recorded."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest
from stack import Stack
from worker_process import WorkerProcess

from producer.contract import GenerateRequest, JobStatus
from producer.core import constants
from producer.errors import JobNotFound

pytestmark = pytest.mark.integration

# What a producer in another language does (celery-node, gocelery, or Python without genq installed): one message,
# the request's fields as keyword arguments, on the submit queue. Prints the task id and any genq module it imported.
BARE_SENDER = """
import json, sys
from celery import Celery
app = Celery(broker=sys.argv[1])
app.conf.update(task_serializer="json", accept_content=["json"])
result = app.send_task("genq.submit", kwargs=json.loads(sys.argv[2]), queue="submit")
genq = sorted(m for m in sys.modules if m.split(".")[0] in ("producer", "worker", "models"))
print(json.dumps({"task_id": result.id, "genq_modules": genq}))
"""


def _send(stack: Stack, request: dict[str, Any]) -> str:
    """Send ``request`` from a fresh interpreter (``-I``: no genq on its path from the working directory)."""
    done = subprocess.run(
        [sys.executable, "-I", "-c", BARE_SENDER, stack.redis_url, json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    answer = json.loads(done.stdout)
    assert answer["genq_modules"] == []
    return str(answer["task_id"])


def _dead_letter(stack: Stack, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for raw in stack.redis.lrange(constants.DEADLETTER_KEY, 0, -1):
            letter = json.loads(raw)
            if letter["job_id"] == job_id:
                return dict(letter)
        time.sleep(0.1)
    raise AssertionError(f"no dead letter for {job_id} within {timeout} s")


def test_a_bare_celery_client_submits_the_same_job_the_python_client_does(
    stack: Stack, module_worker: WorkerProcess
) -> None:
    request = {"model": "fmnist-cgan", "counts": {"sneaker": 2, "bag": 1}, "seed": 11, "metadata": {"sku": "B-1"}}

    job_id = _send(stack, request)  # the job's id is the task's

    view = stack.client.wait(job_id, timeout=60)
    assert view.status is JobStatus.SUCCEEDED, view.error
    assert view.id == job_id and view.metadata == {"sku": "B-1"}
    twin = stack.client.wait(stack.client.submit(GenerateRequest.model_validate(request)).id, timeout=60)
    assert [(o.label, o.seed) for o in view.outputs] == [(o.label, o.seed) for o in twin.outputs]
    assert [stack.get(o.key) for o in view.outputs] == [stack.get(o.key) for o in twin.outputs]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"model": "fmnist-cgan", "label": "sneaker", "count": 0, "seed": 1}, "count"),  # pydantic, at the edge
        ({"model": "fmnist-cgan", "label": "spaceship", "count": 1, "seed": 1}, "label"),  # against the catalogue
        ({"model": "fmnist-cgan", "label": "sneaker", "count": 1, "sede": 1}, "sede"),  # a typo: extra fields refused
    ],
    ids=["count-zero", "unknown-label", "unknown-field"],
)
def test_a_refused_request_is_dead_lettered_naming_the_field_and_nothing_is_recorded(
    stack: Stack, module_worker: WorkerProcess, request_fields: dict[str, Any], field: str
) -> None:
    job_id = _send(stack, request_fields)

    letter = _dead_letter(stack, job_id)

    assert letter["task"] == constants.SUBMIT_TASK and letter["stage"] == "task"
    assert field in letter["reason"], letter["reason"]
    with pytest.raises(JobNotFound):
        stack.client.status(job_id)
    assert stack.redis.llen(constants.SUBMIT_QUEUE) == 0
