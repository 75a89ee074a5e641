"""Running one delivered job: count the delivery, run the pipeline, turn any error into a failed job."""

from __future__ import annotations

import json
import logging

from producer.constants import GENERATE_TASK
from producer.contract import GenerateJob, JobError, OutputRef, Shard, plan_shards
from producer.logs import current_job
from worker import metrics
from worker.deadletter import record
from worker.pipeline import run_generate
from worker.reporting import RedisReporter
from worker.runtime import Runtime

log = logging.getLogger("genq.jobs")


def execute_generate(job: GenerateJob, runtime: Runtime, reporter: RedisReporter, shard: Shard | None = None) -> None:
    """Run one shard of ``job`` (default: all of it). Never raises for a job-level failure: the record carries it.

    A shard whose deliveries exceed ``max_deliveries`` crashed its worker every time (the only way a message comes
    back): the job is failed instead of run again, so one poison job cannot take workers down forever.
    """
    token = current_job.set(job.job_id)  # every log line of this job carries its id
    try:
        _execute(job, runtime, reporter, shard)
    finally:
        current_job.reset(token)


def _execute(job: GenerateJob, runtime: Runtime, reporter: RedisReporter, shard: Shard | None) -> None:
    settings = runtime.settings
    deliveries = runtime.store.count_delivery(job.job_id, shard.index if shard else 0)
    if deliveries > settings.celery.max_deliveries:
        message = (
            f"delivered {deliveries} times without finishing (the worker died each time); "
            f"dead-lettered after GENQ_CELERY__MAX_DELIVERIES={settings.celery.max_deliveries}"
        )
        body = json.dumps([job.model_dump(mode="json"), shard.model_dump() if shard else None])
        record(runtime.redis, message, body, stage="task", task=GENERATE_TASK, job_id=job.job_id)
        reporter.failed(job, JobError(type="DeadLettered", message=message), [])
        metrics.SHARDS.labels("dead_lettered").inc()
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
            shard=shard,
            stored=stored,
        )
    except Exception as exc:  # every failure ends the job loudly, with the reason and partial outputs
        log.exception("job %s failed", job.job_id)
        reporter.failed(job, JobError(type=type(exc).__name__, message=str(exc)), stored)
        metrics.SHARDS.labels("failed").inc()
        metrics.IMAGES.labels(job.model_name).inc(len(stored))
        return
    outcome = "skipped" if result.skipped else "stopped" if result.stopped else "stored"
    metrics.SHARDS.labels(outcome).inc()
    metrics.IMAGES.labels(job.model_name).inc(len(result.outputs))
    where = f"job {job.job_id} shard {shard.index + 1}/{shard.count}" if shard else f"job {job.job_id}"
    if result.skipped:
        log.info("%s had already ended or been stored; delivery %d ignored", where, deliveries)
    elif result.stopped:
        reporter.stopped(job, shard or plan_shards(job.total_images, job.total_images)[0], result.outputs)
        log.info("%s stopped after %d outputs: the job ended elsewhere", where, len(result.outputs))
    else:
        log.info("%s stored %d outputs%s", where, len(result.outputs), "; job succeeded" if result.manifest_key else "")
