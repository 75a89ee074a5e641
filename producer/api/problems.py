"""HTTP errors of the API: one body shape for every 4xx/5xx, saying which field (or header, or quota) was wrong.

Every error answers ``{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}`` — FastAPI's own validation shape,
so a client parses one format whether pydantic, the catalogue, auth or a quota refused the request.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from producer.api.quotas import retry_after_header
from producer.errors import IdempotencyConflict, InvalidJob, JobEnded, JobNotFound, QuotaExceeded, Unauthorized

log = logging.getLogger("genq.api")

_UNAVAILABLE_RETRY_AFTER_S = 5


class ErrorDetail(BaseModel):
    """One thing wrong with a request."""

    loc: list[str | int]  # where: ["body", "count"], ["header", "Authorization"], ["quota", "images_per_day"]
    msg: str  # what was wrong and what to do
    type: str  # a stable, machine-readable kind: missing, int_parsing, invalid_job, quota_exceeded, ...


class ErrorBody(BaseModel):
    """The body of every error response."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "detail": [
                        {
                            "loc": ["body", "label"],
                            "msg": "unknown label 'hat' for model 'fmnist-cgan' (known: tshirt, trouser, ...)",
                            "type": "invalid_job",
                        }
                    ]
                }
            ]
        }
    )

    detail: list[ErrorDetail]


class ApiError(Exception):
    """An error response a route raises directly (status, where, what)."""

    def __init__(
        self, status: int, loc: list[str | int], msg: str, type_: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(msg)
        self.status, self.loc, self.msg, self.type, self.headers = status, loc, msg, type_, headers


def error_response(
    status: int, loc: list[str | int], msg: str, type_: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody(detail=[ErrorDetail(loc=loc, msg=msg, type=type_)])
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "required": True, "schema": {"type": "string"}}


_RETRY_AFTER = {"Retry-After": _header("Seconds to wait before trying again.")}

# OpenAPI descriptions of the error statuses, for the ``responses=`` of routes.
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorBody,
        "description": "No API key, or an unknown one.",
        "headers": {"WWW-Authenticate": _header("Bearer")},
    },
    429: {"model": ErrorBody, "description": "Rate limit or a quota of the key used up.", "headers": _RETRY_AFTER},
}
INVALID: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorBody, "description": "A field is invalid; `loc` names it."},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such job for this tenant (or its record expired)."},
}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorBody, "description": "Redis or the broker is unreachable.", "headers": _RETRY_AFTER},
}
ENDED: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "The job already ended; `msg` names its status."},
}
SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The body is not UTF-8 text."},
    409: {"model": ErrorBody, "description": "The idempotency key was used for a different request."},
    413: {"model": ErrorBody, "description": "The body is larger than `GENQ_API__MAX_BODY_BYTES`."},
}


def as_json(responses: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """The same error responses, declared as ``application/json`` whatever the route's own media type (SSE)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status, spec in responses.items():
        spec = dict(spec)
        model = spec.pop("model", None)
        if model is not None:
            spec["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
        out[status] = spec
    return out


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in the :class:`ErrorBody` shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.loc, exc.msg, exc.type, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's shape, without "input" (it can echo a 64 KiB body back) and "ctx".
        details = [
            ErrorDetail(loc=list(e.get("loc", ())), msg=str(e.get("msg", "")), type=str(e.get("type", "invalid")))
            for e in exc.errors()
        ]
        return JSONResponse(ErrorBody(detail=details).model_dump(mode="json"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette lists the methods of the first route matching the path only; /v1/jobs has two routes.
            headers["Allow"] = ", ".join(_allowed_methods(request))
            return error_response(405, ["method"], f"{request.method} is not allowed here", "http_error", headers)
        if exc.status_code == 413:  # a body past its limit, found while it was read (producer.api.app.BodyLimit)
            return error_response(413, ["body"], str(exc.detail), "body_too_large", headers)
        if exc.status_code == 400:  # FastAPI's only 400: a body it cannot decode at all (not UTF-8)
            msg = "the body could not be read: send UTF-8 JSON"
            return error_response(400, ["body"], msg, "body_unreadable", headers)
        loc: list[str | int] = ["path"] if exc.status_code == 404 else ["request"]
        return error_response(exc.status_code, loc, str(exc.detail), "http_error", headers)

    @app.exception_handler(InvalidJob)
    async def _invalid_job(request: Request, exc: InvalidJob) -> JSONResponse:
        # "counts.<label>" -> ["body", "counts", "<label>"], like pydantic's locations (a label may hold dots).
        field = exc.field.split(".", 1) if exc.field else []
        msg = str(exc).removeprefix(f"{exc.field}: ") if exc.field else str(exc)
        return error_response(422, ["body", *field], msg, "invalid_job")

    @app.exception_handler(JobNotFound)
    async def _not_found(request: Request, exc: JobNotFound) -> JSONResponse:
        return error_response(404, ["path", "job_id"], str(exc), "not_found")

    @app.exception_handler(JobEnded)
    async def _ended(request: Request, exc: JobEnded) -> JSONResponse:
        return error_response(409, ["path", "job_id"], str(exc), "job_ended")

    @app.exception_handler(IdempotencyConflict)
    async def _conflict(request: Request, exc: IdempotencyConflict) -> JSONResponse:
        return error_response(409, ["header", "Idempotency-Key"], str(exc), "idempotency_conflict")

    @app.exception_handler(Unauthorized)
    async def _unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
        challenge = 'Bearer realm="genq"' if "missing" in str(exc) else 'Bearer realm="genq", error="invalid_token"'
        headers = {"WWW-Authenticate": challenge}
        return error_response(401, ["header", "Authorization"], str(exc), "unauthorized", headers)

    @app.exception_handler(QuotaExceeded)
    async def _quota(request: Request, exc: QuotaExceeded) -> JSONResponse:
        headers = {"Retry-After": retry_after_header(exc.retry_after_s)}
        return error_response(429, ["quota", exc.limit], str(exc), "quota_exceeded", headers)

    async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("%s %s: dependency unavailable: %s", request.method, request.url.path, exc)
        headers = {"Retry-After": str(_UNAVAILABLE_RETRY_AFTER_S)}
        msg = f"Redis or the broker is unavailable ({type(exc).__name__}); try again shortly"
        return error_response(503, ["redis"], msg, "unavailable", headers)

    app.add_exception_handler(redis.RedisError, _unavailable)
    try:  # the broker client (kombu) wraps Redis connection errors in its own type
        from kombu.exceptions import OperationalError

        app.add_exception_handler(OperationalError, _unavailable)
    except ImportError:  # pragma: no cover - kombu comes with celery, a dependency
        pass


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)
