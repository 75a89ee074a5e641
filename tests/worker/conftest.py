"""Fixtures of the worker's tests: a switchable way to the tests' Redis, for outages caused on purpose."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from tcp_proxy import TcpProxy


@pytest.fixture
def proxy(redis_url: str) -> Iterator[TcpProxy]:
    """A switchable way to the tests' Redis: ``down()`` is Redis restarting, ``up()`` Redis back."""
    target = urlsplit(redis_url)
    tcp = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    tcp.up()
    yield tcp
    tcp.down()
