"""A generate job from the Python client through Redis, a real worker process and real S3, with signed callbacks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from shipped import CGAN_LATEST_REF
from stack import Stack
from webhook_receiver import Received, WebhookReceiver
from worker_process import WorkerProcess

from producer.contract import EventType, GenerateRequest, JobStatus, Manifest, WebhookEvent
from producer.core import constants
from producer.core.settings import DEV_WEBHOOK_SECRET
from producer.errors import InvalidJob

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver(secret=DEV_WEBHOOK_SECRET) as r:
        yield r


def _callbacks_until(receiver: WebhookReceiver, job_id: str, final: str, timeout: float = 30) -> list[Received]:
    """The callbacks received for ``job_id`` once one of type ``final`` has arrived, and every event made before it
    (delivery order may vary: each event is its own message; ``seq`` numbers them 1, 2, ...)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = [r for r in receiver.received if json.loads(r.body)["data"]["id"] == job_id]
        bodies = [json.loads(r.body) for r in mine]
        last = [b["seq"] for b in bodies if b["type"] == final]
        if last and {b["seq"] for b in bodies} >= set(range(1, last[0] + 1)):
            return mine
        time.sleep(0.05)
    raise TimeoutError(f"no {final!r} callback for job {job_id} within {timeout} s")


def test_generate_job_stores_pngs_and_manifest_and_sends_signed_callbacks(
    stack: Stack, module_worker: WorkerProcess, receiver: WebhookReceiver
) -> None:
    request = GenerateRequest(
        model="fmnist-cgan",
        label="sneaker",
        count=8,
        seed=42,
        callback={"url": receiver.url},
        metadata={"sku": "SNK-1"},
    )  # type: ignore[arg-type]
    queued = stack.client.submit(request)
    assert queued.status is JobStatus.QUEUED and queued.progress.total == 8

    view = stack.client.wait(queued.id, timeout=60)
    assert view.status is JobStatus.SUCCEEDED, view.error
    assert view.progress.done == view.progress.total == 8
    assert view.model_version == CGAN_LATEST_REF and view.seed == 42 and view.metadata == {"sku": "SNK-1"}

    prefix = f"jobs/{queued.id}/"
    keys = stack.keys(prefix)
    assert keys == [f"{prefix}{i:05d}.png" for i in range(8)] + [f"{prefix}manifest.json", f"{prefix}sheet.png"]
    manifest = Manifest.model_validate_json(stack.get(f"{prefix}manifest.json"))
    assert manifest.outputs == view.outputs
    for output in manifest.outputs:
        data = stack.get(output.key)
        assert hashlib.sha256(data).hexdigest() == output.sha256
        image = Image.open(io.BytesIO(data))
        assert image.size == (28, 28) and image.mode == "L"
        assert image.text["genq:label"] == "sneaker" == output.label  # type: ignore[attr-defined]
        assert image.text["genq:seed"] == str(output.seed)  # type: ignore[attr-defined]
    assert len({o.seed for o in manifest.outputs}) == 8

    mine = _callbacks_until(receiver, queued.id, "succeeded")
    assert all(r.verified for r in mine), [r.verify_error for r in mine]
    events = [WebhookEvent.model_validate_json(r.body) for r in mine]
    types = [e.type for e in sorted(events, key=lambda e: e.seq or 0)]
    assert types[0] is EventType.QUEUED and types[1] is EventType.RUNNING and types[-1] is EventType.SUCCEEDED
    final = next(e for e in events if e.type is EventType.SUCCEEDED)
    assert [o.key for o in final.data.outputs] == keys[:-2]
    assert final.data.sheet_key == f"{prefix}sheet.png" == view.sheet_key  # the succeeded callback names the sheet
    assert len({r.headers["webhook-id"] for r in mine}) == len(mine)  # one id per event

    assert f"[{queued.id}]" in module_worker.log()  # the worker's log lines of this job carry its id
    attempts = stack.client.deliveries(queued.id)
    assert {a["type"] for a in attempts} >= {"queued", "running", "succeeded"} and all(a["ok"] for a in attempts)


def test_same_seed_twice_gives_byte_identical_objects(stack: Stack, module_worker: WorkerProcess) -> None:
    request = GenerateRequest(model="fmnist-cgan", counts={"bag": 3, "0": 2}, seed=7)  # type: ignore[arg-type]
    first = stack.client.wait(stack.client.submit(request).id, timeout=60)
    second = stack.client.wait(stack.client.submit(request).id, timeout=60)
    assert first.status is second.status is JobStatus.SUCCEEDED
    assert [o.label for o in first.outputs] == ["bag"] * 3 + ["tshirt"] * 2
    assert [stack.get(o.key) for o in first.outputs] == [stack.get(o.key) for o in second.outputs]
    assert first.id != second.id


def test_download_writes_outputs_and_manifest(stack: Stack, module_worker: WorkerProcess, tmp_path: Path) -> None:
    view = stack.client.wait(stack.client.submit(GenerateRequest(model="fmnist-cgan", label=1, count=3)).id, 60)
    paths = stack.client.download(view, tmp_path)
    assert sorted(p.name for p in paths) == ["00000.png", "00001.png", "00002.png", "manifest.json", "sheet.png"]
    urls = stack.client.with_urls(view).outputs
    assert all(o.url and o.key in o.url for o in urls)
    # SigV4, as every region accepts (the client builds its S3 client where the workers do); not legacy SigV2
    assert all(
        "X-Amz-Algorithm=AWS4-HMAC-SHA256" in (o.url or "") and "AWSAccessKeyId" not in (o.url or "") for o in urls
    )


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"model": "fmnist-cgan", "label": "hat"}, "label"),
        ({"model": "fmnist-cgan", "label": 10}, "label"),
        ({"model": "shoe-gan", "label": 1}, "model"),
        ({"model": "fmnist-cgan", "label": 1, "count": 100_000}, "count"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_enqueued(
    stack: Stack, module_worker: WorkerProcess, fields: dict[str, object], field: str
) -> None:
    jobs_before = len(stack.redis.keys("genq:job:*"))
    with pytest.raises(InvalidJob) as info:
        stack.client.submit(GenerateRequest.model_validate(fields))
    assert info.value.field == field
    assert sum(stack.redis.llen(queue) for queue in constants.GENERATE_QUEUES.values()) == 0
    assert len(stack.redis.keys("genq:job:*")) == jobs_before


def test_model_that_fails_to_load_fails_the_job_with_the_reason(stack: Stack, module_worker: WorkerProcess) -> None:
    view = stack.client.wait(stack.client.submit(GenerateRequest(model="broken-cgan", label=1)).id, timeout=60)
    assert view.status is JobStatus.FAILED
    assert view.error is not None and view.error.type == "ModelLoadError"
    assert "broken-cgan@1 failed to load" in view.error.message
    assert view.outputs == [] and stack.keys(f"jobs/{view.id}/") == []


def test_idempotency_key_returns_the_same_job(stack: Stack, module_worker: WorkerProcess) -> None:
    request = GenerateRequest(model="fmnist-cgan", label=2, idempotency_key="order-77")
    first, again = stack.client.submit(request), stack.client.submit(request)
    assert again.id == first.id
    from producer.errors import IdempotencyConflict

    with pytest.raises(IdempotencyConflict):
        stack.client.submit(request.model_copy(update={"count": 2}))


def test_cli_generate_waits_with_progress_and_downloads(
    stack: Stack, module_worker: WorkerProcess, tmp_path: Path
) -> None:
    env = {**os.environ, "GENQ_REDIS__URL": stack.redis_url, "GENQ_S3__BUCKET": stack.bucket}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "producer.cli",
            "generate",
            "--model",
            "fmnist-cgan",
            "--label",
            "sneaker",
            "--count",
            "4",
            "--seed",
            "42",
            "--wait",
            "--json",  # the whole view; without it, one summary line
            "--download",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    assert view["status"] == "succeeded" and len(view["outputs"]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i:05d}.png" for i in range(4)] + [
        "manifest.json",
        "sheet.png",
    ]


def test_webdataset_job_stores_one_tar_and_downloads_verified(
    stack: Stack, module_worker: WorkerProcess, tmp_path: Path
) -> None:
    request = GenerateRequest(model="fmnist-cgan", counts={"sneaker": 20, "bag": 10}, seed=11, output="webdataset")
    view = stack.client.wait(stack.client.submit(request).id, timeout=60)
    assert view.status is JobStatus.SUCCEEDED, view.error
    prefix = f"jobs/{view.id}/"
    assert stack.keys(prefix) == [f"{prefix}manifest.json", f"{prefix}shard-00000.tar", f"{prefix}sheet.png"]
    assert {o.key for o in view.outputs} == {f"{prefix}shard-00000.tar"} and len(view.outputs) == 30
    paths = stack.client.download(view, tmp_path)
    assert sorted(p.name for p in paths) == ["manifest.json", "shard-00000.tar", "sheet.png"]
    objects = stack.client.wait(stack.client.submit(request.model_copy(update={"output": "objects"})).id, 60)
    assert [o.sha256 for o in objects.outputs] == [o.sha256 for o in view.outputs]
