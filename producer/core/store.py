"""Job records in Redis: one hash per job, written by clients (create) and workers (transitions, progress).

Status changes go through one Lua script that checks the current status, so a terminal status is never
overwritten: a job redelivered after it succeeded cannot be dragged back to ``running``.

Every reader survives a record it cannot read (the format and its failures: :mod:`producer.core.records`):
:meth:`JobStore.get` and :meth:`JobStore.spec` raise :class:`~producer.errors.UnreadableRecord`, the lists
(:meth:`JobStore.page`, :meth:`JobStore.undelivered`) skip it, and the first reader to meet it records it once in
``genq:deadletter`` (stage ``record``) for an operator. :meth:`JobStore.create` refuses to write a spec that would not
read back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import redis

from producer.contract import (
    EventType,
    FineTuneJob,
    GenerateJob,
    JobError,
    JobStatus,
    JobView,
    OutputRef,
    TrainingView,
)
from producer.core import constants
from producer.core.clock import utcnow
from producer.core.messages import queue_for
from producer.core.records import (
    CORRUPT,
    JOB_SPEC,
    OUTPUT_LIST,
    VIEW_OUTPUTS_MAX,
    as_text,
    matches,
    quarantine,
    readable_spec,
    record_view,
)
from producer.core.scripts import read_lua
from producer.errors import JobNotFound, UnreadableRecord

log = logging.getLogger("genq.store")

# Each script's header names its KEYS, ARGV and what it returns.
# announce.lua is a function the scripts that announce events call: its source goes before theirs.
_ANNOUNCE = read_lua(__package__, "announce.lua")
_TRANSITION = _ANNOUNCE + read_lua(__package__, "transition.lua")
_UPDATE = _ANNOUNCE + read_lua(__package__, "update.lua")
_COMPLETE_SHARD = read_lua(__package__, "complete_shard.lua")
_COUNT_DELIVERY = read_lua(__package__, "count_delivery.lua")
_UNDELIVERED = read_lua(__package__, "undelivered.lua")

_ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)

# Every queue's index of queued jobs. A job leaves its index in the script that ends it: the store is handed a job id,
# not its queue, and a ZREM of a member an index lacks costs next to nothing.
QUEUED_INDEXES = tuple(constants.QUEUED_JOBS_KEY.format(queue=queue) for queue in constants.JOB_QUEUES)


@dataclass(frozen=True)
class Undelivered:
    """A job's status and the shards of it that no worker has started (:meth:`JobStore.undelivered`)."""

    status: JobStatus
    shards: int
    shard_size: int | None  # None in records written before it was recorded
    waiting: tuple[int, ...]  # shards never delivered to a task (always empty once the job ended)


class JobStore:
    """Read and write job records. Thread-safe (redis-py pools its connections)."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._transition = client.register_script(_TRANSITION)
        self._update = client.register_script(_UPDATE)
        self._complete_shard = client.register_script(_COMPLETE_SHARD)
        self._count_delivery = client.register_script(_COUNT_DELIVERY)
        self._undelivered = client.register_script(_UNDELIVERED)

    @staticmethod
    def key(job_id: str) -> str:
        return constants.JOB_KEY.format(job_id=job_id)

    def create(
        self,
        job: GenerateJob | FineTuneJob,
        shards: int = 1,
        shard_size: int | None = None,
        *,
        announce: bool = False,
    ) -> JobView:
        """Record a new job as ``queued``, to be run as ``shards`` tasks of at most ``shard_size`` images (what
        :func:`producer.core.messages.job_messages` needs to rebuild them). Raises ValueError if the id is taken.
        With ``announce``, its ``queued`` event goes into the outbox in the same transaction (event 1 of the job,
        the record as it is then, as ``announce.lua`` writes the worker's events).

        The job is listed in its queue's index of queued jobs (``QUEUED_JOBS_KEY``), where the workers' sweeper finds
        a job whose message the broker lost. It leaves the index in the transition that ends it (:meth:`_apply`), or
        when the sweeper finds every shard delivered."""
        key = self.key(job.job_id)
        spec = readable_spec(job)
        if not self.redis.hsetnx(key, "spec", spec):
            raise ValueError(f"job id {job.job_id} already exists")
        created = job.created_at.timestamp()
        fields: dict[str, str | int] = {
            "status": JobStatus.QUEUED.value,
            "shards": shards,
            "total": job.total_images,
            "created_at": job.created_at.isoformat(),
        }
        if shard_size is not None:
            fields["shard_size"] = shard_size
        if announce:
            fields["event_seq"] = 1
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping=cast(dict[Any, Any], fields))
        if announce:  # MULTI/EXEC: the event exists exactly when the record does
            record = {"spec": spec, **{name: str(value) for name, value in fields.items()}}
            entry = {"job": job.job_id, "event": EventType.QUEUED.value, "seq": 1, "record": json.dumps(record)}
            pipe.xadd(constants.CALLBACK_OUTBOX_KEY, entry)  # type: ignore[arg-type]
        pipe.expire(key, self.ttl_s)
        pipe.hincrby(constants.JOBS_BY_STATUS_KEY, JobStatus.QUEUED.value, 1)  # MULTI/EXEC: with the status
        queued = constants.QUEUED_JOBS_KEY.format(queue=queue_for(job))
        pipe.zadd(queued, {job.job_id: created})
        pipe.zremrangebyscore(queued, "-inf", f"({created - self.ttl_s}")  # bounded even with no sweeper running
        if job.tenant is not None:
            # The tenant's index lists its jobs newest first; entries older than a job record's TTL are pruned.
            index = constants.TENANT_JOBS_KEY.format(tenant=job.tenant)
            pipe.zadd(index, {job.job_id: created})
            pipe.zremrangebyscore(index, "-inf", f"({created - self.ttl_s}")
            pipe.expire(index, self.ttl_s)
        pipe.execute()
        return self.get(job.job_id)

    def page(
        self,
        tenant: str,
        limit: int,
        *,
        after: tuple[float, str] | None = None,
        status: JobStatus | None = None,
        model: str | None = None,
        scan_budget: int = 2000,
    ) -> tuple[list[JobView], tuple[float, str] | None]:
        """A page of the tenant's jobs, newest first, and the position to continue from (None at the end).

        Args:
            after: (created timestamp, job id) of the last job of the previous page.
            status, model: keep only jobs in that status / of that model (its name, ``name@version``, or the
                reference as asked).
            scan_budget: most index entries read per call; with a selective filter the page can come back short
                (even empty) with a position to continue from, so one call never reads a whole large index.
        """
        index = constants.TENANT_JOBS_KEY.format(tenant=tenant)
        views: list[JobView] = []
        position = after
        scanned = 0
        while len(views) < limit and scanned < scan_budget:
            chunk = min(max(limit * 2, 50), scan_budget - scanned)
            entries = self._index_after(index, position, chunk)
            if not entries:
                return views, None
            pipe = self.redis.pipeline()
            for job_id, _ in entries:
                pipe.hgetall(self.key(job_id))
            # raise_on_error=False: a key of another type (a bug) answers an error for itself, not for the page
            for (job_id, score), raw in zip(entries, pipe.execute(raise_on_error=False), strict=True):
                scanned += 1
                position = (score, job_id)
                if isinstance(raw, redis.ResponseError):
                    log.error("job %s: its record is not a hash (%s); left out of the list", job_id, raw)
                    continue
                if not raw or b"spec" not in raw:  # expired record; the index entry goes at the next create
                    continue
                try:
                    view = self._read(job_id, raw)
                except UnreadableRecord:  # logged and dead-lettered: the tenant's other jobs are listed
                    continue
                if matches(view, status, model):
                    views.append(view)
                    if len(views) == limit:
                        break
        more = bool(position and self._index_after(index, position, 1))
        return views, position if more else None

    def _index_after(self, index: str, position: tuple[float, str] | None, count: int) -> list[tuple[str, float]]:
        """Up to ``count`` (job id, score) entries strictly after ``position`` in (score desc, id desc) order."""
        if position is None:
            return self._index_range(index, "+inf", count)
        score, job_id = position
        # Entries sharing the position's score come first in the answer; skip those at or above its id.
        tied = int(self.redis.zcount(index, score, score))
        entries = self._index_range(index, score, count + tied)
        return [(m, sc) for m, sc in entries if sc < score or m < job_id][:count]

    def _index_range(self, index: str, top: float | str, count: int) -> list[tuple[str, float]]:
        raw = cast(
            list[tuple[bytes, float]],
            self.redis.zrevrangebyscore(index, top, "-inf", start=0, num=count, withscores=True),
        )
        return [(as_text(member), float(score)) for member, score in raw]

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.key(job_id)))

    def get(self, job_id: str) -> JobView:
        """The job's current view.

        Raises:
            JobNotFound: no record (unknown id, or expired).
            UnreadableRecord: a record genq cannot read (dead-lettered the first time a reader meets it).
        """
        raw = self.redis.hgetall(self.key(job_id))
        # create() claims the id (spec) before it writes the rest: a record without a status is not recorded yet
        if not raw or b"spec" not in raw or b"status" not in raw:
            raise JobNotFound(f"no job {job_id!r} (unknown id, or its record expired)")
        return self._read(job_id, raw)

    def spec(self, job_id: str) -> GenerateJob | FineTuneJob:
        """The job as its worker runs it.

        Raises:
            JobNotFound: no record.
            UnreadableRecord: a spec genq cannot read (dead-lettered the first time a reader meets it).
        """
        raw = self.redis.hget(self.key(job_id), "spec")
        if raw is None:
            raise JobNotFound(f"no job {job_id!r}")
        try:
            return JOB_SPEC.validate_json(raw)
        except CORRUPT as exc:
            raise quarantine(self.redis, self.key(job_id), job_id, {b"spec": raw}, exc) from exc

    def in_tenant_index(self, tenant: str, job_id: str) -> bool:
        """Whether ``tenant``'s index lists the job: who owns a job whose record cannot be read."""
        return self.redis.zscore(constants.TENANT_JOBS_KEY.format(tenant=tenant), job_id) is not None

    def _read(self, job_id: str, raw: Mapping[bytes | str, bytes | str]) -> JobView:
        """The view of a record read from Redis; UnreadableRecord (dead-lettered once) if it cannot be read."""
        try:
            return record_view(job_id, {as_text(k): as_text(v) for k, v in raw.items()})
        except CORRUPT as exc:
            raise quarantine(self.redis, self.key(job_id), job_id, raw, exc) from exc

    def transition(
        self,
        job_id: str,
        status: JobStatus,
        allowed_from: tuple[JobStatus, ...],
        *,
        set_if_absent: Mapping[str, Any] | None = None,
        drop_prefixes: tuple[str, ...] = (),
        announce: EventType | None = None,
        **fields: Any,
    ) -> bool:
        """Set ``status`` only if the current status is in ``allowed_from``; True if applied.

        With it, in one step: set ``fields``, set ``set_if_absent``'s fields the job does not have yet, then delete
        every field whose name starts with one of ``drop_prefixes``; a terminal ``status`` also takes the job out of
        its queue's index of queued jobs; ``announce`` puts that callback event in the outbox
        (:mod:`producer.core.callbacks.outbox`). A value that is neither str nor int is stored as JSON.

        Raises:
            JobNotFound: the job has no record.
        """
        applied = self._apply(
            job_id,
            status,
            allowed_from,
            set_fields=fields,
            set_if_absent=set_if_absent,
            drop_prefixes=drop_prefixes,
            announce=announce,
        )
        return applied is not None

    def _apply(
        self,
        job_id: str,
        status: JobStatus,
        allowed_from: tuple[JobStatus, ...],
        *,
        unless_field: str = "",
        set_fields: Mapping[str, Any] | None = None,
        set_if_absent: Mapping[str, Any] | None = None,
        drop_prefixes: tuple[str, ...] = (),
        announce: EventType | None = None,
        announce_from: JobStatus | None = None,
    ) -> JobStatus | None:
        """:meth:`transition`, refused too when the job has ``unless_field``; the status the job had, or None.
        ``announce`` is put in the outbox only when the job came from ``announce_from`` (None: from any)."""
        if isinstance(drop_prefixes, str):  # a bare "shard:" would drop every field starting with s, h, a, ...
            raise TypeError(f"drop_prefixes must be a tuple of prefixes, got the string {drop_prefixes!r}")
        # transition.lua's ARGV: three fixed arguments, then each group as its length and its items.
        args: list[str | int] = [status.value, self.ttl_s, unless_field, len(allowed_from)]
        args += [s.value for s in allowed_from]
        for group in (set_fields or {}, set_if_absent or {}):
            args.append(len(group))
            for name, value in group.items():
                args += [name, value if isinstance(value, str | int) else json.dumps(value)]
        args += [len(drop_prefixes), *drop_prefixes]
        args += [announce.value if announce else "", announce_from.value if announce_from else "", job_id]
        keys = [self.key(job_id), constants.JOBS_BY_STATUS_KEY, constants.CALLBACK_OUTBOX_KEY]
        if status.is_terminal():  # in the same step: an ended job is never left in a queued index (nothing is owed)
            keys += QUEUED_INDEXES
        result = self._transition(keys=keys, args=args)
        if result == -1:
            raise JobNotFound(f"no job {job_id!r}")
        return JobStatus(as_text(result)) if isinstance(result, bytes | str) else None

    def start(self, job_id: str, shard: int | None = None, *, announce: bool = False) -> JobStatus | None:
        """queued/running -> running (each shard, and a redelivered job, re-enters running), unless ``shard``'s
        outputs are already recorded; ``started_at`` is when the first shard started. With ``announce``, the
        job's first start puts a ``running`` event in the outbox.

        Returns the status the job had (``QUEUED``: this is its first start), or None when it must not run: the
        job already ended, or the shard was stored by an earlier delivery. One round trip.
        """
        guard = "" if shard is None else f"shard:{shard}"
        return self._apply(
            job_id,
            JobStatus.RUNNING,
            _ACTIVE,
            unless_field=guard,
            set_if_absent={"started_at": utcnow().isoformat()},
            announce=EventType.RUNNING if announce else None,
            announce_from=JobStatus.QUEUED,
        )

    def set_progress(self, job_id: str, shard: int, done: int, *, announce: bool = False) -> None:
        """Images of ``shard`` stored so far (a redelivered shard restarts its own count, never the job's); with
        ``announce``, a ``progress`` event in the outbox in the same step. Nothing is written for a job with no
        record."""
        self._updated(job_id, EventType.PROGRESS if announce else None, {f"progress:{shard}": done})

    def _updated(self, job_id: str, announce: EventType | None, fields: Mapping[str, str | int]) -> bool:
        """Set ``fields`` of an existing record (and put ``announce`` in the outbox); False when there is none."""
        args: list[str | int] = [announce.value if announce else "", job_id]
        for name, value in fields.items():
            args += [name, value]
        keys = [self.key(job_id), constants.CALLBACK_OUTBOX_KEY]
        return bool(self._update(keys=keys, args=args))

    def is_active(self, job_id: str) -> bool:
        """Still queued or running: a shard stops early once its job failed or was canceled."""
        status = self.redis.hget(self.key(job_id), "status")
        return status is not None and JobStatus(as_text(status)) in _ACTIVE

    def complete_shard(self, job_id: str, shard: int, shards: int, outputs: list[OutputRef]) -> bool:
        """Record a stored shard's outputs. True when this was the job's last shard to finish: its run writes the
        manifest (from :meth:`shard_outputs`) and marks the job succeeded. A redelivered shard recorded before
        changes nothing and returns False."""
        payload = json.dumps([o.model_dump(mode="json") for o in outputs])
        return int(self._complete_shard(keys=[self.key(job_id)], args=[f"shard:{shard}", payload])) == shards

    def awaiting_manifest(self, job_id: str) -> bool:
        """Every shard's outputs are recorded yet the job is still running: the run that recorded the last shard
        died before it wrote the manifest (the manifest write and the success come after the record)."""
        status, done, shards = self.redis.hmget(self.key(job_id), ["status", "shards_done", "shards"])
        if status is None or JobStatus(as_text(status)) not in _ACTIVE:
            return False
        return int(done or 0) >= int(shards or 1)

    def shard_outputs(self, job_id: str, shards: int) -> Iterator[list[OutputRef]]:
        """The outputs recorded by each of a job's ``shards`` shards, one shard at a time, in shard order.

        One shard's list is in memory at once, so the manifest of a 100,000-image job is written in pieces.

        Raises:
            JobNotFound: a shard has no record (the job expired, or it has not finished).
        """
        for shard in range(shards):
            payload = self.redis.hget(self.key(job_id), f"shard:{shard}")
            if payload is None:
                raise JobNotFound(f"job {job_id}: no stored outputs recorded for shard {shard + 1}/{shards}")
            yield sorted(OUTPUT_LIST.validate_json(payload), key=lambda o: o.index)

    def record_stopped_shard(self, job_id: str, shard: int, outputs: list[OutputRef]) -> None:
        """Record what a shard stored before it stopped because its job ended (canceled, or failed elsewhere): the
        view of a canceled job lists these beside the outputs of the shards that finished."""
        payload = json.dumps([o.model_dump(mode="json") for o in outputs])
        self.redis.hset(self.key(job_id), f"partial:{shard}", payload)

    def mark_succeeded(
        self,
        job_id: str,
        outputs: list[OutputRef],
        manifest_key: str | None,
        total: int | None = None,
        sheet_key: str | None = None,
        *,
        announce: bool = False,
    ) -> bool:
        """queued/running -> succeeded (with ``announce``, its event in the outbox). ``outputs`` may be only the
        first ones of ``total`` (default: all of them); the view keeps at most :data:`VIEW_OUTPUTS_MAX`, the
        manifest has every one (``manifest_key``; None: a job of one image that stores none, whose manifest is made
        from this record). ``sheet_key``: the job's contact sheet, if it has one."""
        total = len(outputs) if total is None else total
        fields: dict[str, str | int] = {
            "outputs": json.dumps([o.model_dump(mode="json") for o in outputs[:VIEW_OUTPUTS_MAX]]),
            "outputs_truncated": int(total > VIEW_OUTPUTS_MAX),
            "finished_at": utcnow().isoformat(),
        }
        if manifest_key is not None:
            fields["manifest_key"] = manifest_key
        if sheet_key is not None:
            fields["sheet_key"] = sheet_key
        # The per-shard lists served their purpose; the manifest and the view hold the outputs now.
        applied = self._apply(
            job_id,
            JobStatus.SUCCEEDED,
            _ACTIVE,
            set_fields=fields,
            drop_prefixes=("shard:",),
            announce=EventType.SUCCEEDED if announce else None,
        )
        return applied is not None

    def mark_failed(
        self, job_id: str, error: JobError, outputs: list[OutputRef] | None = None, *, announce: bool = False
    ) -> bool:
        """queued/running -> failed with ``error`` (with ``announce``, its event in the outbox); False if the job
        already ended.

        The view lists every output the job stored: ``outputs`` (the failing run's), beside those of the shards that
        finished (``shard:``) and of the shards that stopped or failed too (``partial:``,
        :meth:`record_stopped_shard`), read when the view is.
        """
        return self.transition(
            job_id,
            JobStatus.FAILED,
            _ACTIVE,
            error_type=error.type,
            error_message=error.message,
            outputs=json.dumps([o.model_dump(mode="json") for o in outputs or []]),
            finished_at=utcnow().isoformat(),
            announce=EventType.FAILED if announce else None,
        )

    def mark_canceled(self, job_id: str) -> bool:
        """queued/running -> canceled; False if the job already ended (the Lua transition refuses to leave a
        terminal status, so a canceled job is never marked succeeded by a shard that finishes later).

        The view lists the outputs stored so far: those of finished shards, and those of running shards once
        they stop after their current chunk (:meth:`record_stopped_shard`).
        """
        return self.transition(job_id, JobStatus.CANCELED, _ACTIVE, finished_at=utcnow().isoformat())

    def set_training(self, job_id: str, training: TrainingView, *, announce: bool = False) -> None:
        """A fine-tune's latest state (step, losses, grid, result); its progress counts steps. With ``announce``, a
        ``progress`` event in the outbox in the same step."""
        fields: dict[str, str | int] = {"training": training.model_dump_json(), "progress:0": training.step}
        self._updated(job_id, EventType.PROGRESS if announce else None, fields)

    def mark_trained(self, job_id: str, training: TrainingView, *, announce: bool = False) -> bool:
        """running -> succeeded for a fine-tune that published its version (with ``announce``, its event in the
        outbox); False if the job already ended."""
        return self.transition(
            job_id,
            JobStatus.SUCCEEDED,
            _ACTIVE,
            training=training.model_dump_json(),
            finished_at=utcnow().isoformat(),
            announce=EventType.SUCCEEDED if announce else None,
        )

    def count_delivery(self, job_id: str, shard: int = 0) -> int | None:
        """Count one more delivery of a shard's task (the worker dead-letters a shard delivered too often); None
        when the job has no record (never created, or expired), which then stays without one."""
        count = self._count_delivery(keys=[self.key(job_id)], args=[f"deliveries:{shard}"])
        return None if int(count) < 0 else int(count)

    def undelivered(self, job_ids: list[str]) -> dict[str, Undelivered | None]:
        """Each job's status and its shards no task has started yet. One pipelined round trip.

        None for a job with no record, or with one that cannot be read (dead-lettered): either way nothing is owed.
        """
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            self._undelivered(keys=[self.key(job_id)], client=pipe)
        found: dict[str, Undelivered | None] = {}
        # raise_on_error=False: a record the script cannot read (shards not a number) fails alone
        for job_id, raw in zip(job_ids, pipe.execute(raise_on_error=False), strict=True):
            found[job_id] = None
            if not raw:
                continue
            try:
                if isinstance(raw, redis.ResponseError):
                    raise ValueError(f"the undelivered script failed on it: {raw}")
                status, shards, shard_size, *waiting = (as_text(v) for v in raw)
                found[job_id] = Undelivered(
                    JobStatus(status),
                    int(shards),
                    int(shard_size) if shard_size else None,
                    tuple(int(k) for k in waiting),
                )
            except CORRUPT as exc:
                quarantine(self.redis, self.key(job_id), job_id, self._raw_record(job_id), exc)
        return found

    def _raw_record(self, job_id: str) -> dict[bytes | str, bytes | str]:
        """The record's fields as stored, for a dead letter; empty if it cannot be read as a hash."""
        try:
            return cast(dict[bytes | str, bytes | str], self.redis.hgetall(self.key(job_id)))
        except redis.ResponseError:
            return {}

    def counts_by_status(self) -> dict[JobStatus, int]:
        """Jobs per status: queued and running are current counts; succeeded, failed and canceled count every job
        that ended that way since the Redis DB was created (job records expire, the counters do not)."""
        raw = self.redis.hgetall(constants.JOBS_BY_STATUS_KEY)
        counts: dict[str, int] = {}
        for name, value in raw.items():
            try:
                counts[as_text(name)] = int(value)
            except ValueError:  # a counter a bug or a hand overwrote: the others are still worth reporting
                log.error("jobs-by-status counter %r holds %r, not a number; left out", name, value)
        return {status: counts.get(status.value, 0) for status in JobStatus}

    def next_event_seq(self, job_id: str) -> int:
        """A per-job sequence number for callback events (stable message ids)."""
        return int(self.redis.hincrby(self.key(job_id), "event_seq", 1))
