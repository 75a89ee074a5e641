"""Storage against a real S3 server (moto over HTTP, boto3 unmocked) and a real folder."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)
from moto.server import ThreadedMotoServer

from producer.errors import ConfigurationError
from worker.errors import ObjectNotFound, StorageError, StorageUnavailable
from worker.settings import StorageRetrySettings
from worker.storage.base import Storage
from worker.storage.local import LocalStorage
from worker.storage.s3 import S3Storage, is_transient, make_storage

# Short waits so a test of retrying takes a second or two, not the minute of production settings.
FAST_RETRY = StorageRetrySettings(window_s=10.0, initial_s=0.1, max_s=0.5)


@pytest.fixture(params=["s3", "local"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "s3":
        return S3Storage(request.getfixturevalue("s3_bucket"), FAST_RETRY)
    return LocalStorage(tmp_path / "out")


def free_port() -> int:
    """A loopback port nothing listens on (the OS just handed it out and took it back)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def client_error(code: str, status: int) -> ClientError:
    response: Any = {"Error": {"Code": code, "Message": "..."}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "PutObject")


def test_put_get_exists_list_round_trip(storage: Storage) -> None:
    storage.put("jobs/a/00000.png", b"png-0", "image/png")
    storage.put("jobs/a/00001.png", b"png-1", "image/png")
    storage.put("jobs/ab/manifest.json", b"{}", "application/json")

    assert storage.get("jobs/a/00001.png") == b"png-1"
    assert storage.exists("jobs/a/00000.png")
    assert not storage.exists("jobs/a/00002.png")
    assert storage.list("jobs/a/") == ["jobs/a/00000.png", "jobs/a/00001.png"]
    # A plain string prefix, as in S3: "jobs/a" also matches "jobs/ab/...".
    assert storage.list("jobs/a") == ["jobs/a/00000.png", "jobs/a/00001.png", "jobs/ab/manifest.json"]
    assert storage.list("") == storage.list("jobs/")
    assert storage.list("nothing/") == []


def test_put_replaces_the_object(storage: Storage) -> None:
    storage.put("k.bin", b"old", "application/octet-stream")
    storage.put("k.bin", b"new", "application/octet-stream")

    assert storage.get("k.bin") == b"new"
    assert storage.list("") == ["k.bin"]


def test_put_file_stores_the_whole_file_from_its_start(storage: Storage, tmp_path: Path) -> None:
    body = os.urandom(3 * 2**20 + 17)  # several socket buffers: sent in pieces, not as one bytes object
    with (tmp_path / "big.bin").open("w+b") as source:
        source.write(body)  # left at its end: put_file must read from the start
        storage.put_file("jobs/a/manifest.json", source, "application/json")
        storage.put_file("jobs/a/manifest.json", source, "application/json")  # again: replaced, not appended

    assert storage.get("jobs/a/manifest.json") == body
    assert storage.list("jobs/") == ["jobs/a/manifest.json"]


def test_get_of_a_missing_key_raises_object_not_found(storage: Storage) -> None:
    with pytest.raises(ObjectNotFound, match="jobs/none.png"):
        storage.get("jobs/none.png")


def test_url_reads_the_object(storage: Storage) -> None:
    storage.put("jobs/j/00000.png", b"\x89PNG-bytes", "image/png")

    url = storage.url("jobs/j/00000.png", expires_s=60)

    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == b"\x89PNG-bytes"


def test_delete_prefix_deletes_only_under_the_prefix(storage: Storage) -> None:
    for i in range(3):
        storage.put(f"jobs/x/{i}.png", b"x", "image/png")
    storage.put("jobs/y/0.png", b"y", "image/png")

    assert storage.delete_prefix("jobs/x/") == 3
    assert storage.list("jobs/") == ["jobs/y/0.png"]
    assert storage.delete_prefix("jobs/x/") == 0


def test_s3_presigned_url_serves_the_content_type(s3_bucket: str) -> None:
    storage = S3Storage(s3_bucket, FAST_RETRY)
    storage.put("a.webp", b"RIFF", "image/webp")

    url = storage.url("a.webp", expires_s=60)

    assert "X-Amz-Expires=60" in url
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"] == "image/webp"


def test_s3_list_pages_through_truncated_results(s3_bucket: str) -> None:
    storage = S3Storage(s3_bucket, FAST_RETRY, page_size=2)
    for i in reversed(range(5)):
        storage.put(f"p/{i}.png", b"x", "image/png")
    storage.put("q/0.png", b"x", "image/png")
    requests = []
    storage.client.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: requests.append(kw))

    keys = storage.list("p/")

    assert keys == [f"p/{i}.png" for i in range(5)]
    assert len(requests) == 3  # 2 + 2 + 1


def test_s3_unknown_bucket_raises_storage_error_without_retrying(aws_env: str) -> None:
    bucket = f"genq-missing-{uuid.uuid4().hex[:8]}"
    storage = S3Storage(bucket, StorageRetrySettings(window_s=30.0, initial_s=1.0, max_s=5.0))
    started = time.monotonic()

    with pytest.raises(StorageError, match=rf"bucket '{bucket}' does not exist at {aws_env}.*GENQ_S3__BUCKET"):
        storage.put("jobs/j/00000.png", b"x", "image/png")
    with pytest.raises(StorageError, match=bucket) as info:
        storage.get("jobs/j/00000.png")

    assert not isinstance(info.value, ObjectNotFound)  # the bucket is missing, not the key
    assert time.monotonic() - started < 3  # nowhere near the 30 s window


def test_s3_ensure_bucket_creates_it_once(aws_env: str) -> None:
    storage = S3Storage(f"genq-new-{uuid.uuid4().hex[:8]}", FAST_RETRY)

    assert storage.ensure_bucket() is True
    assert storage.ensure_bucket() is False
    storage.put("k", b"v", "text/plain")

    assert storage.get("k") == b"v"


def test_s3_ensure_bucket_may_not_create_refuses_in_one_line_naming_the_bucket_and_the_setting(
    aws_env: str, s3_bucket: str
) -> None:
    missing = S3Storage(f"genq-missing-{uuid.uuid4().hex[:8]}", FAST_RETRY)

    with pytest.raises(ConfigurationError) as refused:
        missing.ensure_bucket(create=False)

    assert str(refused.value) == (
        f"bucket {missing.bucket!r} (GENQ_S3__BUCKET) does not exist at {aws_env}: create it, or set "
        "GENQ_S3__CREATE_BUCKET=true to have workers create it at start"
    )
    assert not missing.client.list_objects_v2(Bucket=s3_bucket).get("Contents")  # nothing was written anywhere
    assert S3Storage(s3_bucket, FAST_RETRY).ensure_bucket(create=False) is False  # an existing one is fine


def test_s3_ensure_bucket_with_no_endpoint_answering_gives_up_at_once_with_no_retry_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # its own: it must not depend on what an earlier test set
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage = S3Storage("genq", StorageRetrySettings(window_s=0))
    started = time.monotonic()

    with pytest.raises(StorageUnavailable) as info:
        storage.ensure_bucket(create=True)

    assert isinstance(info.value.__cause__, EndpointConnectionError)  # what `genq worker` names in its one line
    assert time.monotonic() - started < 3


def test_s3_put_retries_until_the_endpoint_comes_up(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    storage = S3Storage(s3_bucket, FAST_RETRY)
    # moto servers in one process share their backend: the bucket made through the session server is here too.
    late_server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    timer = threading.Timer(1.0, late_server.start)
    timer.start()
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="genq.storage"):
            storage.put("late/x.bin", b"payload", "application/octet-stream")
        elapsed = time.monotonic() - started

        assert 0.9 < elapsed < 5
        assert storage.get("late/x.bin") == b"payload"
        retries = [r for r in caplog.records if r.name == "genq.storage" and r.levelno == logging.WARNING]
        assert retries and "late/x.bin" in retries[0].getMessage()
    finally:
        timer.join()
        late_server.stop()


def test_s3_unreachable_past_the_window_raises_storage_unavailable(
    aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    storage = S3Storage("genq-any", StorageRetrySettings(window_s=1.5, initial_s=0.1, max_s=0.5))
    started = time.monotonic()

    with pytest.raises(StorageUnavailable, match="put of 'jobs/j1/00000.png'") as info:
        storage.put("jobs/j1/00000.png", b"x", "image/png")

    assert 1.5 <= time.monotonic() - started < 4
    assert endpoint in str(info.value)
    assert isinstance(info.value.__cause__, EndpointConnectionError)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (EndpointConnectionError(endpoint_url="http://s3"), True),
        (ConnectTimeoutError(endpoint_url="http://s3"), True),
        (ReadTimeoutError(endpoint_url="http://s3"), True),
        (ConnectionClosedError(endpoint_url="http://s3"), True),
        (client_error("InternalError", 500), True),
        (client_error("ServiceUnavailable", 503), True),
        (client_error("SlowDown", 503), True),
        (client_error("RequestTimeout", 400), True),
        (client_error("Throttling", 400), True),
        (client_error("TooManyRequests", 429), True),
        (client_error("NoSuchBucket", 404), False),
        (client_error("NoSuchKey", 404), False),
        (client_error("AccessDenied", 403), False),
        (client_error("InvalidArgument", 400), False),
        (NoCredentialsError(), False),
        (ParamValidationError(report="bad Key"), False),
        (ValueError("not a storage fault"), False),
    ],
)
def test_is_transient(exc: BaseException, expected: bool) -> None:
    assert is_transient(exc) is expected


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a//b", "a\\b", "a/../../x", "./x", "a/", "", "x\x00y"])
def test_local_storage_refuses_keys_that_could_escape_its_root(tmp_path: Path, key: str) -> None:
    storage = LocalStorage(tmp_path / "root")

    with pytest.raises(StorageError, match="invalid key"):
        storage.put(key, b"evil", "text/plain")
    with pytest.raises(StorageError, match="invalid key"):
        storage.get(key)
    with pytest.raises(StorageError, match="invalid key"):
        storage.url(key, 60)

    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_local_storage_refuses_a_symlink_out_of_its_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)

    with pytest.raises(StorageError, match="outside"):
        LocalStorage(root).put("link/x", b"evil", "text/plain")

    assert list(outside.iterdir()) == []


def test_local_storage_writes_atomically_and_lists_no_temp_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / ".genq-tmp-crashed").write_bytes(b"half")  # left by a writer killed mid-put

    storage.put("jobs/a.png", b"png", "image/png")

    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == [".genq-tmp-crashed", "a.png"]
    assert storage.list("jobs/") == ["jobs/a.png"]
    assert storage.url("jobs/a.png", 60) == (tmp_path / "jobs" / "a.png").as_uri()


def test_make_storage_builds_the_kind_asked_for(aws_env: str, tmp_path: Path) -> None:
    retry = StorageRetrySettings()

    s3 = make_storage("s3", bucket="genq-b", local_dir=tmp_path, retry=retry)
    local = make_storage("local", bucket="genq-b", local_dir=tmp_path, retry=retry)

    assert isinstance(s3, S3Storage) and s3.bucket == "genq-b" and s3.endpoint == aws_env
    assert isinstance(local, LocalStorage) and local.root == tmp_path
    with pytest.raises(ConfigurationError, match="unknown storage 'gcs'"):
        make_storage("gcs", bucket="genq-b", local_dir=tmp_path, retry=retry)  # type: ignore[arg-type]
