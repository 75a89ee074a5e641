"""The ``/v1`` route of a tenant's webhook signing secret: rotate it (the new one is shown once).

A tenant's secret is made with its first API key (``genq keys create`` shows it). Rotating keeps the old secret
signing alongside the new one for ``overlap_hours``: callbacks carry both signatures meanwhile, so a receiver can
deploy the new secret without refusing a callback.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Body, Depends
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from producer.api.deps import PrincipalDep, ServicesDep, strict_query
from producer.api.problems import INVALID, SUBMIT_ERRORS, UNAUTHORIZED, UNAVAILABLE
from producer.contract import NotBool
from producer.core.callbacks.secrets import TenantSecrets

router = APIRouter(prefix="/v1", responses={**UNAUTHORIZED, **UNAVAILABLE})


class Rotation(BaseModel):
    """How long the old secret keeps signing after a rotation."""

    model_config = ConfigDict(extra="forbid")

    overlap_hours: Annotated[float, NotBool] = Field(
        default=24.0, ge=0, le=24 * 30, description="0 stops the old secret at once; at most 30 days."
    )


class RotatedSecret(BaseModel):
    """The tenant's new signing secret, shown only in this answer."""

    secret: str = Field(description="The `whsec_` secret that signs the tenant's callbacks from now on.")
    previous_valid_until: datetime | None = Field(
        description="Until when callbacks also carry a signature by the previous secret (null: none)."
    )


@router.post(
    "/webhook-secret/rotate",
    response_model=RotatedSecret,
    summary="Rotate the tenant's webhook signing secret",
    dependencies=[Depends(strict_query())],
    responses={
        400: SUBMIT_ERRORS[400],
        413: SUBMIT_ERRORS[413],
        **INVALID,
    },
)
async def rotate_webhook_secret(
    principal: PrincipalDep,
    services: ServicesDep,
    rotation: Annotated[Rotation, Body()] = Rotation(),  # noqa: B008 - frozen defaults, read only
) -> RotatedSecret:
    """A new secret for the caller's tenant; the previous one keeps signing for `overlap_hours` (default 24)."""
    secrets = TenantSecrets(services.client.redis)
    rotated = await run_in_threadpool(secrets.rotate, principal.tenant, timedelta(hours=rotation.overlap_hours))
    return RotatedSecret(secret=rotated.current, previous_valid_until=rotated.previous_until)
