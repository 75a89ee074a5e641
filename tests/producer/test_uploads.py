"""The Python client's data set uploads for a tenant count against one of its keys' quota, like POST /v1/datasets:
recorded before a byte is stored, tagged, listed and expired by the API, refused past the quota. Without a meter an
upload is the operator's (``datasets/``), unmetered. Real Redis, real (moto) S3."""

from __future__ import annotations

import time
from pathlib import Path

import boto3
import pytest
import redis
from api_server import ApiServer, api_settings, make_key, session_for

from producer.api import create_app
from producer.api.auth import KeyStore, Principal, key_id
from producer.api.quotas import Quotas
from producer.client import Client
from producer.core import constants
from producer.errors import InvalidJob, QuotaExceeded
from producer.settings import ClientSettings
from producer.uploads import DatasetMeter

QUOTA = 3000  # bytes of data sets one key stores at once, unless the key says otherwise


def settings(redis_url: str, bucket: str) -> ClientSettings:
    return api_settings(redis_url, bucket, dataset_bytes=QUOTA, max_dataset_bytes=4096)


def meter_for(client: Client, secret: str) -> DatasetMeter:
    """What an operator builds to upload for a tenant: the quota of one of its keys."""
    stored = KeyStore(client.redis).find(key_id(secret)[:12])
    quotas = Quotas(client.redis, client.settings.api, client.settings.job_ttl_s)
    return quotas.dataset_meter(Principal(stored.key_id, stored.key))


def archive(path: Path, size: int) -> Path:
    path.write_bytes(b"x" * size)
    return path


def objects(bucket: str, endpoint: str, prefix: str) -> list[str]:
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"].removeprefix(prefix) for o in listing.get("Contents", []))


def used_bytes(db: redis.Redis, secret: str) -> int:
    return int(db.get(constants.API_KEY_DATASET_BYTES_KEY.format(key_id=key_id(secret))) or 0)


def test_a_tenants_upload_through_the_client_is_metered_tagged_and_refused_past_its_keys_quota(
    redis_url: str, redis_client: redis.Redis, s3_bucket: str, aws_env: str, tmp_path: Path
) -> None:
    client = Client(settings(redis_url, s3_bucket))
    secret = make_key(redis_client, "acme")
    meter = meter_for(client, secret)

    first = client.upload_dataset(archive(tmp_path / "data.zip", 2000), meter=meter)
    assert first.expires_at is not None and first.expires_at > time.time() + 6 * 24 * 3600  # 7 days by default
    assert objects(s3_bucket, aws_env, "tenants/acme/datasets/") == [first.dataset]
    tags = boto3.client("s3", endpoint_url=aws_env).get_object_tagging(
        Bucket=s3_bucket, Key=f"tenants/acme/datasets/{first.dataset}"
    )
    assert tags["TagSet"] == [{"Key": "genq-kind", "Value": "dataset"}]  # the lifecycle rule's filter
    assert used_bytes(redis_client, secret) == 2000

    with pytest.raises(QuotaExceeded) as refused:
        client.upload_dataset(archive(tmp_path / "more.tar.gz", 1500), meter=meter)
    assert refused.value.limit == "dataset_bytes" and "1,000 of the key's 3,000" in str(refused.value)
    with pytest.raises(QuotaExceeded), (tmp_path / "more.tar.gz").open("rb") as more:
        client.upload_dataset_file(more, "more.tar.gz", meter=meter)
    assert objects(s3_bucket, aws_env, "tenants/acme/datasets/") == [first.dataset]  # nothing of them stored
    assert used_bytes(redis_client, secret) == 2000

    with archive(tmp_path / "rest.npz", 1000).open("rb") as rest:  # exactly what is left still fits
        last = client.upload_dataset_file(rest, "rest.npz", meter=meter)
    assert objects(s3_bucket, aws_env, "tenants/acme/datasets/") == sorted([first.dataset, last.dataset])
    assert used_bytes(redis_client, secret) == QUOTA

    # The operator's own upload (no meter): under datasets/, in no key's ledger, untagged, never expired.
    own = client.upload_dataset(archive(tmp_path / "own.zip", 5000))
    assert own.expires_at is None and objects(s3_bucket, aws_env, "datasets/") == [own.dataset]
    assert used_bytes(redis_client, secret) == QUOTA


def test_a_tenants_folder_is_refused_before_anything_is_taken_or_stored(
    redis_url: str, redis_client: redis.Redis, s3_bucket: str, aws_env: str, tmp_path: Path
) -> None:
    client = Client(settings(redis_url, s3_bucket))
    secret = make_key(redis_client, "acme")
    (tmp_path / "data" / "bag").mkdir(parents=True)
    (tmp_path / "data" / "bag" / "1.png").write_bytes(b"x" * 10)
    with pytest.raises(InvalidJob, match="a tenant's data set is one archive") as folder:
        client.upload_dataset(tmp_path / "data", meter=meter_for(client, secret))
    assert folder.value.field == "dataset"
    with pytest.raises(InvalidJob) as name:  # a name POST /v1/datasets refuses too
        client.upload_dataset(archive(tmp_path / "my data.zip", 10), meter=meter_for(client, secret))
    assert name.value.field == "filename"
    assert objects(s3_bucket, aws_env, "") == [] and used_bytes(redis_client, secret) == 0


def test_a_client_upload_that_fails_to_store_gives_its_bytes_back(
    redis_url: str, redis_client: redis.Redis, aws_env: str, tmp_path: Path
) -> None:
    client = Client(settings(redis_url, "no-such-bucket"))
    secret = make_key(redis_client, "acme")
    with pytest.raises(Exception, match="NoSuchBucket"):
        client.upload_dataset(archive(tmp_path / "data.zip", 2000), meter=meter_for(client, secret))
    assert used_bytes(redis_client, secret) == 0
    assert redis_client.zcard(constants.API_KEY_DATASETS_KEY.format(key_id=key_id(secret))) == 0


def test_the_api_lists_a_client_upload_against_the_same_quota_and_deletes_it_once_expired(
    redis_url: str, redis_client: redis.Redis, s3_bucket: str, aws_env: str, tmp_path: Path
) -> None:
    client = Client(settings(redis_url, s3_bucket))
    secret = make_key(redis_client, "acme")
    upload = client.upload_dataset(archive(tmp_path / "data.zip", 2500), meter=meter_for(client, secret))

    with ApiServer(create_app(settings(redis_url, s3_bucket))) as server, session_for(server, secret) as acme:
        listing = acme.get("/v1/datasets").json()
        assert [d["dataset"] for d in listing["datasets"]] == [upload.dataset] and listing["used_bytes"] == 2500
        refused = acme.post("/v1/datasets", params={"filename": "data.zip"}, content=b"x" * 1000)
        assert refused.status_code == 429 and refused.json()["detail"][0]["loc"] == ["quota", "dataset_bytes"]

        ledger = constants.API_KEY_DATASETS_KEY.format(key_id=key_id(secret))
        redis_client.zadd(ledger, {upload.dataset: time.time() - 1}, xx=True)  # its TTL has passed
        assert acme.get("/v1/datasets").json() == {"datasets": [], "used_bytes": 0, "limit_bytes": QUOTA}
    assert objects(s3_bucket, aws_env, "tenants/acme/datasets/") == []
