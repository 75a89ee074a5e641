"""The HTTP API: ``genq api`` or ``uvicorn --factory producer.api:create_app``.

A thin layer over the Python client: the same contract (``GenerateRequest`` in, ``JobView`` out), the same job
store and queue; what it adds is HTTP — API keys and tenants (``producer.api.auth``), quotas and rate limits
(``producer.api.quotas``), errors that name the field (``producer.api.problems``), health, readiness and metrics.
Routes of ``/v1`` live in ``producer.api.routes``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.api.auth import KeyStore
from producer.api.deps import Services, ServicesDep, strict_query
from producer.api.finetune import DATASETS_PATH
from producer.api.finetune import router as finetune_router
from producer.api.locate import ManifestIndex, s3_reader
from producer.api.outputs import router as outputs_router
from producer.api.problems import ErrorBody, as_json, error_response, install_error_handlers
from producer.api.quotas import Quotas
from producer.api.routes import router
from producer.api.telemetry import CONTENT_TYPE, ApiMetrics
from producer.api.webhooks import router as webhooks_router
from producer.client import Client
from producer.core.s3 import make_s3_client
from producer.errors import ConfigurationError
from producer.settings import ClientSettings

log = logging.getLogger("genq.api")

API_VERSION = "1.0.0"
_DESCRIPTION = """Asynchronous image generation. Create a job (`POST /v1/jobs`, answered 202 at once), then follow
it with `GET /v1/jobs/{id}`, its Server-Sent Events stream, or a signed callback. Outputs are stored in S3 under
`tenants/<tenant>/jobs/<id>/`; a job's view lists their keys, sha256 and URLs made for each read, and
`GET /v1/jobs/{id}/outputs/{index}` and `GET /v1/jobs/{id}/manifest` redirect to them.

Authenticate with `Authorization: Bearer genq_...` (`genq keys create --tenant T`). Every error body is
`{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}`; `loc` names the field, header or quota."""


class Health(BaseModel):
    """The process answers."""

    status: str = "ok"


class Readiness(BaseModel):
    """Each dependency's state: "ok", or why it is not."""

    status: str
    checks: dict[str, str]


def create_app(settings: ClientSettings | None = None) -> FastAPI:
    """Build the API over ``settings`` (default: from ``GENQ_*`` variables).

    Raises:
        ConfigurationError: no Redis configured (the API has no embedded mode).
    """
    settings = settings or ClientSettings()
    if settings.redis.url is None:
        raise ConfigurationError("the HTTP API needs Redis: set GENQ_REDIS__URL (e.g. redis://127.0.0.1:6379/0)")
    client = Client(settings)
    services = Services(
        settings=settings,
        client=client,
        keys=KeyStore(client.redis),
        quotas=Quotas(client.redis, settings.api, settings.job_ttl_s),
        metrics=ApiMetrics(client.redis, client.store),
        manifests=ManifestIndex(s3_reader(settings.s3.bucket)),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        client.redis.close()

    app = FastAPI(
        title="genq",
        version=API_VERSION,
        description=_DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[{"name": "jobs"}, {"name": "operations"}],
    )
    app.state.services = services
    install_error_handlers(app)
    app.include_router(router, tags=["jobs"])
    app.include_router(outputs_router, tags=["jobs"])
    app.include_router(finetune_router, tags=["fine-tuning"])
    app.include_router(webhooks_router, tags=["webhooks"])
    operations: dict[str, Any] = {"methods": ["GET"], "tags": ["operations"], "dependencies": [Depends(strict_query())]}
    invalid: dict[int | str, dict[str, Any]] = {
        422: {"model": ErrorBody, "description": "An unknown or repeated query parameter."}
    }
    app.add_api_route("/healthz", healthz, response_model=Health, responses=invalid, **operations)
    app.add_api_route(
        "/readyz",
        readyz,
        response_model=Readiness,
        responses={
            503: {"model": Readiness, "description": "A dependency is unreachable; `checks` says which."},
            **invalid,
        },
        **operations,
    )
    app.add_api_route(
        "/metrics",
        metrics,
        response_class=Response,
        responses={
            200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}, "description": "Prometheus text"},
            **as_json(invalid),
        },
        **operations,
    )
    # Outermost first: measure everything (413s included), then refuse big bodies before anything reads them.
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.api.max_body_bytes,
        path_limits={DATASETS_PATH: (settings.api.max_dataset_bytes, "GENQ_API__MAX_DATASET_BYTES")},
    )
    app.add_middleware(Observe, metrics=services.metrics)
    return app


def healthz() -> Health:
    """The process is up (it checks nothing else: see `/readyz`)."""
    return Health()


def readyz(services: ServicesDep) -> JSONResponse:
    """Redis answers `PING` and the S3 bucket answers `HeadBucket`; 503 naming what failed otherwise."""
    checks = {"redis": _check_redis(services), "s3": _check_s3(services)}
    ready = all(v == "ok" for v in checks.values())
    body = Readiness(status="ready" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


def _check_redis(services: ServicesDep) -> str:
    try:
        services.client.redis.ping()
        return "ok"
    except Exception as exc:  # any failure is "not ready"; its text says why
        return f"unreachable: {type(exc).__name__}: {exc}"


def _check_s3(services: ServicesDep) -> str:
    try:
        if "client" not in services.s3:
            timeout = services.settings.api.ready_timeout_s
            services.s3["client"] = make_s3_client(
                max_pool_connections=2, connect_timeout_s=timeout, read_timeout_s=timeout
            )
        services.s3["client"].head_bucket(Bucket=services.settings.s3.bucket)
        return "ok"
    except Exception as exc:  # botocore raises many types (endpoint, credentials, 404/403): all mean not ready
        return f"unreachable: {type(exc).__name__}: {exc}"


async def metrics(services: ServicesDep) -> Response:
    """Prometheus text: jobs submitted by model and jobs by status, requests by route and status, latency, queue
    depth."""
    body = await run_in_threadpool(services.metrics.render)  # the queue depth and jobs collectors ask Redis
    return Response(body, media_type=CONTENT_TYPE)


class Observe:
    """ASGI middleware: count and time every request by route template (never the raw path: bounded labels)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe(route, scope["method"], status, time.perf_counter() - start)


class BodyTooLarge(StarletteHTTPException):
    """Raised by :class:`BodyLimit`'s ``receive`` once a body passes its limit: answered 413 wherever it surfaces
    (FastAPI passes an HTTP exception raised while it reads a body through unchanged)."""

    def __init__(self, limit: int, setting: str) -> None:
        msg = f"request body is larger than that; the limit is {limit} bytes ({setting})"
        super().__init__(413, msg, headers={"Connection": "close"})


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` with 413, holding none of them.

    A declared ``Content-Length`` over the limit is refused unread. Any other body (chunked, or under a declared
    length that lies) is counted as the app reads it: the chunk that passes the limit raises inside the app's read,
    and the caller gets 413. Nothing is buffered here, so work done before a route authenticates is a few bytes
    whatever the body's size: routes check the key before reading the body.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        setting: str = "GENQ_API__MAX_BODY_BYTES",
        path_limits: dict[str, tuple[int, str]] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.setting = setting
        # path -> its own limit and setting: data set uploads are far bigger than JSON bodies
        self.by_path = {path: BodyLimit(app, limit, name) for path, (limit, name) in (path_limits or {}).items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        special = self.by_path.get(scope.get("path", ""))
        if special is not None:
            await special(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, int(declared))
            return
        size = 0
        started = False

        async def counted() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes, self.setting)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if started:  # the app answered before it read the whole body: nothing more to say
                return
            await self._refuse(scope, receive, send, None)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int | None) -> None:
        what = f"{size} bytes" if size is not None else "larger than that"
        msg = f"request body is {what}; the limit is {self.max_bytes} bytes ({self.setting})"
        response = error_response(413, ["body"], msg, "body_too_large", {"Connection": "close"})
        await response(scope, receive, send)
