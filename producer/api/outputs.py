"""A job's stored objects over HTTP: ``GET /v1/jobs/{id}/outputs/{index}``, ``GET /v1/jobs/{id}/manifest`` and
``GET /v1/jobs/{id}/sheet`` answer 307 to a URL of the object made for the request (presigned, or under
``GENQ_S3__PUBLIC_BASE_URL``), for the job's tenant only; the manifest of a job that stores none (one image, no
renditions) is answered from its record (200). Where an output lies is :mod:`producer.api.locate`'s.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from fastapi.responses import RedirectResponse, Response

from producer.api.deps import OwnedJob, ServicesDep, strict_query
from producer.api.locate import StoredObject, find_output
from producer.api.problems import INVALID, NOT_FOUND, UNAUTHORIZED, UNAVAILABLE, ApiError, ErrorBody
from producer.contract import JobStatus, Manifest

router = APIRouter(prefix="/v1", responses={**UNAUTHORIZED, **UNAVAILABLE})
_NO_QUERY = [Depends(strict_query())]

MEMBER_HEADER = "Genq-Member"
# The URL is short-lived and the tenant's own: never kept by a shared cache.
_NO_STORE = {"Cache-Control": "private, no-store"}


def _redirect(url: str, headers: dict[str, str] | None = None) -> RedirectResponse:
    return RedirectResponse(url, status_code=307, headers={**_NO_STORE, **(headers or {})})


def _location(description: str) -> dict[str, Any]:
    return {"description": description, "required": True, "schema": {"type": "string", "format": "uri"}}


OutputIndex = Annotated[
    int,
    Path(
        ge=0,
        description="The output's `index` (0 to the job's image count - 1), as its view and manifest list it.",
        examples=[0],
    ),
]


@router.get(
    "/jobs/{job_id}/outputs/{index}",
    status_code=307,
    response_class=RedirectResponse,
    summary="Fetch an output",
    dependencies=_NO_QUERY,
    responses={
        307: {
            "description": "To a fresh URL of the output's object; follow it without the `Authorization` header "
            "(HTTP clients drop it on a redirect to another host).",
            "headers": {
                "Location": _location(
                    "A SigV4 presigned GET URL living `GENQ_S3__PRESIGN_EXPIRES_S`, or "
                    "`<GENQ_S3__PUBLIC_BASE_URL>/<key>`."
                ),
                MEMBER_HEADER: {
                    "description": "WebDataset output only: the output's file inside the tar the URL fetches.",
                    "schema": {"type": "string"},
                },
            },
        },
        404: {
            "model": ErrorBody,
            "description": "No such job for this tenant (`loc` names `job_id`); or, `loc` naming `index`, an index "
            "past the job's images (`type` `output_not_found`) or an output not stored (`output_not_stored`: the job "
            "has not ended, or ended without it).",
        },
        500: {
            "model": ErrorBody,
            "description": "The job's record (`record_unreadable`) or, for an output past the first 1,000 its view "
            "lists, its manifest (`manifest_unreadable`) cannot be read. Permanent: retrying does not help.",
        },
        **INVALID,
    },
)
def get_output(job: OwnedJob, index: OutputIndex, services: ServicesDep) -> RedirectResponse:
    """Redirect (307) to the output's stored object, with a URL made for this request: its bytes are the ones whose
    `sha256` the view lists.

    An output is listed, and served here, once the job ends (`succeeded`, or what a `failed` or `canceled` job stored).
    With WebDataset output the object is the shard's tar, and the `Genq-Member` header names the output's file in
    it. Another tenant's job answers the 404 of an unknown id.
    """

    def from_manifest(manifest_key: str, at: int) -> StoredObject | None:
        try:
            return services.manifests.output(manifest_key, at)
        except KeyError:
            msg = f"output {at} of job {job.id} is listed by its manifest only, and the manifest is gone from storage"
            raise ApiError(404, ["path", "index"], msg, "output_not_stored") from None
        except ValueError as exc:  # a manifest genq did not write: the server's fault, and permanent
            raise ApiError(500, ["path", "job_id"], str(exc), "manifest_unreadable") from None

    found = find_output(job, index, from_manifest)
    member = {MEMBER_HEADER: found.member} if found.member is not None else None
    return _redirect(services.client.urls.url(found.key), member)


_NO_MANIFEST: dict[int | str, dict[str, Any]] = {
    409: {
        "model": ErrorBody,
        "description": "The job has no manifest (`type` `manifest_not_written`): it is queued or running (the "
        "manifest is written when it succeeds), or it failed or was canceled (only a succeeded job has one).",
    },
}


@router.get(
    "/jobs/{job_id}/manifest",
    status_code=307,
    response_class=RedirectResponse,
    summary="Fetch a job's manifest",
    dependencies=_NO_QUERY,
    responses={
        200: {
            "model": Manifest,
            "description": "The manifest itself, for a job of one image without renditions: such a job stores its "
            "image alone, and its manifest is made from its record (the document a stored one would be).",
        },
        307: {
            "description": "To a fresh URL of the job's `manifest.json` (every output's label, seed, key, member, "
            "sha256); follow it without the `Authorization` header.",
            "headers": {
                "Location": _location(
                    "A SigV4 presigned GET URL living `GENQ_S3__PRESIGN_EXPIRES_S`, or "
                    "`<GENQ_S3__PUBLIC_BASE_URL>/<key>`."
                )
            },
        },
        **NOT_FOUND,
        **_NO_MANIFEST,
        500: {
            "model": ErrorBody,
            "description": "The job's record cannot be read (`record_unreadable`); permanent: retrying does not help.",
        },
        **INVALID,
    },
)
def get_manifest(job: OwnedJob, services: ServicesDep) -> Response:
    """Redirect (307) to the job's manifest, with a URL made for this request; or, for a job of one image without
    renditions, which stores no manifest.json, answer it (200) from the job's record.

    Only a succeeded job has one: a queued or running job answers 409 (`manifest_not_written`; retry once it
    succeeded), and so does a failed or canceled one (its view lists what it stored). A fine-tune has none (404).
    Another tenant's job answers the 404 of an unknown id.
    """
    if job.kind != "generate":
        raise ApiError(404, ["path", "job_id"], f"job {job.id} is a fine-tune: it has no manifest", "no_outputs")
    if job.manifest_key is None and job.status is JobStatus.SUCCEEDED:
        body = Manifest.of_view(job).model_dump_json(exclude_none=True)
        return Response(body, media_type="application/json", headers=_NO_STORE)
    if job.manifest_key is None:
        if job.status.is_terminal():
            msg = f"job {job.id} {job.status.value}: only a succeeded job has a manifest; its view lists what it stored"
        else:
            msg = f"job {job.id} is {job.status.value}: its manifest is written when it succeeds; retry then"
        raise ApiError(409, ["path", "job_id"], msg, "manifest_not_written")
    return _redirect(services.client.urls.url(job.manifest_key))


@router.get(
    "/jobs/{job_id}/sheet",
    status_code=307,
    response_class=RedirectResponse,
    summary="Fetch a job's contact sheet",
    dependencies=_NO_QUERY,
    responses={
        307: {
            "description": "To a fresh URL of the job's `sheet.png` (a captioned grid of its first outputs, in "
            "manifest order); follow it without the `Authorization` header.",
            "headers": {
                "Location": _location(
                    "A SigV4 presigned GET URL living `GENQ_S3__PRESIGN_EXPIRES_S`, or "
                    "`<GENQ_S3__PUBLIC_BASE_URL>/<key>`."
                )
            },
        },
        **NOT_FOUND,
        409: {
            "model": ErrorBody,
            "description": "The job has no contact sheet (`type` `sheet_not_written`): it has not succeeded yet, it "
            "failed or was canceled, or its workers make none (`GENQ_SHEET_IMAGES=0`).",
        },
        **INVALID,
    },
)
def get_sheet(job: OwnedJob, services: ServicesDep) -> RedirectResponse:
    """Redirect (307) to the job's contact sheet, with a URL made for this request.

    The sheet is stored with the manifest when the job succeeds; until then, and for a job that failed or was
    canceled, this answers 409 (`sheet_not_written`). A fine-tune has none (404).
    """
    if job.kind != "generate":
        raise ApiError(404, ["path", "job_id"], f"job {job.id} is a fine-tune: it has no contact sheet", "no_outputs")
    if job.sheet_key is None:
        if not job.status.is_terminal():
            msg = f"job {job.id} is {job.status.value}: its contact sheet is made when it succeeds; retry then"
        else:
            msg = f"job {job.id} {job.status.value} without a contact sheet (only a succeeded job has one)"
        raise ApiError(409, ["path", "job_id"], msg, "sheet_not_written")
    return _redirect(services.client.urls.url(job.sheet_key))
