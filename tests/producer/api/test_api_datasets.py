"""Data set uploads are metered per key (bytes stored at once) and expire: expired uploads are deleted from S3 and
their bytes given back when the key next uploads or lists. Real Redis, real (moto) S3, the API on uvicorn."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import boto3
import httpx
import pytest
import redis
from api_server import ApiServer, ServeApi, make_key, session_for

from producer.api.auth import key_id
from producer.core import constants


@pytest.fixture
def server(serve_api: ServeApi, catalog: redis.Redis, s3_bucket: str) -> ApiServer:
    """Uploads up to 4 kB each; 3,000 bytes per key unless the key says otherwise."""
    return serve_api(bucket=s3_bucket, max_dataset_bytes=4096, dataset_bytes=3000)


@pytest.fixture
def acme_key(catalog: redis.Redis) -> str:
    return make_key(catalog, "acme")


@pytest.fixture
def acme(server: ApiServer, acme_key: str) -> Iterator[httpx.Client]:
    with session_for(server, acme_key) as session:
        yield session


@pytest.fixture
def globex(server: ApiServer, catalog: redis.Redis) -> Iterator[httpx.Client]:
    with session_for(server, make_key(catalog, "globex")) as session:
        yield session


def stored(bucket: str, endpoint: str, tenant: str) -> list[str]:
    """The data set references stored in S3 for ``tenant``."""
    prefix = f"tenants/{tenant}/datasets/"
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"].removeprefix(prefix) for o in listing.get("Contents", []))


def upload(session: httpx.Client, size: int) -> httpx.Response:
    return session.post("/v1/datasets", params={"filename": "data.zip"}, content=b"x" * size)


def expire(client: redis.Redis, secret: str, reference: str) -> None:
    """Move an upload's expiry into the past, as if GENQ_API__DATASET_TTL_S had passed since it was made."""
    client.zadd(constants.API_KEY_DATASETS_KEY.format(key_id=key_id(secret)), {reference: time.time() - 1}, xx=True)


def test_an_upload_past_the_keys_quota_is_refused_and_nothing_is_stored(
    acme: httpx.Client, s3_bucket: str, aws_env: str
) -> None:
    first = upload(acme, 2000)
    assert first.status_code == 201, first.text
    assert first.json()["expires_at"]

    refused = upload(acme, 1500)
    assert refused.status_code == 429, refused.text
    detail = refused.json()["detail"][0]
    assert detail["loc"] == ["quota", "dataset_bytes"]
    assert "1,000 of the key's 3,000" in detail["msg"]
    assert int(refused.headers["Retry-After"]) > 3600  # when the first upload expires (7 days by default)
    assert stored(s3_bucket, aws_env, "acme") == [first.json()["dataset"]]
    tagging = boto3.client("s3", endpoint_url=aws_env).get_object_tagging(
        Bucket=s3_bucket, Key=f"tenants/acme/datasets/{first.json()['dataset']}"
    )
    assert tagging["TagSet"] == [{"Key": "genq-kind", "Value": "dataset"}]  # what the lifecycle rule filters on

    assert upload(acme, 1000).status_code == 201  # exactly what is left still fits


def test_a_keys_own_quota_overrides_the_default(
    server: ApiServer, catalog: redis.Redis, s3_bucket: str, aws_env: str
) -> None:
    with session_for(server, make_key(catalog, "acme", dataset_bytes=5000)) as big:
        assert upload(big, 4000).status_code == 201
        assert upload(big, 1000).status_code == 201
        assert upload(big, 1).status_code == 429
        listing = big.get("/v1/datasets").json()
    assert (listing["used_bytes"], listing["limit_bytes"]) == (5000, 5000)


def test_uploads_sent_at_once_never_store_more_than_the_quota(acme: httpx.Client, s3_bucket: str, aws_env: str) -> None:
    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(r.status_code for r in pool.map(lambda _: upload(acme, 1000), range(8)))
    assert statuses == [201] * 3 + [429] * 5
    assert len(stored(s3_bucket, aws_env, "acme")) == 3
    assert acme.get("/v1/datasets").json()["used_bytes"] == 3000


def test_expired_uploads_are_deleted_and_their_bytes_given_back_on_the_next_upload(
    acme: httpx.Client, acme_key: str, catalog: redis.Redis, s3_bucket: str, aws_env: str
) -> None:
    old = upload(acme, 2000).json()["dataset"]
    kept = upload(acme, 1000).json()["dataset"]
    assert upload(acme, 2000).status_code == 429
    expire(catalog, acme_key, old)

    new = upload(acme, 2000)
    assert new.status_code == 201, new.text
    assert stored(s3_bucket, aws_env, "acme") == sorted([kept, new.json()["dataset"]])
    listing = acme.get("/v1/datasets").json()
    assert sorted(d["dataset"] for d in listing["datasets"]) == sorted([kept, new.json()["dataset"]])
    assert listing["used_bytes"] == 3000


def test_listing_deletes_expired_uploads_too(
    acme: httpx.Client, acme_key: str, catalog: redis.Redis, s3_bucket: str, aws_env: str
) -> None:
    reference = upload(acme, 2500).json()["dataset"]
    expire(catalog, acme_key, reference)
    listing = acme.get("/v1/datasets")
    assert listing.status_code == 200, listing.text
    assert listing.json() == {"datasets": [], "used_bytes": 0, "limit_bytes": 3000}
    assert stored(s3_bucket, aws_env, "acme") == []


def test_another_tenants_quota_and_uploads_are_unaffected(
    acme: httpx.Client, globex: httpx.Client, acme_key: str, catalog: redis.Redis, s3_bucket: str, aws_env: str
) -> None:
    theirs = upload(globex, 2500).json()["dataset"]
    mine = upload(acme, 3000).json()["dataset"]
    assert upload(acme, 1).status_code == 429
    assert upload(globex, 500).status_code == 201  # acme's full quota is acme's alone

    expire(catalog, acme_key, mine)
    assert acme.get("/v1/datasets").json()["datasets"] == []
    assert stored(s3_bucket, aws_env, "acme") == []
    assert theirs in stored(s3_bucket, aws_env, "globex")
    assert globex.get("/v1/datasets").json()["used_bytes"] == 3000


def test_an_upload_that_fails_to_store_gives_its_bytes_back(
    serve_api: ServeApi, catalog: redis.Redis, aws_env: str
) -> None:
    server = serve_api(bucket="no-such-bucket", max_dataset_bytes=4096, dataset_bytes=3000)
    secret = make_key(catalog, "acme")
    with session_for(server, secret) as session:
        assert upload(session, 2000).status_code == 500
    total = catalog.get(constants.API_KEY_DATASET_BYTES_KEY.format(key_id=key_id(secret)))
    assert int(total or 0) == 0
    assert catalog.zcard(constants.API_KEY_DATASETS_KEY.format(key_id=key_id(secret))) == 0
