"""Reporting job progress from a worker: status transitions in Redis, each announcing its callback event in the
same step (the outbox)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from producer.contract import EventType, FineTuneJob, GenerateJob, JobError, OutputRef, Shard, TrainingView
from producer.core.callbacks.events import wants
from producer.core.store import JobStore


class RedisReporter:
    """The pipeline's :class:`~worker.generate.pipeline.Reporter` for Celery workers.

    Each callback event is announced by the store in the same step as the transition it reports (the outbox,
    :mod:`producer.core.callbacks.outbox`): only a transition that actually happened is announced, so a late
    redelivery of a finished job announces nothing, and an event is never lost between a change and its message.
    This worker builds, signs and sends nothing: the callbacks workers' relay does. Progress events are throttled:
    receivers want news, not a storm.
    """

    def __init__(self, store: JobStore, progress_interval_s: float = 0.5) -> None:
        self.store = store
        self.progress_interval_s = progress_interval_s
        self._last_progress: dict[str, float] = {}

    def started(self, job: GenerateJob, shard: Shard) -> bool:
        # Refused when the job ended or this shard was stored by an earlier delivery (a redelivery). The first shard
        # to start announces the job.
        return self.store.start(job.job_id, shard.index, announce=wants(job, EventType.RUNNING)) is not None

    def active(self, job: GenerateJob | FineTuneJob) -> bool:
        return self.store.is_active(job.job_id)

    def awaiting_manifest(self, job: GenerateJob) -> bool:
        return self.store.awaiting_manifest(job.job_id)

    def shard_stored(self, job: GenerateJob, shard: Shard, outputs: list[OutputRef]) -> bool:
        return self.store.complete_shard(job.job_id, shard.index, shard.count, outputs)

    def stored_outputs(self, job: GenerateJob, shards: int) -> Iterator[list[OutputRef]]:
        return self.store.shard_outputs(job.job_id, shards)

    def progress(self, job: GenerateJob, shard: Shard, done: int) -> None:
        self.store.set_progress(job.job_id, shard.index, done, announce=self._progress_due(job, shard, done))

    def _progress_due(self, job: GenerateJob, shard: Shard, done: int) -> bool:
        if not wants(job, EventType.PROGRESS):
            return False
        if shard.count == 1 and done == shard.size:
            return False  # the job's last images: its succeeded (or failed) event follows at once and says as much
        now = time.monotonic()
        if now - self._last_progress.get(job.job_id, 0.0) < self.progress_interval_s:
            return False
        self._last_progress[job.job_id] = now
        return True

    def succeeded(
        self,
        job: GenerateJob,
        first: list[OutputRef],
        total: int,
        manifest_key: str | None,
        sheet_key: str | None = None,
    ) -> bool:
        self._last_progress.pop(job.job_id, None)
        announce = wants(job, EventType.SUCCEEDED)
        return self.store.mark_succeeded(
            job.job_id, first, manifest_key, total=total, sheet_key=sheet_key, announce=announce
        )

    def stopped(self, job: GenerateJob, shard: Shard, outputs: list[OutputRef]) -> None:
        """The shard stopped early because its job ended (canceled): keep what it stored listed in the view."""
        self._last_progress.pop(job.job_id, None)
        self.store.record_stopped_shard(job.job_id, shard.index, outputs)

    def failed(self, job: GenerateJob | FineTuneJob, error: JobError, outputs: list[OutputRef]) -> None:
        self._last_progress.pop(job.job_id, None)
        self.store.mark_failed(job.job_id, error, outputs, announce=wants(job, EventType.FAILED))


class TrainingReporter(RedisReporter):
    """Reporting for fine-tunes: the job's :class:`TrainingView` (step, losses, grid, result) instead of outputs."""

    def begin(self, job: FineTuneJob) -> bool:
        """queued/running -> running, announcing ``running`` once; False when the job already ended."""
        return self.store.start(job.job_id, announce=wants(job, EventType.RUNNING)) is not None

    def current(self, job: FineTuneJob) -> TrainingView | None:
        """What an earlier delivery recorded (a resumed job continues its view)."""
        return self.store.get(job.job_id).training

    def training(self, job: FineTuneJob, view: TrainingView, *, announce: bool = False) -> None:
        """Record ``view``; announce a (throttled) ``progress`` event, or one now with ``announce`` (a new grid)."""
        now = time.monotonic()
        due = announce or now - self._last_progress.get(job.job_id, 0.0) >= self.progress_interval_s
        if due:
            self._last_progress[job.job_id] = now
        self.store.set_training(job.job_id, view, announce=due and wants(job, EventType.PROGRESS))

    def trained(self, job: FineTuneJob, view: TrainingView) -> None:
        self._last_progress.pop(job.job_id, None)
        self.store.mark_trained(job.job_id, view, announce=wants(job, EventType.SUCCEEDED))
