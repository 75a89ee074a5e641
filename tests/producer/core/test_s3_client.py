"""The boto3 client genq builds (producer.core.s3.make_s3_client): what it puts on the wire for a PUT.

Each request is stopped at boto3's ``before-send`` event, answered there with an empty 200: no server needed.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse

from producer.core.s3 import CONTINUE_THRESHOLD_BYTES, make_s3_client

Sent = tuple[Any, list[dict[str, str]]]  # the client, and the headers of each request it would have sent


class _Empty:
    """The raw body of an empty answer, as urllib3's response offers it to botocore."""

    def stream(self, *_: Any, **__: Any) -> Iterator[bytes]:
        yield b""


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sent]:
    """A genq S3 client whose requests never leave the process, and the headers of each it would have sent."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    client = make_s3_client()
    headers: list[dict[str, str]] = []

    def answer(request: Any, **_: Any) -> AWSResponse:
        headers.append({k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()})
        return AWSResponse(request.url, 200, {}, _Empty())

    client.meta.events.register("before-send.s3", answer)
    yield client, headers


@pytest.mark.parametrize(
    "body",
    [b"\x89PNG" * 200, io.BytesIO(b"\x89PNG" * 200), b"x" * CONTINUE_THRESHOLD_BYTES],
    ids=["bytes", "file", "at-threshold"],
)
def test_a_small_put_is_sent_without_waiting_for_100_continue(sent: Sent, body: Any) -> None:
    client, headers = sent
    client.put_object(Bucket="genq", Key="jobs/a/00000.png", Body=body, ContentType="image/png")
    assert len(headers) == 1
    assert "Expect" not in headers[0]


@pytest.mark.parametrize(
    "body",
    [b"x" * (CONTINUE_THRESHOLD_BYTES + 1), io.BytesIO(b"x" * (CONTINUE_THRESHOLD_BYTES + 1))],
    ids=["bytes", "file"],
)
def test_a_large_put_still_asks_for_100_continue(sent: Sent, body: Any) -> None:
    client, headers = sent
    client.put_object(Bucket="genq", Key="jobs/a/shard-00000.tar", Body=body, ContentType="application/x-tar")
    assert headers[0]["Expect"] == "100-continue"
