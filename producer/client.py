"""The Python client: submit generate jobs, read their status, wait for them, fetch their outputs.

Light on purpose: importing it pulls in neither torch nor Celery. Celery (for its message format) is imported on
the first submit, boto3 on the first download or presigned URL.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import redis

from producer.contract import (
    EventType,
    FineTuneJob,
    FineTuneRequest,
    GenerateJob,
    GenerateRequest,
    JobStatus,
    JobView,
    Manifest,
    ModelEntry,
    OutputRef,
    RenditionRef,
)
from producer.core import constants
from producer.core.callbacks.events import CallbackMessage, callback_message
from producer.core.callbacks.pending import PendingCallbacks
from producer.core.intake import Intake
from producer.core.messages import JobMessage, callback_task, publish
from producer.core.resolve import dataset_prefix, visible_models
from producer.core.s3 import ObjectUrls, make_s3_client
from producer.core.store import JobStore
from producer.errors import InvalidJob, JobEnded, JobNotFound, JobTimeout
from producer.settings import ClientSettings
from producer.uploads import DatasetMeter, ProgressFn, Upload, archive_reference, metered, upload_dataset

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("genq.client")


class Client:
    """Talks to Redis (jobs, catalogue, queue) and, for outputs, to S3.

    >>> client = Client()  # settings from GENQ_* variables
    >>> job = client.submit(GenerateRequest(model="fmnist-cgan", label="sneaker", count=8, seed=42))
    >>> client.wait(job.id, timeout=60).status
    <JobStatus.SUCCEEDED: 'succeeded'>
    """

    def __init__(self, settings: ClientSettings | None = None) -> None:
        self.settings = settings or ClientSettings()
        if self.settings.redis.url is None:
            raise InvalidJob("no Redis configured: set GENQ_REDIS__URL, or use `genq generate --out DIR` (embedded)")
        self.redis = redis.Redis.from_url(self.settings.redis.url)
        self.store = JobStore(self.redis, self.settings.job_ttl_s)
        self.intake = Intake(self.redis, self.store, self.settings, self._publish)
        self._celery: Celery | None = None
        self._s3: Any = None
        self.urls = ObjectUrls(self.settings.s3)  # makes its boto3 client on the first URL

    # -- submitting ---------------------------------------------------------------------------------------

    def models(self) -> dict[str, ModelEntry]:
        """The whole model catalogue published by workers, every owner's, by catalogue key (``ModelEntry.key``).

        The operator's view; what a tenant may see and name is :meth:`visible_models`. A record that does not parse
        is logged and left out, so one bad entry never refuses every request.
        """
        return self.intake.models()

    def visible_models(self, tenant: str | None) -> dict[str, ModelEntry]:
        """The models ``tenant`` may see and name, by name: the system's and its own (None: the system's only).

        Another tenant's models are not there at all (see :func:`producer.core.resolve.visible_models`).
        """
        return visible_models(self.models(), tenant)

    def submit(
        self,
        request: GenerateRequest,
        tenant: str | None = None,
        *,
        admit: Callable[[GenerateJob], None] | None = None,
    ) -> JobView:
        """Validate, record and enqueue a generate job; returns at once with the job ``queued``.

        Args:
            tenant: the job's owner (the HTTP API passes the caller's); idempotency keys are scoped to it.
            admit: called with the resolved job just before it is recorded (the HTTP API takes quota here);
                whatever it raises refuses the job. Not called when an idempotency key replays an earlier job.

        Raises:
            InvalidJob: the request names an unknown model/label or exceeds a limit (``.field`` says which);
                nothing is enqueued.
            IdempotencyConflict: the idempotency key was used before with a different request.
        """
        return self.intake.submit(request, tenant, admit=admit)

    def upload_dataset(
        self, path: Path, on_progress: ProgressFn | None = None, *, meter: DatasetMeter | None = None
    ) -> Upload:
        """Upload a fine-tune data set (a folder with one sub-folder per class, or one .zip/.tar.gz/.npz) to S3.

        Returns the :class:`~producer.uploads.Upload` whose ``dataset`` goes into :class:`FineTuneRequest`.

        Args:
            meter: to upload for a tenant, the data set quota of one of its keys
                (``Quotas(...).dataset_meter(principal)``): one archive, stored under the tenant's prefix, counted,
                tagged and expired exactly as ``POST /v1/datasets`` does. Without one the upload is the operator's
                (``datasets/``, for fine-tunes submitted without a tenant): trusted, neither metered nor expired.

        Raises:
            InvalidJob: (field ``dataset``) a path that is not a folder or archive, or a folder for a tenant.
            QuotaExceeded: a tenant's upload would pass its key's ``dataset_bytes``; nothing is stored.
        """
        bucket = self.settings.s3.bucket
        s3 = self._s3_client()
        # Tagged like the API's uploads, so that the bucket's lifecycle rule for data sets covers them too.
        extra = {} if meter is None else {"Tagging": constants.DATASET_TAG}
        return upload_dataset(
            path,
            lambda key, data: s3.put_object(Bucket=bucket, Key=key, Body=data, **extra),
            meter=meter,
            on_progress=on_progress,
        )

    def upload_dataset_file(self, fileobj: BinaryIO, filename: str, *, meter: DatasetMeter | None = None) -> Upload:
        """Upload one archive from an open file (``POST /v1/datasets`` stores its body with this); returns it.

        ``meter`` as for :meth:`upload_dataset`: with one, the bytes are taken from the key's quota before any is
        stored, and given back if storing fails.

        Raises:
            InvalidJob: (field ``filename``) a name that is not a .zip/.tar/.tar.gz/.tgz/.npz file name.
            QuotaExceeded: a tenant's upload would pass its key's ``dataset_bytes``; nothing is stored.
        """
        reference = archive_reference(filename)
        fileobj.seek(0, io.SEEK_END)
        size = fileobj.tell()
        fileobj.seek(0)
        key = dataset_prefix(None if meter is None else meter.tenant) + reference
        extra = None if meter is None else {"Tagging": constants.DATASET_TAG}
        with metered(meter, reference, size) as expires_at:
            self._s3_client().upload_fileobj(fileobj, self.settings.s3.bucket, key, ExtraArgs=extra)
        return Upload(dataset=reference, files=1, bytes=size, expires_at=expires_at)

    def submit_finetune(
        self,
        request: FineTuneRequest,
        tenant: str | None = None,
        *,
        admit: Callable[[FineTuneJob], None] | None = None,
    ) -> JobView:
        """Validate, record and enqueue a fine-tune on the ``train`` queue; returns at once with the job ``queued``.

        Raises:
            InvalidJob: unknown or non-cGAN base, a name taken by another architecture, a refused callback URL
                (``.field`` says which); nothing is enqueued.
            IdempotencyConflict: the idempotency key was used before with a different request.
        """
        return self.intake.submit_finetune(request, tenant, admit=admit)

    def cancel(self, job_id: str, tenant: str | None = None) -> JobView:
        """Cancel a queued or running job and announce it (a ``canceled`` callback event); returns its view.

        A queued job never starts; a running generate job stops after its current chunk
        (``GENQ_BATCHING__MAX_BATCH`` images), a fine-tune before its next step. The view lists the outputs
        stored so far; those of the chunk in flight are added when it lands.

        Args:
            tenant: the caller's tenant (the HTTP API passes it): another tenant's job is not found. None skips
                the check (an operator's client).

        Raises:
            JobNotFound: no such job (or it belongs to another tenant).
            JobEnded: the job already succeeded, failed or was canceled (``.status`` says which).
        """
        view = self.store.get(job_id)
        if tenant is not None and view.tenant != tenant:
            raise JobNotFound(f"no job {job_id!r} (unknown id, or its record expired)")
        if not self.store.mark_canceled(job_id):
            status = self.store.get(job_id).status.value
            message = f"job {job_id} already {status}; only a queued or running job can be canceled"
            raise JobEnded(message, status=status)
        view = self.store.get(job_id)
        job = self.store.spec(job_id)
        event = callback_message(job.callback, EventType.CANCELED, view, self.store.next_event_seq(job_id))
        if event is not None:
            try:
                self._send_callback(event)
            except Exception:  # the cancel stands; failing the call would make a retry answer "already canceled"
                log.exception("job %s canceled, but its canceled event could not be enqueued", job_id)
        return view

    def _send_callback(self, event: CallbackMessage) -> None:
        PendingCallbacks(self.redis).send(callback_task(event), self._publish)  # kept until a worker starts it

    def _publish(self, message: JobMessage, countdown: float = 0.0) -> None:
        publish(self._celery_app(), message, countdown)

    def _celery_app(self) -> Celery:
        if self._celery is None:
            from celery import Celery

            app = Celery("genq-client", broker=self.settings.redis.url)
            app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)
            self._celery = app
        return self._celery

    # -- reading ------------------------------------------------------------------------------------------

    def status(self, job_id: str) -> JobView:
        """The job's current view. Raises JobNotFound."""
        return self.store.get(job_id)

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        poll_s: float = 0.2,
        on_update: Callable[[JobView], None] | None = None,
    ) -> JobView:
        """Poll until the job is terminal; ``on_update`` sees every view. Raises JobTimeout after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            view = self.store.get(job_id)
            if on_update is not None:
                on_update(view)
            if view.status.is_terminal():
                return view
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(f"job {job_id} still {view.status.value} after {timeout} s")
            time.sleep(poll_s)

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        """Every callback delivery attempt recorded for the job, oldest first."""
        raw = self.redis.lrange(constants.JOB_EVENTS_KEY.format(job_id=job_id), 0, -1)
        return [json.loads(item) for item in raw]

    # -- outputs ------------------------------------------------------------------------------------------

    def _s3_client(self) -> Any:
        if self._s3 is None:
            self._s3 = make_s3_client(attempts=5)  # boto3's own retries: the client has no window of its own
        return self._s3

    def with_urls(self, view: JobView, expires_s: int | None = None) -> JobView:
        """A copy of ``view`` whose outputs carry GET URLs: SigV4 presigned, living ``expires_s`` (default
        ``GENQ_S3__PRESIGN_EXPIRES_S``), or ``<GENQ_S3__PUBLIC_BASE_URL>/<key>`` when that is set. The HTTP API's job
        views carry the same (:class:`producer.core.s3.ObjectUrls`)."""
        return self.urls.with_urls(view, expires_s)

    def download(self, view: JobView, dest: Path, on_file: Callable[[OutputRef], None] | None = None) -> list[Path]:
        """Download a finished job's outputs (images, every rendition of each, or webdataset tars), its contact
        sheet and its manifest into ``dest``.

        The manifest, not the view, lists what to fetch (a view lists at most 1,000 outputs); every image's sha256
        is checked, inside its tar for webdataset output. ``manifest.json`` is written beside them, also for a job
        that stores none (:meth:`manifest`).
        """
        raw_manifest = self._raw_manifest(view)
        listing = Manifest.model_validate_json(raw_manifest)
        dest.mkdir(parents=True, exist_ok=True)
        s3 = self._s3_client()
        bucket = self.settings.s3.bucket
        by_key: dict[str, list[tuple[OutputRef, OutputRef | RenditionRef]]] = {}
        for output in listing.outputs:
            files: list[OutputRef | RenditionRef] = [*output.renditions] if output.renditions else [output]
            for stored in files:  # each rendition is an object (or a member) of its own
                by_key.setdefault(stored.key, []).append((output, stored))
        paths = []
        for key, listed in by_key.items():
            data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            for (output, stored), image in zip(listed, _images_in(data, [f for _, f in listed]), strict=True):
                if hashlib.sha256(image).hexdigest() != stored.sha256:
                    raise InvalidJob(f"{key} {stored.member or ''}: sha256 does not match the manifest; altered")
                if on_file is not None and stored is (output.renditions[-1] if output.renditions else output):
                    on_file(output)  # once per output, when its last file is checked
            path = dest / key.rsplit("/", 1)[-1]
            path.write_bytes(data)
            paths.append(path)
        if listing.sheet_key is not None:
            paths.append(self.download_sheet(view, dest / listing.sheet_key.rsplit("/", 1)[-1], listing.sheet_key))
        manifest = dest / constants.MANIFEST_NAME
        manifest.write_bytes(raw_manifest)
        return [*paths, manifest]

    def manifest(self, view: JobView) -> Manifest:
        """A succeeded job's manifest: every output's label, seed, key and sha256. Read from its manifest.json, or,
        for a job of one image without renditions (which stores its image alone), built from its view: the same
        document.

        Raises:
            InvalidJob: the job has not succeeded (only a succeeded job has a complete output set).
        """
        return Manifest.model_validate_json(self._raw_manifest(view))

    def _raw_manifest(self, view: JobView) -> bytes:
        if view.status is not JobStatus.SUCCEEDED:
            raise InvalidJob(f"job {view.id} is {view.status.value}; only succeeded jobs have a complete output set")
        if view.manifest_key is None:
            return Manifest.of_view(view).model_dump_json(exclude_none=True).encode()
        return bytes(self._s3_client().get_object(Bucket=self.settings.s3.bucket, Key=view.manifest_key)["Body"].read())

    def download_sheet(self, view: JobView, path: Path, key: str | None = None) -> Path:
        """Write a succeeded job's contact sheet (``view.sheet_key``, or ``key``) to ``path``; returns ``path``.

        Raises:
            InvalidJob: the job has no sheet (it has not succeeded, or its workers make none: GENQ_SHEET_IMAGES=0).
        """
        key = key or view.sheet_key
        if key is None:
            raise InvalidJob(f"job {view.id} ({view.status.value}) has no contact sheet")
        data = self._s3_client().get_object(Bucket=self.settings.s3.bucket, Key=key)["Body"].read()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


def _images_in(data: bytes, outputs: list[OutputRef | RenditionRef]) -> list[bytes]:
    """The image bytes of ``outputs`` inside one downloaded object: the object itself, or members of a tar."""
    if outputs[0].member is None:
        return [data]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        files = {m.name: tar.extractfile(m) for m in tar.getmembers() if m.isfile()}
        return [f.read() if (f := files.get(o.member or "")) is not None else b"" for o in outputs]
