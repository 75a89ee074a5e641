"""What a `genq` error line may show of a URL, and which errors are Redis or S3 out of reach (pure logic)."""

from __future__ import annotations

import pytest
import redis

from producer.cli.exits import redact, unavailable
from producer.core.settings import RedisSettings
from producer.errors import GenqError
from producer.settings import ClientSettings


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("rediss://genq:hunter2@cache.example.com:6380/2?ssl_cert_reqs=none", "rediss://cache.example.com:6380/2"),
        ("unix:///run/redis.sock?password=hunter2&db=1", "unix:///run/redis.sock"),
        ("http://[::1]:9000", "http://[::1]:9000"),
        ("http://minio:notaport/", "http://minio/"),
        ("127.0.0.1:9000", "127.0.0.1:9000"),
    ],
)
def test_a_url_in_an_error_line_keeps_no_user_password_or_query(url: str, shown: str) -> None:
    assert redact(url) == shown


def _raised(outer: type[BaseException], *, suppress: bool) -> BaseException:
    try:
        try:
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        except redis.ConnectionError as exc:
            if suppress:
                raise outer("said already") from None
            raise outer("wrapped") from exc
    except BaseException as exc:  # the test keeps what was raised
        return exc
    raise AssertionError("nothing raised")


def test_an_error_caused_by_redis_out_of_reach_is_named_and_one_raised_from_none_is_not() -> None:
    settings = ClientSettings(redis=RedisSettings(url="redis://:pw@127.0.0.1:1/0"))

    assert unavailable(_raised(GenqError, suppress=False), settings) == (
        "cannot reach Redis at redis://127.0.0.1:1/0 (GENQ_REDIS__URL): Error 111 connecting to 127.0.0.1:1. "
        "Connection refused."
    )
    assert unavailable(_raised(GenqError, suppress=True), settings) is None
    assert unavailable(ValueError("no service involved"), settings) is None
