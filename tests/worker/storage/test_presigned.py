"""Small uploads presigned from a boto3 template (worker.storage.presigned) through S3Storage.put: against moto's
server for what is stored, and against a loopback HTTP store of our own for what it does when a store refuses,
throttles or redirects. Real boto3, real HTTP, no mocks."""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
import pytest
from botocore.config import Config

from producer.core.s3 import CONTINUE_THRESHOLD_BYTES, make_s3_client
from worker.errors import StorageError
from worker.settings import StorageRetrySettings
from worker.storage.presigned import PresignedPuts, Put
from worker.storage.s3 import S3Storage

FAST_RETRY = StorageRetrySettings(window_s=10.0, initial_s=0.05, max_s=0.2)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3


@dataclass(frozen=True)
class Seen:
    """One request as the store received it."""

    method: str
    key: str
    presigned: bool  # signed in its query string (ours), not in an Authorization header (boto3's)
    headers: dict[str, str]
    body: bytes


Answer = Callable[[Seen], tuple[int, bytes]]


class Store:
    """An S3-compatible store on a loopback port: records every request and answers what ``answer`` says."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.seen: list[Seen] = []
        store = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and 100-continue, as S3 speaks

            def do_PUT(self) -> None:
                parts = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                seen = Seen(
                    "PUT",
                    unquote(parts.path).split("/", 2)[2],
                    "X-Amz-Signature=" in parts.query,
                    dict(self.headers.items()),
                    body,
                )
                store.seen.append(seen)
                status, payload = store.answer(seen)
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def error(code: str) -> bytes:
    return f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>as S3 says it</Message></Error>".encode()


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Answer], Store]]:
    """Start a :class:`Store` answering as told, with boto3 pointed at it."""
    started: list[Store] = []

    def start(answer: Answer) -> Store:
        made = Store(answer)
        started.append(made)
        monkeypatch.setenv("AWS_ENDPOINT_URL", made.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        return made

    yield start
    for each in started:
        each.stop()


def test_a_small_put_is_stored_byte_for_byte_without_boto3s_put_object(s3_bucket: str) -> None:
    storage = S3Storage(s3_bucket, FAST_RETRY)
    through_boto3: list[str] = []
    storage.client.meta.events.register("before-call.s3.PutObject", lambda **_: through_boto3.append("PutObject"))
    keys = ["tenants/acme/jobs/j/00000.png", "a b/ü~+x=y&z%.png", "jobs/x//double/slash.png"]

    for key in keys:
        storage.put(key, PNG, "image/png")

    assert through_boto3 == []
    for key in keys:
        stored = storage.client.get_object(Bucket=s3_bucket, Key=key)
        assert stored["Body"].read() == PNG
        assert stored["ContentType"] == "image/png"


def test_a_put_carries_the_md5_of_its_body_and_its_content_type(store: Callable[[Answer], Store]) -> None:
    s3 = store(lambda seen: (200, b""))
    S3Storage("genq", FAST_RETRY).put("jobs/j/00000.png", PNG, "image/png")

    (seen,) = s3.seen
    assert seen.presigned and seen.key == "jobs/j/00000.png" and seen.body == PNG
    assert seen.headers["Content-MD5"] == base64.b64encode(hashlib.md5(PNG).digest()).decode()
    assert seen.headers["Content-Type"] == "image/png"
    assert "Expect" not in seen.headers


def test_a_store_refusing_presigned_puts_gets_boto3s_from_then_on(
    store: Callable[[Answer], Store], caplog: pytest.LogCaptureFixture
) -> None:
    s3 = store(lambda seen: (403, error("AccessDenied")) if seen.presigned else (200, b""))
    storage = S3Storage("genq", FAST_RETRY)

    with caplog.at_level(logging.WARNING, logger="genq.storage"):
        storage.put("jobs/j/00000.png", PNG, "image/png")
        storage.put("jobs/j/00001.png", PNG, "image/png")
        storage.put("jobs/j/00002.png", PNG, "image/png")

    assert [(seen.key[-9:], seen.presigned) for seen in s3.seen] == [
        ("00000.png", True),
        ("00000.png", False),
        ("00001.png", False),
        ("00002.png", False),
    ]
    assert all(seen.body == PNG for seen in s3.seen)
    assert sum("uploading through boto3 from now on" in r.message for r in caplog.records) == 1


def test_a_refusal_boto3_gets_too_fails_the_put_as_before_and_keeps_the_fast_path(
    store: Callable[[Answer], Store],
) -> None:
    s3 = store(lambda seen: (403, error("AccessDenied")))
    storage = S3Storage("genq", FAST_RETRY)

    for key in ("jobs/j/00000.png", "jobs/j/00001.png"):
        with pytest.raises(StorageError, match=r"access denied \(AccessDenied\) to S3 put of 'jobs/j/0000[01].png'"):
            storage.put(key, PNG, "image/png")

    assert [seen.presigned for seen in s3.seen] == [True, False, True, False]


def test_throttling_is_retried_inside_the_window_on_the_fast_path(store: Callable[[Answer], Store]) -> None:
    answers = iter([(503, error("SlowDown")), (500, b"<html>proxy</html>"), (200, b"")])
    s3 = store(lambda seen: next(answers))

    S3Storage("genq", FAST_RETRY).put("jobs/j/00000.png", PNG, "image/png")

    assert [seen.presigned for seen in s3.seen] == [True, True, True]


def test_a_body_above_the_threshold_goes_through_boto3(store: Callable[[Answer], Store]) -> None:
    s3 = store(lambda seen: (200, b""))
    big = b"x" * (CONTINUE_THRESHOLD_BYTES + 1)

    S3Storage("genq", FAST_RETRY).put("jobs/j/big.bin", big, "application/octet-stream")

    (seen,) = s3.seen
    assert not seen.presigned and seen.body == big


class CountingClient:
    """A boto3 client that counts the templates presigned through it."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._endpoint = client._endpoint
        self.presigned = 0

    def generate_presigned_url(self, *args: Any, **kwargs: Any) -> str:
        self.presigned += 1
        return str(self._client.generate_presigned_url(*args, **kwargs))


def test_the_template_is_made_again_once_it_is_refresh_s_old(store: Callable[[Answer], Store]) -> None:
    s3 = store(lambda seen: (200, b""))
    session = boto3.session.Session()
    client = CountingClient(make_s3_client(session=session))
    now = [1000.0]
    puts = PresignedPuts(client, session, "genq", refresh_s=60, clock=lambda: now[0])  # type: ignore[arg-type]

    assert puts.put("a.png", PNG, "image/png") is Put.STORED
    now[0] += 59.9
    assert puts.put("b.png", PNG, "image/png") is Put.STORED
    assert client.presigned == 1
    now[0] += 0.1
    assert puts.put("c.png", PNG, "image/png") is Put.STORED
    assert client.presigned == 2
    assert [seen.key for seen in s3.seen] == ["a.png", "b.png", "c.png"]


def test_a_client_presigning_with_sigv2_uploads_through_boto3(store: Callable[[Answer], Store]) -> None:
    s3 = store(lambda seen: (200, b""))
    session = boto3.session.Session()
    sigv2 = session.client("s3", config=Config(signature_version="s3"))  # presigns with SigV2: not for the signer

    assert PresignedPuts(sigv2, session, "genq").put("a.png", PNG, "image/png") is Put.SKIPPED
    assert s3.seen == []
