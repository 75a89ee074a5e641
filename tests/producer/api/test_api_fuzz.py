"""Fuzz the API from its own OpenAPI document (schemathesis): no 5xx, and every response matches the schema."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest
import redis
import schemathesis
from api_server import ApiServer, api_settings, make_key, publish_catalog
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from stack import AWS_ENV, boto_kwargs

from producer.api import create_app

REDIS_URL = "redis://127.0.0.1:6379/13"  # building the document connects to nothing; the server uses redis_url

# The document the server publishes, built the same way (the app factory): schemathesis generates cases from it.
schema = schemathesis.openapi.from_dict(create_app(api_settings(REDIS_URL)).openapi())


@pytest.fixture(scope="module")
def fuzz_server(redis_url: str, s3_endpoint: str) -> Iterator[tuple[ApiServer, str]]:
    """The API with a catalogue, a key and a reachable bucket, so /readyz is ready and jobs can be accepted."""
    db = redis.Redis.from_url(redis_url)
    db.flushdb()
    publish_catalog(db)
    key = make_key(db, "fuzz")
    bucket = "genq-fuzz"
    boto3.client("s3", endpoint_url=s3_endpoint, **boto_kwargs()).create_bucket(Bucket=bucket)
    with pytest.MonkeyPatch.context() as mp:  # the readiness probe's boto3 reads the standard AWS variables
        mp.setenv("AWS_ENDPOINT_URL", s3_endpoint)
        for name, value in AWS_ENV.items():
            mp.setenv(name, value)
        with ApiServer(create_app(api_settings(redis_url, bucket))) as server:
            yield server, key
    db.flushdb()
    db.close()


@schema.parametrize()
@settings(max_examples=30, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_and_never_answers_5xx(
    case: schemathesis.Case, fuzz_server: tuple[ApiServer, str]
) -> None:
    server, key = fuzz_server
    case.call_and_validate(
        base_url=server.url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
        # A schema-valid body may still be refused (422): a model or label the catalogue lacks, over a limit,
        # both `label` and `counts`. JSON Schema cannot say that; every other default check applies.
        excluded_checks=[positive_data_acceptance],
    )
