"""A tenant's outputs over HTTP, through the real stack: the API, a real `genq worker`, Redis and a moto S3 server
reached over HTTP. The bytes are fetched by a plain HTTP client holding neither the API key nor AWS credentials."""

from __future__ import annotations

import hashlib
import io
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_server import ApiServer, api_settings, make_key, session_for
from stack import Stack
from worker_process import WorkerProcess

from producer.api import create_app
from producer.contract import Manifest, OutputRef
from producer.core.settings import S3Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack_api(stack: Stack) -> Iterator[ApiServer]:
    with ApiServer(create_app(api_settings(stack.redis_url, stack.bucket))) as server:
        yield server


@pytest.fixture
def plain() -> Iterator[httpx.Client]:
    """What a tenant's browser or backend fetches a URL with: no API key, no AWS credentials, no redirects."""
    with httpx.Client(timeout=10) as client:
        yield client


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _finished(session: httpx.Client, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    created = session.post("/v1/jobs", json=body)
    assert created.status_code == 202, created.text
    deadline = time.monotonic() + timeout
    while True:
        view: dict[str, Any] = session.get(f"/v1/jobs/{created.json()['id']}").json()
        if view["status"] in ("succeeded", "failed", "canceled"):
            assert view["status"] == "succeeded", view["error"]
            return view
        assert time.monotonic() < deadline, f"job still {view['status']} after {timeout} s"
        time.sleep(0.1)


def test_a_tenant_gets_the_exact_bytes_through_the_redirect_and_the_view_url_and_another_tenant_gets_404(
    stack: Stack, module_worker: WorkerProcess, stack_api: ApiServer, plain: httpx.Client
) -> None:
    with session_for(stack_api, make_key(stack.redis, "acme")) as acme:
        view = _finished(acme, {"model": "fmnist-cgan", "label": "bag", "count": 3, "seed": 11})
        job_id = view["id"]
        assert [o["index"] for o in view["outputs"]] == [0, 1, 2]
        for output in view["outputs"]:
            redirect = acme.get(f"/v1/jobs/{job_id}/outputs/{output['index']}")
            assert redirect.status_code == 307, redirect.text
            location = redirect.headers["location"]
            assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in location and "X-Amz-Signature=" in location
            assert redirect.headers["cache-control"] == "private, no-store"
            fetched = plain.get(location)
            assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
            assert _sha256(fetched.content) == output["sha256"]  # the very bytes the view vouches for
            assert fetched.content == stack.get(output["key"])
            by_view = plain.get(output["url"])  # the view's own URL fetches the same
            assert by_view.status_code == 200 and by_view.content == fetched.content

        # Followed as HTTP clients follow it: the API key is not sent on to the storage host (another origin).
        followed = acme.get(f"/v1/jobs/{job_id}/outputs/2", follow_redirects=True)
        assert followed.status_code == 200 and _sha256(followed.content) == view["outputs"][2]["sha256"]
        assert "authorization" not in followed.request.headers

        manifest = acme.get(f"/v1/jobs/{job_id}/manifest")
        assert manifest.status_code == 307
        listed = Manifest.model_validate_json(plain.get(manifest.headers["location"]).content).outputs
        assert listed == [OutputRef.model_validate({**o, "url": None}) for o in view["outputs"]]

        sheet = acme.get(f"/v1/jobs/{job_id}/sheet")  # the contact sheet, beside the manifest
        assert sheet.status_code == 307 and sheet.headers["cache-control"] == "private, no-store"
        fetched_sheet = plain.get(sheet.headers["location"])
        assert fetched_sheet.status_code == 200 and fetched_sheet.content == stack.get(view["sheet_key"])
        assert plain.get(view["sheet_url"]).content == fetched_sheet.content

        again = acme.get(f"/v1/jobs/{job_id}").json()  # URLs are made for each read; the rest is the same view
        assert [{**o, "url": None} for o in again["outputs"]] == [{**o, "url": None} for o in view["outputs"]]

    unknown_id = "e" * 32
    with session_for(stack_api, make_key(stack.redis, "globex")) as globex:
        for path in ("/outputs/0", "/outputs/2", "/manifest", "/sheet"):
            foreign, unknown = globex.get(f"/v1/jobs/{job_id}{path}"), globex.get(f"/v1/jobs/{unknown_id}{path}")
            assert foreign.status_code == 404 and "location" not in foreign.headers
            assert foreign.text == unknown.text.replace(unknown_id, job_id)


def test_a_one_image_job_stores_its_image_alone_and_its_manifest_comes_from_its_record(
    stack: Stack, module_worker: WorkerProcess, stack_api: ApiServer, tmp_path: Path
) -> None:
    with session_for(stack_api, make_key(stack.redis, "acme")) as acme:
        view = _finished(acme, {"model": "fmnist-cgan", "label": "sneaker", "seed": 5})
        job_id = view["id"]
        [output] = view["outputs"]
        assert view["manifest_key"] is None and view["sheet_key"] is None and view["format"] == "png"
        assert stack.keys(f"tenants/acme/jobs/{job_id}/") == [output["key"]]  # one PUT: no manifest, no sheet

        answered = acme.get(f"/v1/jobs/{job_id}/manifest")
        assert answered.status_code == 200, answered.text
        assert answered.headers["content-type"] == "application/json"
        assert answered.headers["cache-control"] == "private, no-store"
        manifest = Manifest.model_validate_json(answered.content)
        assert manifest.job_id == job_id and manifest.model_version == view["model_version"]
        assert manifest.seed == 5 and manifest.format == "png" and manifest.sheet_key is None
        assert manifest.outputs == [OutputRef.model_validate({**output, "url": None})]
        assert hashlib.sha256(stack.get(output["key"])).hexdigest() == manifest.outputs[0].sha256
        with session_for(stack_api, make_key(stack.redis, "globex")) as globex:  # another tenant: an unknown job
            assert globex.get(f"/v1/jobs/{job_id}/manifest").status_code == 404

    # The Python client: the same manifest, and a download that writes it beside the image and checks its sha256.
    record = stack.client.status(job_id)
    assert stack.client.manifest(record) == manifest
    files = stack.client.download(record, tmp_path)
    assert sorted(p.name for p in files) == ["00000.png", "manifest.json"]
    assert (tmp_path / "manifest.json").read_bytes() == answered.content
    assert (tmp_path / "00000.png").read_bytes() == stack.get(output["key"])


def test_webdataset_output_redirects_to_its_tar_and_names_the_member(
    stack: Stack, module_worker: WorkerProcess, stack_api: ApiServer, plain: httpx.Client
) -> None:
    with session_for(stack_api, make_key(stack.redis, "acme")) as acme:
        body = {"model": "fmnist-cgan", "label": "sneaker", "count": 3, "seed": 12, "output": "webdataset"}
        view = _finished(acme, body)
        tar_key = f"tenants/acme/jobs/{view['id']}/shard-00000.tar"
        assert {o["key"] for o in view["outputs"]} == {tar_key}
        assert len({o["url"] for o in view["outputs"]}) == 1  # one tar, one URL
        for output in view["outputs"]:
            redirect = acme.get(f"/v1/jobs/{view['id']}/outputs/{output['index']}")
            assert redirect.status_code == 307 and redirect.headers["genq-member"] == output["member"]
            shard = plain.get(redirect.headers["location"])
            assert shard.status_code == 200
            with tarfile.open(fileobj=io.BytesIO(shard.content)) as tar:
                member = tar.extractfile(redirect.headers["genq-member"])
                assert member is not None and _sha256(member.read()) == output["sha256"]


def test_public_base_url_serves_outputs_at_base_slash_key(
    stack: Stack, module_worker: WorkerProcess, plain: httpx.Client
) -> None:
    # moto, path-style, stands in for a CDN in front of the bucket: objects made public-read play its origin access.
    base = f"{stack.s3_endpoint}/{stack.bucket}"
    settings = api_settings(stack.redis_url, stack.bucket)
    settings.s3 = S3Settings(bucket=stack.bucket, public_base_url=base + "/")
    with ApiServer(create_app(settings)) as server, session_for(server, make_key(stack.redis, "acme")) as acme:
        view = _finished(acme, {"model": "fmnist-cgan", "label": "coat", "count": 2, "seed": 13})
        assert [o["url"] for o in view["outputs"]] == [f"{base}/{o['key']}" for o in view["outputs"]]
        redirect = acme.get(f"/v1/jobs/{view['id']}/outputs/1")
        assert redirect.status_code == 307 and redirect.headers["location"] == view["outputs"][1]["url"]
        assert "X-Amz-" not in redirect.headers["location"]
        manifest = acme.get(f"/v1/jobs/{view['id']}/manifest").headers["location"]
        assert manifest == f"{base}/{view['manifest_key']}"

        s3 = stack.s3()
        for output in view["outputs"]:
            assert plain.get(output["url"]).status_code == 403  # private: the CDN's access, not the URL, opens it
            s3.put_object_acl(Bucket=stack.bucket, Key=output["key"], ACL="public-read")
            fetched = plain.get(output["url"])
            assert fetched.status_code == 200 and _sha256(fetched.content) == output["sha256"]
