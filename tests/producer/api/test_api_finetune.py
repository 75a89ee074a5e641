"""Fine-tuning over HTTP: data set uploads under the tenant's prefix, fine-tune jobs on the train queue."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import httpx
import pytest
import redis
from api_server import ServeApi, make_key, session_for
from shipped import CGAN_LATEST_REF

from producer.core import constants


@pytest.fixture
def acme_s3(serve_api: ServeApi, catalog: redis.Redis, s3_bucket: str) -> Iterator[httpx.Client]:
    """Tenant "acme" on an API whose bucket is a real (moto) S3 bucket; small data set limit."""
    server = serve_api(bucket=s3_bucket, max_dataset_bytes=4096)
    with session_for(server, make_key(catalog, "acme")) as session:
        yield session


def keys(bucket: str, endpoint: str, prefix: str) -> list[str]:
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_an_uploaded_archive_lands_under_the_tenants_prefix(
    acme_s3: httpx.Client, s3_bucket: str, aws_env: str
) -> None:
    response = acme_s3.post("/v1/datasets", params={"filename": "data.zip"}, content=b"PK\x03\x04 pretend zip")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["dataset"].endswith("/data.zip") and body["bytes"] == len(b"PK\x03\x04 pretend zip")
    assert keys(s3_bucket, aws_env, "") == [f"tenants/acme/datasets/{body['dataset']}"]


@pytest.mark.parametrize(
    ("params", "content", "status", "loc"),
    [
        ({"filename": "../x.zip"}, b"x", 422, ["query", "filename"]),
        ({"filename": "x.exe"}, b"x", 422, ["query", "filename"]),
        ({}, b"x", 422, ["query", "filename"]),
        ({"filename": "x.zip"}, b"", 422, ["body"]),
        ({"filename": "x.zip"}, b"x" * 5000, 413, ["body"]),
    ],
)
def test_bad_uploads_are_refused_naming_what_is_wrong(
    acme_s3: httpx.Client,
    s3_bucket: str,
    aws_env: str,
    params: dict[str, str],
    content: bytes,
    status: int,
    loc: list[str],
) -> None:
    response = acme_s3.post("/v1/datasets", params=params, content=content)
    assert response.status_code == status, response.text
    assert [d["loc"] for d in response.json()["detail"]][0][: len(loc)] == loc
    if status == 413:
        assert "GENQ_API__MAX_DATASET_BYTES" in response.json()["detail"][0]["msg"]
    assert keys(s3_bucket, aws_env, "") == []


FINETUNE: dict[str, Any] = {"base": "fmnist-cgan", "dataset": "abc123/data.zip", "name": "brand-x", "steps": 50}


def test_a_finetune_is_queued_on_the_train_queue_and_read_like_any_job(
    acme: httpx.Client, globex: httpx.Client, catalog: redis.Redis
) -> None:
    created = acme.post("/v1/finetunes", json=FINETUNE)
    assert created.status_code == 202, created.text
    view = created.json()
    assert view["kind"] == "finetune" and view["status"] == "queued" and view["tenant"] == "acme"
    assert view["model_version"] == CGAN_LATEST_REF and view["progress"] == {"done": 0, "total": 50}
    assert catalog.llen(constants.TRAIN_QUEUE) == 1 and catalog.llen(constants.GENERATE_QUEUE) == 0
    assert acme.get(f"/v1/jobs/{view['id']}").json() == view
    assert globex.get(f"/v1/jobs/{view['id']}").status_code == 404
    metrics = httpx.get(f"{str(acme.base_url).rstrip('/')}/metrics").text
    assert 'genq_queue_depth{queue="train"} 1.0' in metrics
    spec = catalog.hget(f"genq:job:{view['id']}", "spec")
    assert spec is not None and b'"dataset_key":"tenants/acme/datasets/abc123/data.zip"' in spec


def test_a_finetune_idempotency_key_replays_the_job(acme: httpx.Client, catalog: redis.Redis) -> None:
    first = acme.post("/v1/finetunes", json=FINETUNE, headers={"Idempotency-Key": "ft-1"})
    again = acme.post("/v1/finetunes", json=FINETUNE, headers={"Idempotency-Key": "ft-1"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other = acme.post("/v1/finetunes", json={**FINETUNE, "steps": 60}, headers={"Idempotency-Key": "ft-1"})
    assert other.status_code == 409
    assert catalog.llen(constants.TRAIN_QUEUE) == 1


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({**FINETUNE, "base": "nope"}, ["body", "base"]),
        ({**FINETUNE, "dataset": "../globex/x.zip"}, ["body", "dataset"]),
        ({**FINETUNE, "steps": 0}, ["body", "steps"]),
        ({**FINETUNE, "augment": {"policy": ["rotate"]}}, ["body", "augment", "policy", 0]),
        ({**FINETUNE, "callback": {"url": "http://169.254.169.254/latest"}}, ["body", "callback", "url"]),
        ({k: v for k, v in FINETUNE.items() if k != "name"}, ["body", "name"]),
        ({**FINETUNE, "metadata": {"notes": "x" * 5000}}, ["body", "metadata"]),  # GENQ_LIMITS__MAX_METADATA_BYTES
    ],
)
def test_bad_finetunes_name_the_field_and_enqueue_nothing(
    acme: httpx.Client, catalog: redis.Redis, body: dict[str, Any], loc: list[str | int]
) -> None:
    response = acme.post("/v1/finetunes", json=body)
    assert response.status_code == 422, response.text
    locs = [d["loc"] for d in response.json()["detail"]]
    assert any(found[: len(loc)] == loc for found in locs), locs
    assert catalog.llen(constants.TRAIN_QUEUE) == 0 and not catalog.keys("genq:job:*")
