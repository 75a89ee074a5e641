"""What the API's routes depend on: the shared services of one app, and the authenticated caller."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from producer.api.auth import KeyStore, Principal
from producer.api.locate import ManifestIndex
from producer.api.problems import ApiError
from producer.api.quotas import Quotas
from producer.api.telemetry import ApiMetrics
from producer.client import Client
from producer.contract import JobView
from producer.errors import JobNotFound, UnreadableRecord
from producer.settings import ClientSettings


@dataclass
class Services:
    """Built once per app by ``create_app`` and shared by every request (each is thread-safe)."""

    settings: ClientSettings
    client: Client
    keys: KeyStore
    quotas: Quotas
    metrics: ApiMetrics
    manifests: ManifestIndex  # outputs past the first 1,000 a view lists (GET /v1/jobs/{id}/outputs/{index})
    s3: dict[str, Any] = field(default_factory=dict)  # the readiness probe's boto3 client, made on first use


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]

# auto_error=False: a missing header is our 401 (with WWW-Authenticate), not FastAPI's 403.
_bearer = HTTPBearer(
    auto_error=False,
    bearerFormat="genq_<random>",
    description="An API key from `genq keys create --tenant T`; it decides the tenant of every job.",
)


def strict_query(*allowed: str) -> Callable[[Request], None]:
    """A dependency refusing query parameters the route does not take, and repeated ones (``?a=1&a=2``): every
    parameter of this API takes one value, and ignoring or picking one silently would hide a caller's bug."""

    def check(request: Request) -> None:
        names = [name for name, _ in request.query_params.multi_items()]
        for name in dict.fromkeys(names):
            if name not in allowed:
                known = ", ".join(allowed) or "none"
                raise ApiError(422, ["query", name], f"unknown query parameter {name!r} (known: {known})", "unknown")
            if names.count(name) > 1:
                raise ApiError(422, ["query", name], f"query parameter {name!r} given more than once", "repeated")

    return check


def authenticate(
    services: ServicesDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """The caller, from ``Authorization: Bearer genq_...``; counts the request against the key's rate limit.

    Raises Unauthorized (401) or QuotaExceeded (429, limit ``rate``).
    """
    principal = services.keys.authenticate(credentials.credentials if credentials else None)
    services.quotas.take_request(principal)
    return principal


PrincipalDep = Annotated[Principal, Depends(authenticate)]

JobId = Annotated[
    str,
    Path(
        description="The job's id, as returned when it was created.",
        pattern=r"^[A-Za-z0-9_-]{8,64}$",
        examples=["3f0c9a4e2b7d4a8f9e1c6b5a4d3e2f10"],
    ),
]


def owned_job(job_id: JobId, principal: PrincipalDep, services: ServicesDep) -> JobView:
    """The job, if it belongs to the caller's tenant; every route that names a job reads it through this.

    Another tenant's job is not found (404), never forbidden: a 403 would confirm that the id exists. A record
    genq cannot read names no owner, so the tenant's index decides: its tenant gets 500 ``record_unreadable``
    saying why (the server's fault, permanent for the record's lifetime), anyone else the 404 of an unknown id.
    """
    try:
        view = services.client.status(job_id)
    except UnreadableRecord as exc:
        if not services.client.store.in_tenant_index(principal.tenant, job_id):
            raise _not_found(job_id) from None  # no oracle: exactly what a random id answers
        raise ApiError(500, ["path", "job_id"], str(exc), "record_unreadable") from None
    if view.tenant != principal.tenant:
        raise _not_found(job_id)
    return view


def _not_found(job_id: str) -> JobNotFound:
    return JobNotFound(f"no job {job_id!r} (unknown id, or its record expired)")  # JobStore.get's, word for word


OwnedJob = Annotated[JobView, Depends(owned_job)]


def stream_slot(job: OwnedJob, principal: PrincipalDep, services: ServicesDep) -> str:
    """One of the caller's ``GENQ_API__MAX_STREAMS`` event streams, taken before the stream starts (429 beyond);
    the route gives it back when the stream ends. Taken after the job is found: a 404 holds no slot."""
    return services.quotas.open_stream(principal)


StreamSlot = Annotated[str, Depends(stream_slot)]
