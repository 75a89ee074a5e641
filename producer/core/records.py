"""The job record's format: how a Redis hash reads as a :class:`JobView`, and what becomes of one that cannot be read.

Every reader survives a record it cannot read (written by an older version or a bug, e.g. metadata nested past the
JSON parser's limit): :func:`quarantine` logs it, records it once in ``genq:deadletter`` (stage ``record``) for an
operator, and gives the :class:`~producer.errors.UnreadableRecord` that :class:`~producer.core.store.JobStore`
raises or skips. :func:`readable_spec` keeps such a record from being written in the first place.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated

import redis
from pydantic import Field, TypeAdapter, ValidationError

from producer.contract import (
    FineTuneJob,
    GenerateJob,
    JobError,
    JobStatus,
    JobView,
    OutputRef,
    Progress,
    TrainingView,
)
from producer.core import constants
from producer.core.clock import utcnow
from producer.errors import InvalidJob, UnreadableRecord

log = logging.getLogger("genq.store")

AnyJob = Annotated[GenerateJob | FineTuneJob, Field(discriminator="kind")]
"""Any job a worker runs; the record's ``spec`` holds one, told apart by ``kind``."""
JOB_SPEC: TypeAdapter[GenerateJob | FineTuneJob] = TypeAdapter(AnyJob)

# A job view lists at most this many outputs (a 100,000-image job's view would be megabytes); the manifest has all.
VIEW_OUTPUTS_MAX = 1000

OUTPUT_LIST = TypeAdapter(list[OutputRef])

# What reading a corrupt record raises: pydantic's ValidationError and json's errors are ValueErrors; a missing field
# a KeyError; a field of the wrong JSON shape a TypeError; JSON nested past Python's recursion limit a RecursionError.
CORRUPT = (ValueError, TypeError, KeyError, RecursionError, OverflowError)
# Set on a record found unreadable, so that its dead letter is written once (it expires with the record).
UNREADABLE_FIELD = "unreadable"
# A dead letter as worker.deadletter.DeadLetter writes them (the producer never imports the worker): body truncated
# to this many characters, the list trimmed to this many entries.
DEADLETTER_BODY_CHARS = 4096
DEADLETTER_MAX_ENTRIES = 10_000


def quarantine(
    client: redis.Redis, key: str, job_id: str, raw: Mapping[bytes | str, bytes | str], exc: BaseException
) -> UnreadableRecord:
    """Log a record that cannot be read and dead-letter it, once per record; the error to raise or skip.

    Once: the dead letter is pushed in the transaction that sets ``UNREADABLE_FIELD`` on the record, which only
    runs while the record exists (WATCH) and lacks the field. A failure to record is logged, never raised: the
    reader goes on with the other jobs.
    """
    reason = describe(exc)
    if UNREADABLE_FIELD in raw or UNREADABLE_FIELD.encode() in raw:  # recorded already: no round trip
        return UnreadableRecord(job_id, reason)
    try:
        with client.pipeline() as pipe:
            pipe.watch(key)
            if not pipe.exists(key) or pipe.hexists(key, UNREADABLE_FIELD):
                return UnreadableRecord(job_id, reason)  # expired, or recorded by an earlier reader
            body = json.dumps({lenient_text(k): lenient_text(v) for k, v in raw.items()})
            entry = {
                "reason": f"job record cannot be read: {reason}",
                "stage": "record",
                "queue": None,
                "task": None,
                "message_id": None,
                "job_id": job_id,
                "body": body[:DEADLETTER_BODY_CHARS],
                "body_size": len(body),  # ASCII: json.dumps escapes the rest
                "at": utcnow().isoformat(),
            }
            pipe.multi()
            pipe.hset(key, UNREADABLE_FIELD, entry["at"])
            pipe.lpush(constants.DEADLETTER_KEY, json.dumps(entry))
            pipe.ltrim(constants.DEADLETTER_KEY, 0, DEADLETTER_MAX_ENTRIES - 1)
            pipe.execute()
        log.error("job %s: its record cannot be read (%s); dead-lettered, readers skip it", job_id, reason)
    except redis.WatchError:  # the record changed meanwhile (another reader recorded it, or a worker wrote to
        pass  # it): the next read that finds it unrecorded records it
    except redis.RedisError as err:
        log.error("job %s: its record cannot be read (%s), nor dead-lettered (%s)", job_id, reason, err)
    return UnreadableRecord(job_id, reason)


def as_text(value: bytes | str) -> str:
    """Redis answers bytes (or str with decode_responses); genq works in str."""
    return value.decode() if isinstance(value, bytes) else value


def lenient_text(value: bytes | str) -> str:
    """Text of whatever a corrupt record holds: bytes that are not UTF-8 escaped."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def readable_spec(job: GenerateJob | FineTuneJob) -> str:
    """The job as its record's ``spec``, once it is known to read back (a record that does not would break every
    reader for its TTL). Raises InvalidJob otherwise."""
    try:
        spec = job.model_dump_json()
        JOB_SPEC.validate_json(spec)
    except (ValueError, RecursionError) as exc:  # PydanticSerializationError and ValidationError are ValueErrors
        raise InvalidJob(
            f"the job would be stored as a record genq cannot read back ({describe(exc)}); check its free-form "
            "fields (metadata)"
        ) from exc
    return spec


def describe(exc: BaseException) -> str:
    """One line about an error: pydantic's first error (where and what, without the input), else the type and the
    message's first line."""
    if isinstance(exc, ValidationError):
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where + ': ' if where else ''}{first['msg']}"[:300]
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def stored_outputs(h: dict[str, str], prefixes: tuple[str, ...]) -> list[OutputRef]:
    """Outputs recorded per shard in fields starting with ``prefixes``, by index, each index once."""
    merged = {o["index"]: o for field, value in h.items() if field.startswith(prefixes) for o in json.loads(value)}
    return [OutputRef.model_validate(merged[i]) for i in sorted(merged)]


def _failed_outputs(h: dict[str, str]) -> dict[str, str]:
    """A failed job's record with ``outputs`` listing what every shard stored (the failing run's outputs, finished
    shards' and stopped shards'), by index, at most :data:`VIEW_OUTPUTS_MAX` of them; other records as they are."""
    if h.get("status") != JobStatus.FAILED.value:
        return h
    failing = {o["index"]: o for o in json.loads(h.get("outputs", "[]"))}
    shards = {o.index: o.model_dump(mode="json") for o in stored_outputs(h, ("shard:", "partial:"))}
    merged = failing | shards
    listed = [merged[i] for i in sorted(merged)]
    return h | {
        "outputs": json.dumps(listed[:VIEW_OUTPUTS_MAX]),
        "outputs_truncated": str(int(len(listed) > VIEW_OUTPUTS_MAX)),
    }


def record_view(job_id: str, h: dict[str, str], spec: GenerateJob | FineTuneJob | None = None) -> JobView:
    """The view of a job record (fields as text); ``spec``: its ``spec`` field, if the caller has read it already.
    Raises one of :data:`CORRUPT` when the record cannot be read."""
    h = _failed_outputs(h)
    spec = JOB_SPEC.validate_json(h["spec"]) if spec is None else spec
    error = JobError(type=h["error_type"], message=h.get("error_message", "")) if "error_type" in h else None
    status = JobStatus(h["status"])
    if status is JobStatus.CANCELED:  # what finished shards and stopped shards stored before the cancel
        stored = stored_outputs(h, ("shard:", "partial:"))
        outputs, truncated = stored[:VIEW_OUTPUTS_MAX], len(stored) > VIEW_OUTPUTS_MAX
    else:
        outputs = [OutputRef.model_validate(o) for o in json.loads(h.get("outputs", "[]"))]
        truncated = h.get("outputs_truncated") == "1"
    total = int(h.get("total", spec.total_images))
    if isinstance(spec, FineTuneJob):
        model, version = spec.base, f"{spec.base_name}@{spec.base_version}"
        training = TrainingView.model_validate_json(h["training"]) if "training" in h else None
    else:
        model, version, training = spec.model, f"{spec.model_name}@{spec.model_version}", None
    return JobView(
        provenance=None if isinstance(spec, FineTuneJob) else spec.provenance,
        format=None if isinstance(spec, FineTuneJob) else spec.format,
        id=job_id,
        kind=spec.kind,
        tenant=spec.tenant,
        status=status,
        priority=spec.priority,
        model=model,
        model_version=version,
        seed=spec.seed,
        training=training,
        progress=Progress(
            # A succeeded job stored every image: a job of one image records no progress of its own, its success
            # says it (worker.generate.pipeline: one step from the stored image to success).
            done=total
            if status is JobStatus.SUCCEEDED
            else sum(int(v) for k, v in h.items() if k.startswith("progress:")),
            total=total,
        ),
        shards=int(h.get("shards", 1)),
        outputs_truncated=truncated,
        outputs=outputs,
        manifest_key=h.get("manifest_key"),
        sheet_key=h.get("sheet_key"),
        error=error,
        metadata=spec.metadata,
        created_at=datetime.fromisoformat(h["created_at"]),
        started_at=datetime.fromisoformat(h["started_at"]) if "started_at" in h else None,
        finished_at=datetime.fromisoformat(h["finished_at"]) if "finished_at" in h else None,
    )


def matches(view: JobView, status: JobStatus | None, model: str | None) -> bool:
    """Whether a listed job passes the list's filters."""
    if status is not None and view.status is not status:
        return False
    if model is None:
        return True
    name = (view.model_version or "").split("@", 1)[0]
    return model in (view.model, view.model_version, name)
