"""Reporting job progress from a worker: status transitions in Redis, and callback events for each change."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from producer.contract import EventType, FineTuneJob, GenerateJob, JobError, JobStatus, OutputRef, Shard, TrainingView
from producer.core.callbacks.events import CallbackMessage, callback_message
from producer.core.store import JobStore
from worker.outage import OUTAGES, Backlog

log = logging.getLogger("genq.reporting")

SendCallback = Callable[[CallbackMessage], None]


class RedisReporter:
    """The pipeline's :class:`~worker.generate.pipeline.Reporter` for Celery workers.

    A callback event is sent only for a transition that actually happened, so a late redelivery of a finished
    job announces nothing. Progress events are throttled: receivers want news, not a storm. An event that cannot be
    sent because Redis is away waits in :data:`EVENTS` and is sent once Redis answers (with the view as it is then).
    """

    def __init__(self, store: JobStore, send: SendCallback, progress_interval_s: float = 0.5) -> None:
        self.store = store
        self.send = send
        self.progress_interval_s = progress_interval_s
        self._last_progress: dict[str, float] = {}

    def started(self, job: GenerateJob, shard: Shard) -> bool:
        # Refused when the job ended or this shard was stored by an earlier delivery (a redelivery).
        before = self.store.start(job.job_id, shard.index)
        if before is JobStatus.QUEUED:  # the first shard to start announces the job
            self._emit(job, EventType.RUNNING)
        return before is not None

    def active(self, job: GenerateJob | FineTuneJob) -> bool:
        return self.store.is_active(job.job_id)

    def awaiting_manifest(self, job: GenerateJob) -> bool:
        return self.store.awaiting_manifest(job.job_id)

    def shard_stored(self, job: GenerateJob, shard: Shard, outputs: list[OutputRef]) -> bool:
        return self.store.complete_shard(job.job_id, shard.index, shard.count, outputs)

    def stored_outputs(self, job: GenerateJob, shards: int) -> Iterator[list[OutputRef]]:
        return self.store.shard_outputs(job.job_id, shards)

    def progress(self, job: GenerateJob, shard: Shard, done: int) -> None:
        self.store.set_progress(job.job_id, shard.index, done)
        if shard.count == 1 and done == shard.size:
            return  # the job's last images: its succeeded (or failed) event follows at once and says as much
        now = time.monotonic()
        if now - self._last_progress.get(job.job_id, 0.0) >= self.progress_interval_s:
            self._last_progress[job.job_id] = now
            self._emit(job, EventType.PROGRESS)

    def succeeded(
        self, job: GenerateJob, first: list[OutputRef], total: int, manifest_key: str, sheet_key: str | None = None
    ) -> None:
        self._last_progress.pop(job.job_id, None)
        if self.store.mark_succeeded(job.job_id, first, manifest_key, total=total, sheet_key=sheet_key):
            self._emit(job, EventType.SUCCEEDED)

    def stopped(self, job: GenerateJob, shard: Shard, outputs: list[OutputRef]) -> None:
        """The shard stopped early because its job ended (canceled): keep what it stored listed in the view."""
        self._last_progress.pop(job.job_id, None)
        self.store.record_stopped_shard(job.job_id, shard.index, outputs)

    def failed(self, job: GenerateJob | FineTuneJob, error: JobError, outputs: list[OutputRef]) -> None:
        self._last_progress.pop(job.job_id, None)
        if self.store.mark_failed(job.job_id, error, outputs):
            self._emit(job, EventType.FAILED)

    def _emit(self, job: GenerateJob | FineTuneJob, event: EventType) -> None:
        if job.callback is None or event not in job.callback.events:
            return
        unsent = _Event(self, job, event)
        try:
            unsent()
        except OUTAGES as exc:  # the transition happened: its event must not be lost with Redis away
            if EVENTS.add(unsent, what=f"the {event.value} event of job {job.job_id}"):
                log.warning("job %s: %s event not sent yet (%s); sent once Redis answers", job.job_id, event.value, exc)
            else:
                log.error(
                    "job %s: %s event lost: Redis away (%s), %d events waiting already",
                    job.job_id,
                    event.value,
                    exc,
                    EVENTS.limit,
                )

    def _message(self, job: GenerateJob | FineTuneJob, event: EventType) -> CallbackMessage | None:
        """The event's message, with the job's view as it is now and its next sequence number."""
        view = self.store.get(job.job_id)
        if event is EventType.PROGRESS and view.status.is_terminal():
            return None  # the chunk that landed after a cancel: receivers already heard the job's last word
        return callback_message(job.callback, event, view, self.store.next_event_seq(job.job_id))


# Callback events that could not be sent while Redis was away, sent once it answers.
EVENTS = Backlog("callback-events", limit=10_000)


class _Event:
    """Sending one callback event: its message is built once (view, sequence number, so its ``webhook-id``), then
    sent; called again after an outage, it builds what it has not built yet and sends the same message."""

    def __init__(self, reporter: RedisReporter, job: GenerateJob | FineTuneJob, event: EventType) -> None:
        self.reporter = reporter
        self.job = job
        self.event = event
        self.message: CallbackMessage | None = None
        self.built = False

    def __call__(self) -> None:
        if not self.built:
            self.message = self.reporter._message(self.job, self.event)
            self.built = True
        if self.message is not None:
            self.reporter.send(self.message)


class TrainingReporter(RedisReporter):
    """Reporting for fine-tunes: the job's :class:`TrainingView` (step, losses, grid, result) instead of outputs."""

    def begin(self, job: FineTuneJob) -> bool:
        """queued/running -> running, announcing ``running`` once; False when the job already ended."""
        before = self.store.start(job.job_id)
        if before is JobStatus.QUEUED:
            self._emit(job, EventType.RUNNING)
        return before is not None

    def current(self, job: FineTuneJob) -> TrainingView | None:
        """What an earlier delivery recorded (a resumed job continues its view)."""
        return self.store.get(job.job_id).training

    def training(self, job: FineTuneJob, view: TrainingView, *, announce: bool = False) -> None:
        """Record ``view``; send a (throttled) ``progress`` event, or one now with ``announce`` (a new grid)."""
        self.store.set_training(job.job_id, view)
        now = time.monotonic()
        if announce or now - self._last_progress.get(job.job_id, 0.0) >= self.progress_interval_s:
            self._last_progress[job.job_id] = now
            self._emit(job, EventType.PROGRESS)

    def trained(self, job: FineTuneJob, view: TrainingView) -> None:
        self._last_progress.pop(job.job_id, None)
        if self.store.mark_trained(job.job_id, view):
            self._emit(job, EventType.SUCCEEDED)
