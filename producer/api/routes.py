"""The ``/v1`` routes: submit, read, list, follow and cancel jobs, their callback deliveries, and the model catalogue.

Every route authenticates (Bearer key -> tenant) and sees only the tenant's jobs. Bodies and views are the
contract's pydantic models (``GenerateRequest`` in, ``JobView`` out): the same ones the Python client uses.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import APIRouter, Body, Depends, Header, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, ConfigDict, Field

from producer.api.auth import Principal
from producer.api.deps import OwnedJob, PrincipalDep, Services, ServicesDep, StreamSlot, strict_query
from producer.api.problems import (
    ENDED,
    INVALID,
    NOT_FOUND,
    SUBMIT_ERRORS,
    UNAUTHORIZED,
    UNAVAILABLE,
    ApiError,
    ErrorBody,
    as_json,
)
from producer.api.quotas import Reservation
from producer.contract import FineTuneRequest, GenerateRequest, JobStatus, JobView, ModelEntry
from producer.errors import IdempotencyConflict, InvalidJob, JobNotFound

_KEEPALIVE_S = 2.0  # a quiet event stream sends a comment this often

router = APIRouter(prefix="/v1", responses={**UNAUTHORIZED, **UNAVAILABLE})
_NO_QUERY = [Depends(strict_query())]

MAX_PAGE = 100
_REQUEST_EXAMPLES = {
    "one label": {
        "summary": "8 sneakers with a fixed seed",
        "value": {"model": "fmnist-cgan", "label": "sneaker", "count": 8, "seed": 42, "format": "png"},
    },
    "several labels with a callback": {
        "summary": "3 bags and 2 t-shirts, events POSTed to a webhook",
        # A host that does not resolve is refused at submit (the SSRF guard): the reader puts their receiver's.
        "description": "Replace YOUR-RECEIVER with your webhook receiver's host: callback URLs are checked at submit, "
        "and a host that does not resolve, or resolves to a private address, is refused (422).",
        "value": {
            "model": "fmnist-cgan@1",
            "counts": {"bag": 3, "tshirt": 2},
            "callback": {"url": "https://YOUR-RECEIVER/hooks/genq", "events": ["succeeded", "failed"]},
            "metadata": {"sku": "BAG-7"},
        },
    },
}


_JOB_EXAMPLE = {
    "id": "3b1ba29b66c042218b3b9f594b3e15f2",
    "kind": "generate",
    "tenant": "acme",
    "status": "queued",
    "priority": "normal",
    "model": "fmnist-cgan",
    "model_version": "fmnist-cgan@1",
    "seed": 42,
    "progress": {"done": 0, "total": 8},
    "outputs": [],
    "manifest_key": None,
    "error": None,
    "metadata": {},
    "created_at": "2026-01-01T12:00:00Z",
    "started_at": None,
    "finished_at": None,
}
_JOB_CONTENT = {"application/json": {"example": _JOB_EXAMPLE}}


class JobPage(BaseModel):
    """One page of a tenant's jobs, newest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [], "next_cursor": None}]})

    items: list[JobView]
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` for the next page; null when there is none."
    )


class DeliveryAttempt(BaseModel):
    """One attempt to POST a callback event (extra fields may be added by newer workers)."""

    model_config = ConfigDict(extra="allow")

    msg_id: str
    type: str
    url: str
    ok: bool
    status_code: int | None = None
    error: str | None = None
    duration_ms: float | None = None
    at: str


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobView,
    summary="Create a generate job",
    dependencies=_NO_QUERY,
    response_description="Queued: the new job (its `Location` header is the job's URL).",
    responses={
        202: {"content": _JOB_CONTENT},
        200: {
            "model": JobView,
            "description": "Replayed: the job an earlier request with this idempotency key created.",
            "headers": {"Idempotent-Replayed": {"description": "Always `true`.", "schema": {"type": "string"}}},
        },
        **SUBMIT_ERRORS,
        **INVALID,
    },
)
def create_job(
    principal: PrincipalDep,
    services: ServicesDep,
    response: Response,
    request: Annotated[GenerateRequest, Body(openapi_examples=_REQUEST_EXAMPLES)],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=128,
            description="Same key and body -> the same job (200, `Idempotent-Replayed: true`); "
            "same key, other body -> 409. Or give `idempotency_key` in the body.",
        ),
    ] = None,
) -> JobView:
    """Validate the request against the model catalogue, the limits and the key's quotas, then queue it (202).

    Nothing is enqueued when any check fails; the error's `loc` names the field.
    """
    request = with_key_provenance(with_idempotency_header(request, idempotency_key), principal)
    view, replayed = submit_with_quota(
        lambda admit: services.client.submit(request, principal.tenant, admit=admit),
        lambda job: services.quotas.admit(principal, job),
        services,
        idempotency_key,
    )
    if replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    else:
        services.metrics.jobs_submitted.labels((view.model_version or view.model).split("@", 1)[0]).inc()
    response.headers["Location"] = f"/v1/jobs/{view.id}"
    return services.client.with_urls(view)  # a replayed job may have ended: its outputs too


Body_ = TypeVar("Body_", GenerateRequest, FineTuneRequest)


def with_key_provenance(request: GenerateRequest, principal: Principal) -> GenerateRequest:
    """The request with the provenance its key requires: a key with ``provenance: c2pa`` signs every job, so a
    request that leaves the field out gets c2pa and one that asks for ``xmp`` is refused (422 at ``provenance``)."""
    required = principal.key.quotas.provenance
    if required is None or request.provenance == required:
        return request
    if "provenance" in request.model_fields_set:
        raise InvalidJob(
            f"this API key requires provenance {required!r} (signed Content Credentials) for every job, not "
            f"{request.provenance!r}; leave the field out or set it to {required!r}",
            field="provenance",
        )
    return request.model_copy(update={"provenance": required})


def with_idempotency_header(request: Body_, header: str | None) -> Body_:
    """The request with the ``Idempotency-Key`` header as its key; 422 when the body names another one."""
    if header is None:
        return request
    if request.idempotency_key not in (None, header):
        raise ApiError(
            422,
            ["header", "Idempotency-Key"],
            "the Idempotency-Key header and the body's idempotency_key differ; give one of them",
            "idempotency_mismatch",
        )
    return request.model_copy(update={"idempotency_key": header})


def submit_with_quota(
    submit: Callable[[Callable[[Any], None]], JobView],
    reserve: Callable[[Any], Reservation],
    services: Services,
    idempotency_key: str | None,
) -> tuple[JobView, bool]:
    """Submit, taking quota at admission (``reserve(job)``) and giving it back if recording or enqueueing fails.

    Returns (view, replayed): ``replayed`` is True when an idempotency key answered an earlier job (admission
    never ran). A key reused with another body is 409, located at the header or the body field that carried it.
    """
    taken: list[Reservation] = []
    try:
        view = submit(lambda job: taken.append(reserve(job)))
    except IdempotencyConflict as exc:
        loc: list[str | int] = ["header", "Idempotency-Key"] if idempotency_key else ["body", "idempotency_key"]
        raise ApiError(409, loc, str(exc), "idempotency_conflict") from exc
    except BaseException:
        for reservation in taken:  # admitted, then recording or enqueueing failed: give the quota back
            services.quotas.refund(reservation)
        raise
    return view, not taken


_UNREADABLE: dict[int | str, dict[str, Any]] = {
    500: {
        "model": ErrorBody,
        "description": "The job's record cannot be read (`type` `record_unreadable`): written by an older version or "
        "a bug, and kept for the operator. Permanent for the record's lifetime: retrying does not help.",
    },
}


@router.get(
    "/jobs/{job_id}",
    response_model=JobView,
    summary="Get a job",
    dependencies=_NO_QUERY,
    responses={200: {"content": _JOB_CONTENT}, **NOT_FOUND, **INVALID, **_UNREADABLE},
)
def get_job(job: OwnedJob, services: ServicesDep) -> JobView:
    """The job's current view: status, progress, outputs (keys, sha256 and URLs), error.

    Each output's `url` is made for this read: a SigV4 presigned GET living `GENQ_S3__PRESIGN_EXPIRES_S`, or
    `<GENQ_S3__PUBLIC_BASE_URL>/<key>`; read the view again for fresh ones. The outputs of one WebDataset tar share
    its URL (`member` names the file in it). `GET /v1/jobs/{id}/outputs/{index}` redirects to the same.

    A job whose record genq cannot read (written by an older version or a bug) answers 500 with `type`
    `record_unreadable` to its tenant: the server's fault, like gRPC's DATA_LOSS, and permanent, so no `Retry-After`
    (503 is the status to retry). Its tenant's list leaves it out. Another tenant gets the 404 of an unknown id. So do
    the job's other routes (cancel, events, deliveries, outputs, manifest).
    """
    return services.client.with_urls(job)


_CANCELED_CONTENT = {"application/json": {"example": {**_JOB_EXAMPLE, "status": "canceled"}}}


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobView,
    summary="Cancel a job",
    dependencies=_NO_QUERY,
    responses={200: {"content": _CANCELED_CONTENT}, **NOT_FOUND, **ENDED, **INVALID, **_UNREADABLE},
)
def cancel_job(job: OwnedJob, principal: PrincipalDep, services: ServicesDep) -> JobView:
    """Cancel a queued or running job: a queued job never starts, a running one stops after its current batch.

    Answers the canceled job; its `outputs` list what was stored so far (the batch in flight is added when it
    lands). A `canceled` callback event is sent. 409 if the job already ended (the message names its status).
    """
    return services.client.with_urls(services.client.cancel(job.id, principal.tenant))


def _encode_cursor(position: tuple[float, str]) -> str:
    return base64.urlsafe_b64encode(f"{position[0]!r}:{position[1]}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        score, _, job_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().partition(":")
        position = float(score)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        position, job_id = math.nan, ""
    if not math.isfinite(position) or not job_id:  # "nan:x" parses as a float, and Redis refuses it as a score
        raise ApiError(422, ["query", "cursor"], "not a cursor this API returned", "invalid_cursor")
    return position, job_id


@router.get(
    "/jobs",
    response_model=JobPage,
    summary="List jobs",
    dependencies=[Depends(strict_query("status", "model", "limit", "cursor"))],
    responses=INVALID,
)
def list_jobs(
    principal: PrincipalDep,
    services: ServicesDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
    model: Annotated[
        str | None, Query(max_length=140, description="Only jobs of this model (`name` or `name@version`).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Jobs per page.")] = 20,
    cursor: Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page.")] = None,
) -> JobPage:
    """The tenant's jobs, newest first. With a filter a page may hold fewer than `limit` jobs (even none) and
    still have a `next_cursor`: keep going until it is null. A job whose record cannot be read is left out (its
    `GET` says why). Listed jobs name their outputs by key and sha256 only (`url` null: a page of 100 jobs could
    hold 100,000 outputs); `GET /v1/jobs/{id}` gives their URLs."""
    after = _decode_cursor(cursor) if cursor else None
    views, position = services.client.store.page(principal.tenant, limit, after=after, status=status, model=model)
    return JobPage(items=views, next_cursor=_encode_cursor(position) if position else None)


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    summary="Follow a job (Server-Sent Events)",
    dependencies=_NO_QUERY,
    responses=as_json({**UNAUTHORIZED, **UNAVAILABLE, **NOT_FOUND, **INVALID, **_UNREADABLE}),
)
async def job_events(
    job: OwnedJob, principal: PrincipalDep, services: ServicesDep, stream: StreamSlot
) -> AsyncIterator[ServerSentEvent]:
    """A `job` event with the job view whenever it changes (status, progress, outputs); the stream ends after
    the event with a terminal status (`succeeded`, `failed`, `canceled`). Outputs carry URLs made when the event is
    sent, as in `GET /v1/jobs/{id}` (a URL alone never makes an event). A comment line keeps a quiet stream alive
    every few seconds. A key holds at most `GENQ_API__MAX_STREAMS` streams at once (429 beyond)."""
    poll_s = services.settings.api.events_poll_s
    view: JobView | None = job
    last = ""
    seq = 0
    sent = kept = time.monotonic()
    try:
        while view is not None:
            current = view.model_dump_json()  # without URLs: a fresh signature is no change
            if current != last:
                last, seq, sent = current, seq + 1, time.monotonic()
                if view.outputs or view.sheet_key:  # up to 1,000 URLs: a few milliseconds, off the event loop
                    current = (await run_in_threadpool(services.client.with_urls, view)).model_dump_json()
                yield ServerSentEvent(raw_data=current, event="job", id=str(seq))
            elif time.monotonic() - sent >= _KEEPALIVE_S:
                # A write is how a stream learns its client left: a quiet one would hold its slot until the job ends.
                sent = time.monotonic()
                yield ServerSentEvent(comment="keepalive")
            if view.status.is_terminal():
                return
            await asyncio.sleep(poll_s)
            if time.monotonic() - kept > _KEEPALIVE_S:
                await run_in_threadpool(services.quotas.keep_stream, principal, stream)
                kept = time.monotonic()
            try:
                view = await run_in_threadpool(services.client.status, job.id)
            except JobNotFound:  # the record expired while followed: nothing more will happen
                view = None
    finally:
        with anyio.CancelScope(shield=True):  # a stream closed by its client is cancelled: still give the slot back
            await run_in_threadpool(services.quotas.close_stream, principal, stream)


@router.get(
    "/jobs/{job_id}/deliveries",
    response_model=list[DeliveryAttempt],
    summary="List a job's callback deliveries",
    dependencies=_NO_QUERY,
    responses={**NOT_FOUND, **INVALID, **_UNREADABLE},
)
def job_deliveries(job: OwnedJob, services: ServicesDep) -> list[dict[str, Any]]:
    """Every attempt to deliver a callback event of the job, oldest first."""
    return services.client.deliveries(job.id)


@router.get(
    "/models", response_model=list[ModelEntry], summary="List models", dependencies=_NO_QUERY, responses=INVALID
)
def list_models(principal: PrincipalDep, services: ServicesDep) -> list[ModelEntry]:
    """The models this key may use: versions (with their classes) and aliases (`latest`, ...).

    The system's models (`owner` null: shipped and operator-published, read-only) and the key's tenant's own
    fine-tuned ones; another tenant's models are never listed, nor usable by name.
    """
    return list(services.client.visible_models(principal.tenant).values())
