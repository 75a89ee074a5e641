"""The ``/v1`` routes of fine-tuning: upload a data set archive, create a fine-tune job.

A fine-tune is then a job like any other: ``GET /v1/jobs/{id}`` (its ``training`` field has step, losses, the
latest sample grid and, once done, the published version), its events, cancel. The data set lives under the
caller's tenant prefix, so a job can only train on its own tenant's uploads, and the model it publishes is the
tenant's own (``producer.core.resolve.resolve_finetune``): a system model's name is refused, another tenant's names
another model.

Uploads are metered and expire: each is recorded in its key's ledger (``producer.api.quotas``) with its size and
expiry before a byte is stored, a key stores at most ``dataset_bytes`` at once, and the uploads past their expiry are
deleted from object storage, their bytes given back, whenever the key next uploads or lists its data sets (an S3
lifecycle rule on ``tenants/*/datasets/`` deletes those of keys that never come back; see docs/operations.md).
"""

from __future__ import annotations

import logging
import tempfile
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, BinaryIO, cast

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from producer.api.auth import Principal
from producer.api.deps import PrincipalDep, Services, ServicesDep, strict_query
from producer.api.problems import INVALID, SUBMIT_ERRORS, UNAUTHORIZED, UNAVAILABLE, ApiError, ErrorBody
from producer.api.routes import submit_with_quota, with_idempotency_header
from producer.contract import FINETUNE_EXAMPLE, FineTuneRequest, JobView
from producer.core.resolve import dataset_prefix
from producer.core.s3 import make_s3_client
from producer.errors import InvalidJob
from producer.uploads import check_archive_name

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger("genq.api")

router = APIRouter(prefix="/v1", responses={**UNAUTHORIZED, **UNAVAILABLE})
DATASETS_PATH = "/v1/datasets"
_SPOOL_BYTES = 8 * 2**20  # uploads larger than this are spooled to disk, not held in memory

_FINETUNE_EXAMPLES = {
    "new classes": {
        "summary": "Adapt fmnist-cgan to an uploaded folder, promote when label consistency >= 0.8",
        "value": FINETUNE_EXAMPLE,
    }
}


class DatasetUpload(BaseModel):
    """An uploaded data set: put ``dataset`` into a fine-tune request."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"dataset": "3f2a9c0e1b/data.zip", "bytes": 52311}]})

    dataset: str = Field(description="Reference for `FineTuneRequest.dataset`.")
    bytes: int
    expires_at: datetime | None = Field(
        default=None, description="When the upload is deleted (`GENQ_API__DATASET_TTL_S` after it was made)."
    )


class DatasetList(BaseModel):
    """The caller's key's uploads that have not expired, and its data set quota."""

    datasets: list[DatasetUpload] = Field(description="Soonest to expire first.")
    used_bytes: int = Field(description="Bytes the uploads take from the key's quota.")
    limit_bytes: int = Field(description="The key's most bytes of data sets stored at once.")


@router.post(
    "/datasets",
    status_code=201,
    response_model=DatasetUpload,
    summary="Upload a data set archive",
    dependencies=[Depends(strict_query("filename"))],
    responses={
        413: {"description": "The archive is larger than `GENQ_API__MAX_DATASET_BYTES`."},
        429: {"model": ErrorBody, "description": "The key's data sets would pass its `dataset_bytes` quota."},
        **INVALID,
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload_dataset(
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    filename: Annotated[
        str, Query(min_length=1, max_length=128, description="e.g. data.zip; .zip, .tar, .tar.gz, .tgz or .npz")
    ],
) -> DatasetUpload:
    """Store the body (one .zip/.tar/.tar.gz/.tgz/.npz: one folder per class inside) for the caller's fine-tunes.

    The archive is checked when a job uses it (paths escaping the folder, links, bombs and corrupt images are
    refused or skipped with reasons in the job's view); this call only stores it under the tenant's prefix.
    It counts against the key's `dataset_bytes` quota (429 naming `["quota", "dataset_bytes"]` when it would pass
    it; nothing is stored) until it expires, `GENQ_API__DATASET_TTL_S` after the upload, and is deleted.
    """
    try:
        check_archive_name(filename)
    except InvalidJob as exc:  # before reading a byte of the body
        raise ApiError(422, ["query", "filename"], str(exc), "invalid_filename") from exc
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
        async for chunk in request.stream():
            spool.write(chunk)
        if spool.tell() == 0:
            raise ApiError(422, ["body"], "the body is empty: send the archive's bytes", "empty_body")
        return await run_in_threadpool(_store, services, principal, cast(BinaryIO, spool), filename)


@router.get(
    "/datasets",
    response_model=DatasetList,
    summary="List the data sets uploaded with this key",
    dependencies=[Depends(strict_query())],
)
def list_datasets(principal: PrincipalDep, services: ServicesDep) -> DatasetList:
    """The uploads made with the caller's key that have not expired, and how much of its quota they take."""
    _delete_expired(services, principal, time.time())
    stored, used = services.quotas.datasets(principal)
    return DatasetList(
        datasets=[
            DatasetUpload(dataset=d.reference, bytes=d.bytes, expires_at=datetime.fromtimestamp(d.expires_at, UTC))
            for d in stored
        ],
        used_bytes=used,
        limit_bytes=principal.key.quotas.dataset_bytes or services.settings.api.dataset_bytes,
    )


def _store(services: Services, principal: Principal, fileobj: BinaryIO, filename: str) -> DatasetUpload:
    """Take the upload's bytes from the key's quota, then store it; the quota is given back if storing fails."""
    _delete_expired(services, principal, time.time())  # what expired frees its bytes before this upload is counted
    meter = services.quotas.dataset_meter(principal)
    upload = services.client.upload_dataset_file(fileobj, filename, meter=meter)  # QuotaExceeded: nothing stored
    expires_at = datetime.fromtimestamp(upload.expires_at, UTC) if upload.expires_at is not None else None
    return DatasetUpload(dataset=upload.dataset, bytes=upload.bytes, expires_at=expires_at)


def _delete_expired(services: Services, principal: Principal, now: float) -> None:
    """Delete the key's expired uploads from object storage and give their bytes back to its quota.

    Best effort: objects S3 did not delete stay counted and are tried again on the key's next upload or listing.
    """
    expired = services.quotas.expired_datasets(principal, now)
    if not expired:
        return
    prefix = dataset_prefix(principal.tenant)
    try:
        answer = _s3(services).delete_objects(
            Bucket=services.settings.s3.bucket,
            Delete={"Objects": [{"Key": prefix + r} for r in expired], "Quiet": True},
        )
    except Exception as exc:  # S3 unreachable: the upload or listing goes on, the expired ones wait for a later try
        log.warning("deleting %d expired data sets of tenant %s failed: %s", len(expired), principal.tenant, exc)
        return
    failed = {e.get("Key", "").removeprefix(prefix) for e in answer.get("Errors", [])}
    if failed:
        log.warning("S3 kept %d expired data sets of tenant %s; tried again later", len(failed), principal.tenant)
    deleted = [r for r in expired if r not in failed]
    freed = services.quotas.forget_datasets(principal, deleted)
    log.info("deleted %d expired data sets of tenant %s (%d bytes freed)", len(deleted), principal.tenant, freed)


def _s3(services: Services) -> S3Client:
    """The API's S3 client for data sets, made on first use (boto3's own retries: the API has no window of its own)."""
    client = services.s3.get("datasets")
    if client is None:
        client = services.s3["datasets"] = make_s3_client(attempts=5)
    return cast("S3Client", client)


@router.post(
    "/finetunes",
    status_code=202,
    response_model=JobView,
    summary="Create a fine-tune job",
    dependencies=[Depends(strict_query())],
    response_description="Queued: the new job (its `Location` header is the job's URL).",
    responses={
        200: {"model": JobView, "description": "Replayed: the job an earlier request with this key created."},
        **SUBMIT_ERRORS,
        **INVALID,
    },
)
def create_finetune(
    principal: PrincipalDep,
    services: ServicesDep,
    response: Response,
    request: Annotated[FineTuneRequest, Body(openapi_examples=_FINETUNE_EXAMPLES)],
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", min_length=1, max_length=128, description="As for POST /v1/jobs."),
    ] = None,
) -> JobView:
    """Queue a fine-tune of a cGAN on an uploaded data set (202); it runs on training workers (`-Q train`).

    Progress (step, losses, ETA, sample grids) comes through `GET /v1/jobs/{id}`, its events and callbacks; when it
    succeeds, `training.model` names the published version, servable at once by `POST /v1/jobs`.

    `base` is a system model or one of the tenant's own; `name` is published as the tenant's own model, seen and
    used by this tenant only: a system model's name is refused (422, read-only), and the aliases that move (`latest`,
    the gate's) are that model's. A `gate` must set at least one threshold (an empty one is refused).
    """
    request = with_idempotency_header(request, idempotency_key)
    view, replayed = submit_with_quota(
        lambda admit: services.client.submit_finetune(request, principal.tenant, admit=admit),
        lambda job: services.quotas.admit(principal, job),  # training images, a fine-tune slot, a queued slot
        services,
        idempotency_key,
    )
    if replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{view.id}"
    return view
