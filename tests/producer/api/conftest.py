"""The HTTP API on real uvicorn against the real Redis (DB flushed per test); S3 from moto where a test needs it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from api_server import ApiServer, ServeApi, api_settings, make_key, publish_catalog, session_for
from stack_fixtures import model_root, module_worker, stack

from producer.api import create_app

__all__ = ["model_root", "module_worker", "stack"]


@pytest.fixture
def serve_api(redis_url: str) -> Iterator[ServeApi]:
    """Start the API on uvicorn (``serve(bucket=..., **api_settings)``); every server is stopped after the test."""
    servers: list[ApiServer] = []

    def serve(bucket: str = "genq", redis_url_: str | None = None, **api: Any) -> ApiServer:
        server = ApiServer(create_app(api_settings(redis_url_ or redis_url, bucket, **api)))
        servers.append(server.start())
        return server

    yield serve
    for server in servers:
        server.stop()


@pytest.fixture
def catalog(redis_client: redis.Redis) -> redis.Redis:
    """A flushed DB with the model catalogue published (no worker needed to accept jobs)."""
    publish_catalog(redis_client)
    return redis_client


@pytest.fixture
def api(serve_api: ServeApi, catalog: redis.Redis) -> ApiServer:
    return serve_api()


@pytest.fixture
def acme(api: ApiServer, catalog: redis.Redis) -> Iterator[httpx.Client]:
    """A session of tenant "acme"."""
    with session_for(api, make_key(catalog, "acme")) as session:
        yield session


@pytest.fixture
def globex(api: ApiServer, catalog: redis.Redis) -> Iterator[httpx.Client]:
    """A session of tenant "globex"."""
    with session_for(api, make_key(catalog, "globex")) as session:
        yield session
