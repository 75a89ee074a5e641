"""Through the HTTP API to a real worker: SSE to the end, outputs under the tenant's S3 prefix, deliveries."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from api_server import ApiServer, api_settings, make_key, session_for
from stack import Stack
from webhook_receiver import WebhookReceiver
from worker_process import WorkerProcess

from producer.api import create_app
from producer.contract import JobView, Manifest
from producer.core.callbacks.secrets import TenantSecrets
from producer.core.settings import DEV_WEBHOOK_SECRET
from producer.webhooks import WebhookVerificationError, verify

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack_api(stack: Stack) -> Iterator[ApiServer]:
    with ApiServer(create_app(api_settings(stack.redis_url, stack.bucket))) as server:
        yield server


def _events(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream response, as they arrive."""
    event, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def test_job_streams_to_its_terminal_view_with_outputs_under_the_tenant_prefix(
    stack: Stack, module_worker: WorkerProcess, stack_api: ApiServer, webhook_receiver: WebhookReceiver
) -> None:
    with session_for(stack_api, make_key(stack.redis, "acme")) as acme:
        body = {
            "model": "fmnist-cgan",
            "label": "bag",
            "count": 3,
            "seed": 5,
            "callback": {"url": webhook_receiver.url},
        }
        created = acme.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]

        views: list[JobView] = []
        with acme.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60) as stream:
            assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
            for event, data in _events(stream):
                assert event == "job"
                views.append(JobView.model_validate_json(data))
        # The stream ended by itself, after the terminal view.
        final = views[-1]
        assert final.status.value == "succeeded", final.error
        assert all(not v.status.is_terminal() for v in views[:-1])
        assert [v.progress.done for v in views] == sorted(v.progress.done for v in views)

        prefix = f"tenants/acme/jobs/{job_id}/"
        assert [o.key for o in final.outputs] == [f"{prefix}{i:05d}.png" for i in range(3)]
        assert final.manifest_key == f"{prefix}manifest.json"
        assert final.sheet_key == f"{prefix}sheet.png" and final.sheet_url and final.sheet_key in final.sheet_url
        assert stack.keys(prefix) == [o.key for o in final.outputs] + [final.manifest_key, final.sheet_key]
        assert stack.keys(f"jobs/{job_id}/") == []
        # The terminal event's outputs carry URLs, made when it was sent; every read makes its own.
        assert all(o.url and "X-Amz-Signature=" in o.url and o.key in o.url for o in final.outputs)
        unsigned = [o.model_copy(update={"url": None}) for o in final.outputs]
        assert Manifest.model_validate_json(stack.get(final.manifest_key)).outputs == unsigned
        got = JobView.model_validate(acme.get(f"/v1/jobs/{job_id}").json())
        assert [o.model_copy(update={"url": None}) for o in got.outputs] == unsigned
        no_urls = {"outputs": [], "sheet_url": None}  # URLs are made for each read
        assert got.model_copy(update=no_urls) == final.model_copy(update=no_urls)
        stripped = [
            v.model_copy(update={"outputs": [o.model_copy(update={"url": None}) for o in v.outputs], "sheet_url": None})
            for v in views
        ]
        assert all(a != b for a, b in zip(stripped, stripped[1:], strict=False))  # a fresh URL alone is no event

        deadline, attempts = time.monotonic() + 30, []
        while time.monotonic() < deadline:  # callbacks are delivered on their own queue, maybe after the stream,
            attempts = acme.get(f"/v1/jobs/{job_id}/deliveries").json()  # and in any order: each its own message
            if {"queued", "running", "succeeded"} <= {a["type"] for a in attempts}:
                break
            time.sleep(0.1)
        assert {"queued", "running", "succeeded"} <= {a["type"] for a in attempts} and all(a["ok"] for a in attempts)

    with session_for(stack_api, make_key(stack.redis, "globex")) as globex:
        assert globex.get(f"/v1/jobs/{job_id}").status_code == 404
        assert globex.get(f"/v1/jobs/{job_id}/deliveries").status_code == 404
        assert globex.get("/v1/jobs").json()["items"] == []


def test_stream_of_a_failed_job_ends_with_the_failure(
    stack: Stack, module_worker: WorkerProcess, stack_api: ApiServer
) -> None:
    with session_for(stack_api, make_key(stack.redis, "acme")) as acme:
        job_id = acme.post("/v1/jobs", json={"model": "broken-cgan", "label": 1}).json()["id"]
        with acme.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60) as stream:
            last = [data for _, data in _events(stream)][-1]
    final = JobView.model_validate_json(last)
    assert final.status.value == "failed" and final.error is not None and final.error.type == "ModelLoadError"
    assert stack.keys(f"tenants/acme/jobs/{job_id}/") == []


def test_a_tenants_callbacks_are_signed_with_its_own_secret_and_rotate_with_an_overlap(
    stack: Stack, module_worker: WorkerProcess, stack_api: ApiServer
) -> None:
    # The attack: one signing secret for all tenants let a tenant given it forge "succeeded" events to every other.
    secrets = TenantSecrets(stack.redis)
    acme_secret, globex_secret = secrets.ensure("acme-signs"), secrets.ensure("globex-signs")
    assert acme_secret is not None and globex_secret is not None
    body = {"model": "fmnist-cgan", "label": "bag", "count": 1, "seed": 9}
    with WebhookReceiver(acme_secret) as receiver, session_for(stack_api, make_key(stack.redis, "acme-signs")) as acme:
        job_id = acme.post(
            "/v1/jobs", json={**body, "callback": {"url": receiver.url, "events": ["succeeded"]}}
        ).json()["id"]
        (first,) = receiver.wait_for(1, timeout=60)
        assert first.verified, first.error  # acme's own secret
        for other in (globex_secret, DEV_WEBHOOK_SECRET):  # neither another tenant's nor the deployment's verifies it
            with pytest.raises(WebhookVerificationError):
                verify(other, first.headers, first.body)
        assert json.loads(first.body)["data"]["id"] == job_id

        rotated = acme.post("/v1/webhook-secret/rotate", json={"overlap_hours": 1})
        assert rotated.status_code == 200, rotated.text
        new_secret = rotated.json()["secret"]
        assert new_secret != acme_secret and rotated.json()["previous_valid_until"] is not None

        acme.post("/v1/jobs", json={**body, "seed": 10, "callback": {"url": receiver.url, "events": ["succeeded"]}})
        second = receiver.wait_for(2, timeout=60)[1]
        assert len(second.headers["webhook-signature"].split()) == 2  # both signatures during the overlap
        verify(acme_secret, second.headers, second.body)  # a receiver not yet switched
        verify(new_secret, second.headers, second.body)  # and one that switched
        with pytest.raises(WebhookVerificationError):
            verify(globex_secret, second.headers, second.body)
