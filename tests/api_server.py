"""The HTTP API served by real uvicorn on a free loopback port, in a thread of the test process, and helpers::

with ApiServer(create_app(api_settings(redis_url))) as server:
    httpx.get(f"{server.url}/healthz")
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import httpx
import redis
import uvicorn
from fastapi import FastAPI
from shipped import CGAN, CGAN_LATEST, CGAN_VERSIONS
from stack import LOOPBACK_ALLOWED

from producer.api.auth import KeyQuotas, KeyStore
from producer.contract import ModelEntry, ModelVersionInfo
from producer.core import constants
from producer.core.settings import RedisSettings, S3Settings, WebhookSettings
from producer.settings import ApiSettings, ClientSettings


class ApiServer:
    """uvicorn on 127.0.0.1 with a port the OS picked (bound before uvicorn starts, so no race for it)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self, timeout: float = 10.0) -> ApiServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


ServeApi = Callable[..., ApiServer]

FMNIST_CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
# Generous by default, so only the tests about limits meet them.
TEST_API = {"rate_per_s": 1000.0, "burst": 1000, "events_poll_s": 0.05}


def publish_catalog(client: redis.Redis) -> None:
    """What a worker publishes at start-up for the shipped model; enough for the API to accept jobs."""
    info = ModelVersionInfo(arch="cgan", class_names=FMNIST_CLASSES, resolution=28, channels=1)
    entry = ModelEntry(name=CGAN, versions=dict.fromkeys(CGAN_VERSIONS, info), aliases={"latest": CGAN_LATEST})
    client.hset(constants.CATALOG_KEY, entry.name, entry.model_dump_json())


def api_settings(redis_url: str, bucket: str = "genq", **api: Any) -> ClientSettings:
    return ClientSettings(
        redis=RedisSettings(url=redis_url),
        s3=S3Settings(bucket=bucket),
        api=ApiSettings(**{**TEST_API, **api}),
        webhook=WebhookSettings(allow_hosts=LOOPBACK_ALLOWED),
    )


def make_key(client: redis.Redis, tenant: str, **quotas: Any) -> str:
    secret, _ = KeyStore(client).create(tenant, name="test", quotas=KeyQuotas(**quotas))
    return secret


def session_for(server: ApiServer, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=10)
