"""Bodies cost the API nothing before it knows who sends them: an attacker's upload is refused, never buffered.

The attack (4 parallel unauthenticated 250 MB chunked uploads took the API from 124 MB to 1.65 GB): a chunked
`POST /v1/datasets`, which the body limit used to buffer whole before the route checked the key. Sent here over a raw
socket, as an attacker's script would, while the API's Python allocations are traced (the server runs in this
process).
"""

from __future__ import annotations

import socket
import tracemalloc

import redis
from api_server import ServeApi, make_key

_MIB = 1024 * 1024
_CHUNK = b"\0" * (256 * 1024)


def _chunked_upload(port: int, path: str, total: int, key: str | None) -> tuple[int, int]:
    """POST ``total`` bytes as a chunked body; returns (HTTP status, bytes the server took before answering)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n{auth}"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    sock.sendall(head.encode())
    sent = 0
    try:
        while sent < total:
            sock.sendall(b"%x\r\n" % len(_CHUNK) + _CHUNK + b"\r\n")
            sent += len(_CHUNK)
        sock.sendall(b"0\r\n\r\n")
    except OSError:  # the server answered and closed while we were still sending: what a refusal looks like
        pass
    answer = b""
    try:
        while b"\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    finally:
        sock.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1") else 0
    return status, sent


def _peak_during(call: object) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = call()  # type: ignore[operator]
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_unauthenticated_chunked_upload_is_refused_without_being_buffered(
    serve_api: ServeApi, catalog: redis.Redis
) -> None:
    server = serve_api(max_dataset_bytes=256 * _MIB)

    (status, _sent), peak = _peak_during(
        lambda: _chunked_upload(server.port, "/v1/datasets?filename=data.zip", 64 * _MIB, key=None)
    )

    assert status == 401
    assert peak < 8 * _MIB, f"the API held {peak / _MIB:.0f} MiB of an unauthenticated body"


def test_an_oversized_chunked_upload_is_cut_off_at_the_limit_holding_none_of_it(
    serve_api: ServeApi, catalog: redis.Redis, aws_env: str, s3_bucket: str
) -> None:
    server = serve_api(bucket=s3_bucket, max_dataset_bytes=4 * _MIB)
    key = make_key(catalog, "acme")

    (status, _sent), peak = _peak_during(
        lambda: _chunked_upload(server.port, "/v1/datasets?filename=data.zip", 48 * _MIB, key=key)
    )

    assert status == 413
    # the route spools to disk past 8 MiB; the limit middleware itself holds nothing
    assert peak < 16 * _MIB, f"the API held {peak / _MIB:.0f} MiB of a refused body"


def test_a_chunked_json_body_past_the_limit_is_refused_before_auth_with_its_cost_bounded(
    serve_api: ServeApi, catalog: redis.Redis
) -> None:
    server = serve_api()  # GENQ_API__MAX_BODY_BYTES: 64 KiB

    (status, _sent), peak = _peak_during(lambda: _chunked_upload(server.port, "/v1/jobs", 32 * _MIB, key=None))

    assert status == 413
    assert peak < 8 * _MIB
