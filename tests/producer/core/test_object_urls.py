"""Output URLs (producer.core.s3): presigned SigV4 exactly as boto3 presigns them, or under a public base URL.

Presigning is local (no request reaches S3), so these need no server: real boto3 with test credentials.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import boto3.session
import pytest
from pydantic import ValidationError

from producer.client import Client
from producer.contract import JobStatus, JobView, OutputRef
from producer.core.s3 import ObjectUrls, make_s3_client, public_url, sigv4_signer
from producer.core.settings import RedisSettings, S3Settings
from producer.settings import ClientSettings

KEYS = [
    "tenants/acme/jobs/3b1ba29b66c042218b3b9f594b3e15f2/00001.png",
    "tenants/acme/jobs/3b1b/shard-00000.tar",
    "a b/ü~+x=y&z%.png",  # spaces, UTF-8, and characters a query or path would take for syntax
    "jobs/x//double/slash.png",
]


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")  # no developer's profile changes what boto3 does
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    yield monkeypatch


def _same_second(
    make: list[str], client: object, bucket: str = "genq", expires: int = 900, operation: str = "get_object"
) -> list[str]:
    """boto3's presigned URLs of ``make``, all stamped in one second (retried across a second boundary)."""
    for _ in range(5):
        urls = [
            client.generate_presigned_url(  # type: ignore[attr-defined]
                operation, Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
            )
            for key in make
        ]
        if len({parse_qs(urlsplit(u).query)["X-Amz-Date"][0] for u in urls}) == 1:
            return urls
    raise AssertionError("could not presign within one second five times")


@pytest.mark.parametrize(
    "endpoint",
    [None, "http://127.0.0.1:9000", "http://localhost:9000", "https://s3.eu-west-1.amazonaws.com", "http://[::1]:9000"],
    ids=["aws-virtual-hosted", "ip-path-style", "localhost", "regional", "ipv6"],
)
@pytest.mark.parametrize("token", [None, "FQoGZXIvYXdzE+session/token=="])
@pytest.mark.parametrize(("operation", "method"), [("get_object", "GET"), ("put_object", "PUT")])
def test_the_fast_signer_makes_exactly_the_url_boto3_presigns(
    aws: pytest.MonkeyPatch, endpoint: str | None, token: str | None, operation: str, method: str
) -> None:
    if endpoint:
        aws.setenv("AWS_ENDPOINT_URL", endpoint)
    if token:
        aws.setenv("AWS_SESSION_TOKEN", token)
    client = make_s3_client(session=boto3.session.Session())  # boto3's default session keeps what it read first
    template, *expected = _same_second(["tenants/acme/jobs/j/00000.png", *KEYS], client, operation=operation)
    secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    sign = sigv4_signer(template, "tenants/acme/jobs/j/00000.png", secret, method=method)
    assert sign is not None
    assert [sign(key) for key in KEYS] == expected
    assert ("X-Amz-Security-Token=" in template) is (token is not None)
    other = "PUT" if method == "GET" else "GET"  # a URL signed for one method is no good for the other
    assert sigv4_signer(template, "tenants/acme/jobs/j/00000.png", secret, method=other) is None


def test_the_fast_signer_refuses_what_it_cannot_reproduce(aws: pytest.MonkeyPatch) -> None:
    template = make_s3_client(session=boto3.session.Session()).generate_presigned_url(
        "get_object", Params={"Bucket": "genq", "Key": "k/0.png"}, ExpiresIn=60
    )
    assert sigv4_signer(template, "k/0.png", "another secret") is None  # a credential that changed meanwhile
    assert sigv4_signer(template, "k/1.png", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY") is None  # not its key
    sigv2 = "https://genq.s3.amazonaws.com/k/0.png?AWSAccessKeyId=AKIDEXAMPLE&Signature=abc%3D&Expires=1700000000"
    assert sigv4_signer(sigv2, "k/0.png", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY") is None
    extra_header = template.replace("X-Amz-SignedHeaders=host", "X-Amz-SignedHeaders=host%3Brange")
    assert sigv4_signer(extra_header, "k/0.png", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY") is None


def test_a_batch_of_urls_is_boto3s_presigning_with_the_settings_lifetime(aws: pytest.MonkeyPatch) -> None:
    aws.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    urls = ObjectUrls(S3Settings(bucket="outputs", presign_expires_s=120))
    keys = [f"tenants/acme/jobs/j/{i:05d}.png" for i in range(50)]
    made = urls.urls(keys)
    query = parse_qs(urlsplit(made[7]).query)
    assert query["X-Amz-Expires"] == ["120"] and query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Credential"][0].startswith("AKIDEXAMPLE/") and query["X-Amz-Signature"]
    stamped = query["X-Amz-Date"][0]
    boto3_url = make_s3_client(session=boto3.session.Session()).generate_presigned_url(
        "get_object", Params={"Bucket": "outputs", "Key": keys[7]}, ExpiresIn=120
    )
    if parse_qs(urlsplit(boto3_url).query)["X-Amz-Date"][0] == stamped:  # same second: the very same URL
        assert made[7] == boto3_url
    assert all(url.startswith(f"http://127.0.0.1:9000/outputs/{key}?") for url, key in zip(made, keys, strict=True))
    assert len(set(made)) == len(keys)


def test_public_base_urls_are_the_base_and_the_key_with_no_credentials_needed(aws: pytest.MonkeyPatch) -> None:
    aws.delenv("AWS_ACCESS_KEY_ID")
    aws.delenv("AWS_SECRET_ACCESS_KEY")
    urls = ObjectUrls(S3Settings(public_base_url="https://cdn.example.com/genq/"))
    assert urls.urls(["tenants/acme/jobs/j/00000.png", "a b/ü.png"]) == [
        "https://cdn.example.com/genq/tenants/acme/jobs/j/00000.png",
        "https://cdn.example.com/genq/a%20b/%C3%BC.png",
    ]
    assert public_url("https://cdn.example.com", "x/~y.png") == "https://cdn.example.com/x/~y.png"


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("https://cdn.example.com", "https://cdn.example.com"),
        ("https://cdn.example.com/genq/", "https://cdn.example.com/genq"),
        ("http://127.0.0.1:9000/genq", "http://127.0.0.1:9000/genq"),
        ("", None),
        (None, None),
    ],
)
def test_public_base_url_setting_keeps_a_base(given: str | None, kept: str | None) -> None:
    assert S3Settings(public_base_url=given).public_base_url == kept


@pytest.mark.parametrize(
    "bad", ["cdn.example.com", "ftp://cdn.example.com", "https://cdn.example.com/?sig=1", "https://"]
)
def test_public_base_url_setting_refuses_what_is_not_a_base(bad: str) -> None:
    with pytest.raises(ValidationError, match="not a base URL"):
        S3Settings(public_base_url=bad)


def _view(outputs: list[OutputRef]) -> JobView:
    return JobView(
        id="j", status=JobStatus.SUCCEEDED, model="m", outputs=outputs, created_at=datetime(2026, 1, 1, tzinfo=UTC)
    )


def _ref(index: int, key: str, member: str | None = None) -> OutputRef:
    return OutputRef(
        index=index, label="bag", label_index=8, seed=index, key=key, sha256="0" * 64, content_type="image/png",
        member=member,
    )  # fmt: skip


def test_client_with_urls_presigns_sigv4_and_the_outputs_of_one_tar_share_its_url(aws: pytest.MonkeyPatch) -> None:
    aws.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    # No Redis is reached: the client connects on its first command.
    client = Client(ClientSettings(redis=RedisSettings(url="redis://127.0.0.1:1/0"), s3=S3Settings(bucket="genq")))
    tar = "tenants/acme/jobs/j/shard-00000.tar"
    view = _view([_ref(0, tar, "00000.png"), _ref(1, tar, "00001.png"), _ref(2, "tenants/acme/jobs/j/x.png")])
    signed = client.with_urls(view)
    urls = [o.url or "" for o in signed.outputs]
    assert all("X-Amz-Signature=" in u and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in u for u in urls)
    assert not any("AWSAccessKeyId" in u or "Signature=" in u.replace("X-Amz-Signature=", "") for u in urls)
    assert urls[0] == urls[1] != urls[2]
    assert signed.model_copy(update={"outputs": view.outputs}) == view  # nothing else changed
    assert parse_qs(urlsplit(client.with_urls(view, expires_s=60).outputs[0].url or "").query)["X-Amz-Expires"] == [
        "60"
    ]
    assert client.with_urls(_view([])) == _view([])
