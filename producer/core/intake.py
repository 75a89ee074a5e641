"""Taking jobs in: validate a request against the catalogue and the limits, claim its idempotency key, record the
job and send its messages. One code path for every way in: the Python client (and through it the HTTP API and the
`genq` command) and the ``genq.submit`` Celery task any Celery client can send (``worker.tasks.submit``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import redis

from producer.contract import (
    EventType,
    FineTuneJob,
    FineTuneRequest,
    GenerateJob,
    GenerateRequest,
    JobError,
    JobView,
    ModelEntry,
)
from producer.core import constants
from producer.core.callbacks.events import wants
from producer.core.clock import utcnow
from producer.core.messages import JobMessage, job_messages
from producer.core.records import as_text
from producer.core.resolve import resolve_finetune, resolve_request, visible_models
from producer.core.settings import GenqSettings
from producer.core.store import JobStore
from producer.errors import IdempotencyConflict, JobNotFound

log = logging.getLogger("genq.intake")
# How long identical requests sent at once wait for the first one's job to be recorded (it takes milliseconds).
_REPLAY_WAIT_S = 10.0

Request = TypeVar("Request", GenerateRequest, FineTuneRequest)
Job = TypeVar("Job", GenerateJob, FineTuneJob)

Publish = Callable[[JobMessage, float], None]


class Intake:
    """Validates, records and enqueues jobs.

    >>> intake = Intake(client, JobStore(client, settings.job_ttl_s), settings, publish)
    >>> intake.submit(GenerateRequest(model="fmnist-cgan", label="sneaker", count=8, seed=42)).status
    <JobStatus.QUEUED: 'queued'>

    Args:
        publish: sends one message (``producer.core.messages.publish`` with a Celery app).
    """

    def __init__(self, client: redis.Redis, store: JobStore, settings: GenqSettings, publish: Publish) -> None:
        self.redis = client
        self.store = store
        self.settings = settings
        self.publish = publish

    def models(self) -> dict[str, ModelEntry]:
        """The whole model catalogue published by workers, every owner's, by catalogue key (``ModelEntry.key``).

        The operator's view; what a tenant may see and name is :meth:`visible_models`. A record that does not parse
        is logged and left out, so one bad entry never refuses every request.
        """
        catalog: dict[str, ModelEntry] = {}
        for key, raw in self.redis.hgetall(constants.CATALOG_KEY).items():
            try:
                catalog[as_text(key)] = ModelEntry.model_validate_json(raw)
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                log.warning("ignoring catalogue entry %r: %s", as_text(key), exc)
        return catalog

    def visible_models(self, tenant: str | None) -> dict[str, ModelEntry]:
        """The models ``tenant`` may see and name, by name: the system's and its own (None: the system's only)."""
        return visible_models(self.models(), tenant)

    def submit(
        self,
        request: GenerateRequest,
        tenant: str | None = None,
        *,
        admit: Callable[[GenerateJob], None] | None = None,
        job_id: str | None = None,
    ) -> JobView:
        """Validate, record and enqueue a generate job; returns at once with the job ``queued``.

        Args:
            tenant: the job's owner (the HTTP API passes the caller's); idempotency keys are scoped to it.
            admit: called with the resolved job just before it is recorded (the HTTP API takes quota here);
                whatever it raises refuses the job. Not called when an idempotency key replays an earlier job.
            job_id: the job's id (default: a new random one); ``genq.submit`` passes its Celery task id, so that
                a sender knows it and a redelivered message finds the job it recorded.

        Raises:
            InvalidJob: the request names an unknown model/label or exceeds a limit (``.field`` says which);
                nothing is enqueued.
            IdempotencyConflict: the idempotency key was used before with a different request.
        """

        def resolve(job_id: str) -> GenerateJob:
            return resolve_request(
                request,
                self.models(),
                self.settings.limits,
                job_id=job_id,
                now=utcnow(),
                tenant=tenant,
                allow_hosts=self.settings.webhook.allow_hosts,
            )

        def enqueue(job: GenerateJob) -> JobView:
            # several workers share a bulk job, one shard each
            return self._record_and_send(job, self.settings.shard_size)

        return self._submit(request, tenant, resolve, admit, enqueue, job_id)

    def submit_finetune(
        self,
        request: FineTuneRequest,
        tenant: str | None = None,
        *,
        admit: Callable[[FineTuneJob], None] | None = None,
    ) -> JobView:
        """:meth:`producer.client.Client.submit_finetune`: a fine-tune on the ``train`` queue, returned ``queued``."""

        def resolve(job_id: str) -> FineTuneJob:
            return resolve_finetune(
                request,
                self.models(),
                self.settings.limits,
                job_id=job_id,
                now=utcnow(),
                tenant=tenant,
                allow_hosts=self.settings.webhook.allow_hosts,
            )

        def enqueue(job: FineTuneJob) -> JobView:
            return self._record_and_send(job, shard_size=1)  # one message, on the train queue

        return self._submit(request, tenant, resolve, admit, enqueue, None)

    def _submit(
        self,
        request: Request,
        tenant: str | None,
        resolve: Callable[[str], Job],
        admit: Callable[[Job], None] | None,
        enqueue: Callable[[Job], JobView],
        job_id: str | None,
    ) -> JobView:
        """Claim the idempotency key, resolve, admit, then record and enqueue; a replayed key answers its job."""
        job_id = job_id or uuid.uuid4().hex
        while request.idempotency_key is not None:
            existing = self._claim_idempotency_key(request, job_id, tenant)
            if existing is None:
                break  # the key is ours: submit
            view = self._replay(request, existing, tenant)
            if view is not None:
                return view
            # the request that held the key was refused and let it go: try to claim it ourselves
        try:
            job = resolve(job_id)
            if admit is not None:
                admit(job)
        except Exception:  # refused: the key must not point at a job that was never recorded
            self._release_idempotency_key(request, tenant)
            raise
        return enqueue(job)

    def _record_and_send(self, job: GenerateJob | FineTuneJob, shard_size: int) -> JobView:
        """Record ``job`` as queued and announce it (its ``queued`` event in the outbox, in the same transaction),
        then send its messages (:func:`producer.core.messages.job_messages`).

        A job that cannot be enqueued is failed (``EnqueueFailed``) and the error raised: never a queued record with
        no message behind it. (A client killed between the two leaves one; the workers' sweeper sends it.)
        """
        messages = job_messages(job, shard_size)
        # The queued event goes into the outbox with the record, before any message can start the job: it is event 1.
        queued = wants(job, EventType.QUEUED)
        view = self.store.create(job, shards=len(messages), shard_size=shard_size, announce=queued)
        try:
            for m in messages:
                self.publish(m, 0.0)
        except Exception as exc:
            error = JobError(type="EnqueueFailed", message=f"could not enqueue: {exc}")
            # Its queued event is in the outbox already: the receiver hears how the job ended too.
            self.store.mark_failed(job.job_id, error, announce=wants(job, EventType.FAILED))
            raise
        return view

    @staticmethod
    def _idempotency_redis_key(request: GenerateRequest | FineTuneRequest, tenant: str | None) -> str:
        # Scoped per tenant: two tenants may use the same key for different jobs.
        if tenant is not None:
            return constants.TENANT_IDEMPOTENCY_KEY.format(tenant=tenant, key=request.idempotency_key)
        return constants.IDEMPOTENCY_KEY.format(key=request.idempotency_key)

    def _claim_idempotency_key(
        self, request: GenerateRequest | FineTuneRequest, job_id: str, tenant: str | None
    ) -> str | None:
        """Own the key for ``job_id``; return the earlier job's id if the same request was submitted before."""
        key = self._idempotency_redis_key(request, tenant)
        body = hashlib.sha256(request.model_dump_json(exclude={"idempotency_key"}).encode()).hexdigest()
        record = json.dumps({"job_id": job_id, "body": body})
        if self.redis.set(key, record, nx=True, ex=self.settings.job_ttl_s):
            return None
        raw = self.redis.get(key)
        if raw is None:  # expired between the two calls: try once more
            return self._claim_idempotency_key(request, job_id, tenant)
        earlier = json.loads(raw)
        if earlier["body"] != body:
            raise IdempotencyConflict(
                f"idempotency key {request.idempotency_key!r} was already used for a different request "
                f"(job {earlier['job_id']})"
            )
        return str(earlier["job_id"])

    def _replay(self, request: GenerateRequest | FineTuneRequest, job_id: str, tenant: str | None) -> JobView | None:
        """The view of the job an earlier request with the same key made; None if that request let the key go.

        Identical requests sent at once all find the first one's claim before its job is recorded (it is still
        resolving and admitting): each waits for the record rather than answering "not found".
        """
        key = self._idempotency_redis_key(request, tenant)
        deadline = time.monotonic() + _REPLAY_WAIT_S
        while True:
            try:
                return self.store.get(job_id)
            except JobNotFound:
                pass
            raw = self.redis.get(key)
            if raw is None or json.loads(raw)["job_id"] != job_id:
                return None
            if time.monotonic() >= deadline:
                raise IdempotencyConflict(
                    f"idempotency key {request.idempotency_key!r}: the request that first used it is still being "
                    f"submitted after {_REPLAY_WAIT_S:g} s; retry in a moment"
                )
            time.sleep(0.02)

    def _release_idempotency_key(self, request: GenerateRequest | FineTuneRequest, tenant: str | None) -> None:
        if request.idempotency_key is not None:
            self.redis.delete(self._idempotency_redis_key(request, tenant))
