"""Running one delivered job: count the delivery, run the pipeline, turn any error into a failed job."""

from __future__ import annotations

import logging

from producer.contract import GenerateJob, JobError, OutputRef
from worker.pipeline import run_generate
from worker.reporting import RedisReporter
from worker.runtime import Runtime

log = logging.getLogger("genq.jobs")


def execute_generate(job: GenerateJob, runtime: Runtime, reporter: RedisReporter) -> None:
    """Run ``job`` to a terminal status. Never raises for a job-level failure: the job record carries it.

    A job whose deliveries exceed ``max_deliveries`` crashed its worker every time (the only way a message comes
    back): it is failed instead of run again, so one poison job cannot take workers down forever.
    """
    settings = runtime.settings
    deliveries = runtime.store.count_delivery(job.job_id)
    if deliveries > settings.celery.max_deliveries:
        message = (
            f"delivered {deliveries} times without finishing (the worker died each time); "
            f"dead-lettered after GENQ_CELERY__MAX_DELIVERIES={settings.celery.max_deliveries}"
        )
        log.error("job %s: %s", job.job_id, message)
        reporter.failed(job, JobError(type="DeadLettered", message=message), [])
        return
    stored: list[OutputRef] = []
    try:
        result = run_generate(
            job,
            storage=runtime.storage,
            sample=runtime.engine.submit,
            reporter=reporter,
            chunk_size=settings.batching.max_batch,
            uploads=runtime.uploads,
            stored=stored,
        )
    except Exception as exc:  # every failure ends the job loudly, with the reason and partial outputs
        log.exception("job %s failed", job.job_id)
        reporter.failed(job, JobError(type=type(exc).__name__, message=str(exc)), stored)
        return
    if result.skipped:
        log.info("job %s had already ended; delivery %d ignored", job.job_id, deliveries)
    else:
        log.info("job %s succeeded: %d outputs", job.job_id, len(result.outputs))
