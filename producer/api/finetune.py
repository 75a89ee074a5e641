"""The ``/v1`` routes of fine-tuning: upload a data set archive, create a fine-tune job.

A fine-tune is then a job like any other: ``GET /v1/jobs/{id}`` (its ``training`` field has step, losses, the
latest sample grid and, once done, the published version), its events, cancel. The data set lives under the
caller's tenant prefix, so a job can only train on its own tenant's uploads, and the model it publishes is the
tenant's own (``producer.core.resolve.resolve_finetune``): a system model's name is refused, another tenant's names
another model.
"""

from __future__ import annotations

import tempfile
from typing import Annotated, BinaryIO, cast

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from producer.api.deps import PrincipalDep, ServicesDep, strict_query
from producer.api.problems import INVALID, SUBMIT_ERRORS, UNAUTHORIZED, UNAVAILABLE, ApiError
from producer.api.routes import submit_with_quota, with_idempotency_header
from producer.contract import FINETUNE_EXAMPLE, FineTuneRequest, JobView
from producer.errors import InvalidJob
from producer.uploads import check_archive_name

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


@router.post(
    "/datasets",
    status_code=201,
    response_model=DatasetUpload,
    summary="Upload a data set archive",
    dependencies=[Depends(strict_query("filename"))],
    responses={
        413: {"description": "The archive is larger than `GENQ_API__MAX_DATASET_BYTES`."},
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
        fileobj = cast(BinaryIO, spool)
        upload = await run_in_threadpool(services.client.upload_dataset_file, fileobj, filename, principal.tenant)
    return DatasetUpload(dataset=upload.dataset, bytes=upload.bytes)


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
