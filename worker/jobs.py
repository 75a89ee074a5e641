"""Running one delivered job: count the delivery, run the pipeline, and decide what a failure means: a
:class:`~producer.errors.Retryable` one runs the job again later (:class:`~worker.retries.RetryLater`, up to
``GENQ_CELERY__RETRIES`` times), Redis being away hands the job back untouched (:class:`RedisUnavailable`), any
other fails the job loudly with its reason. While a shard runs, its process's heartbeat lists it
(``worker.watchdog``)."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from enum import Enum
from pathlib import Path

from producer.contract import FineTuneJob, GenerateJob, JobError, OutputRef, Shard, plan_shards
from producer.core import constants
from producer.core.constants import FINETUNE_TASK, GENERATE_TASK
from producer.core.logs import current_job
from producer.core.messages import task_id
from worker import telemetry
from worker.deadletter import record
from worker.generate.pipeline import job_ended, run_generate
from worker.outage import OUTAGES
from worker.reporting import RedisReporter, TrainingReporter
from worker.retries import RetryLater, retry_delay
from worker.runtime import Runtime
from worker.training.ingest import ArchiveLimits, remove_tree
from worker.training.lease import Lease
from worker.training.pipeline import run_finetune
from worker.watchdog import heart_for

log = logging.getLogger("genq.jobs")


class RedisUnavailable(Exception):
    """Raised by the job runner, caught by the task: Redis (the job store and the broker) did not answer while the job
    ran. The job is neither failed nor finished for it (that would need Redis too): it stays ``running``, and the task
    hands its message back to the queue, unacknowledged, once Redis answers."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"Redis did not answer: {type(cause).__name__}: {cause}")
        self.cause = cause


class NoBulkSlot(Exception):
    """Raised by the job runner, caught by the task: a bulk shard waiting for a bulk slot of its process gives way to
    messages waiting on a queue served before its own. Nothing was counted or run: the task hands its message back to
    its queue, so the thread serves those (a ``high`` job first) instead of holding this one."""


def heartbeat(runtime: Runtime, job_id: str, shard: int = 0) -> AbstractContextManager[None]:
    """List the shard as running in this process's heartbeat while the block runs (``worker.watchdog``)."""
    return heart_for(runtime.redis, runtime.settings.sweeper.heartbeat_s).beating(task_id(job_id, shard))


def execute_generate(
    job: GenerateJob,
    runtime: Runtime,
    reporter: RedisReporter,
    shard: Shard | None = None,
    retries: int = 0,
    give_way: Callable[[], bool] | None = None,
) -> bool:
    """Run one shard of ``job`` (default: all of it). Never raises for a job-level failure: the record carries it.

    A shard whose deliveries exceed ``max_deliveries`` crashed its worker every time (the only way a message comes
    back): the job is failed instead of run again, so one poison job cannot take workers down forever.

    Args:
        retries: how many times this message was retried (Celery's ``request.retries``); those runs are not deaths.
        give_way: asked every ``GENQ_BATCHING__BULK_WAIT_CHECK_S`` while a bulk shard waits for a bulk slot
            (``GENQ_BATCHING__MAX_BULK_SHARDS`` per process): True gives way (:class:`NoBulkSlot`); None waits as
            long as it takes (see :func:`messages_ahead`).

    Returns False, having done nothing, when the job has no record (never created, or expired after
    ``GENQ_JOB_TTL_S``): clients record a job before they enqueue it, so the message is stale.

    Raises:
        RetryLater: the run failed with a transient fault and the retry policy allows another run.
        RedisUnavailable: Redis did not answer; the job was left as it was (not failed).
        NoBulkSlot: a bulk shard waiting for a bulk slot gave way; nothing was counted or run.
    """
    token = current_job.set(job.job_id)  # every log line of this job carries its id
    try:
        # The slot before the delivery is counted and the shard listed as running: a shard handed back for want of
        # one was neither delivered to a run nor a death (GENQ_CELERY__MAX_DELIVERIES counts deaths).
        with _bulk_slot(runtime, _is_bulk(job, shard, runtime), give_way):
            with heartbeat(runtime, job.job_id, shard.index if shard else 0):
                return _execute(job, runtime, reporter, shard, retries)
    except OUTAGES as exc:
        raise RedisUnavailable(exc) from exc
    finally:
        current_job.reset(token)


def messages_ahead(runtime: Runtime, queue: str, served: Iterable[str]) -> Callable[[], bool]:
    """A ``give_way`` for :func:`execute_generate`: whether a message waits on a queue this worker serves before
    ``queue``, the shard's own (in genq's order: callbacks, then per priority high, normal, low its small jobs' queue
    and its bulk jobs'). One round trip per call.

    Messages on the shard's own queue are no reason: most likely its job's other shards, which would wait the same.
    A bulk shard thus gives way to a small job of its own priority (another tenant's, as a rule) and to anything
    above it.
    """
    order, serves = constants.WORKER_QUEUES, set(served)
    ahead = [q for q in order[: order.index(queue)] if q in serves] if queue in order else []

    def waiting() -> bool:
        if not ahead:
            return False
        pipe = runtime.redis.pipeline(transaction=False)
        for name in ahead:
            pipe.llen(name)  # kombu's Redis transport keeps a queue's messages in a list of its name
        return any(pipe.execute())

    return waiting


def _is_bulk(job: GenerateJob, shard: Shard | None, runtime: Runtime) -> bool:
    """More than one forward pass: such shards take turns for the process's bulk slots."""
    return (shard.size if shard else job.total_images) > runtime.settings.batching.max_batch


@contextmanager
def _bulk_slot(runtime: Runtime, bulk: bool, give_way: Callable[[], bool] | None) -> Iterator[None]:
    """Hold one of the process's bulk slots while the block runs (nothing for a job of one forward pass).

    A thread pool runs as many shards as it has threads; bulk ones take turns so memory stays flat (a 1-image job
    never waits behind them). All share one inference thread, so a few in flight keep it busy.

    Raises:
        NoBulkSlot: ``give_way`` said so, asked every ``bulk_wait_check_s`` while no slot was free.
    """
    if not bulk:
        yield
        return
    check_s = runtime.settings.batching.bulk_wait_check_s
    while not runtime.bulk_slots.acquire(timeout=None if give_way is None else check_s):
        if give_way is not None and give_way():
            raise NoBulkSlot(f"all {runtime.settings.batching.max_bulk_shards} bulk slots taken; giving way")
    try:
        yield
    finally:
        runtime.bulk_slots.release()


class Admission(Enum):
    """What counting a delivery decided."""

    RUN = "run"  # run the job
    NO_RECORD = "no_record"  # the job has no record (never created, or expired): the message is stale
    DEAD_LETTERED = "dead_lettered"  # its worker died too often running it: failed as DeadLettered, and recorded


def _admit(
    job: GenerateJob | FineTuneJob, runtime: Runtime, reporter: RedisReporter, shard: int, retries: int, body: str
) -> tuple[Admission, int]:
    """Count this delivery of ``job`` (its shard ``shard``); returns the decision and the count."""
    limit = runtime.settings.celery.max_deliveries
    deliveries = runtime.store.count_delivery(job.job_id, shard)
    if deliveries is None:
        return Admission.NO_RECORD, 0
    if deliveries - retries > limit:  # a retry is a delivery the runner asked for, not a death
        message = (
            f"delivered {deliveries} times without finishing (the worker died each time); "
            f"dead-lettered after GENQ_CELERY__MAX_DELIVERIES={limit}"
        )
        task = GENERATE_TASK if isinstance(job, GenerateJob) else FINETUNE_TASK
        record(runtime.redis, message, body, stage="task", task=task, job_id=job.job_id)
        reporter.failed(job, JobError(type="DeadLettered", message=message), [])
        return Admission.DEAD_LETTERED, deliveries
    return Admission.RUN, deliveries


def _fail_or_retry(
    job: GenerateJob | FineTuneJob,
    exc: Exception,
    runtime: Runtime,
    reporter: RedisReporter,
    stored: list[OutputRef],
    retries: int,
    shard: Shard | None = None,
) -> None:
    """Fail the job with ``exc`` (type and message, and the outputs stored so far), or raise :class:`RetryLater`
    when ``exc`` is :class:`~producer.errors.Retryable` and the retry policy allows another run.

    A generate job that fails lists what every shard stored: ``stored`` is recorded as the shard's (as a stopped
    shard's are), so it is listed even when another shard failed the job first, and this process's other shards of
    the job upload nothing more."""
    policy = runtime.settings.celery.retry_policy
    delay = retry_delay(exc, retries, policy)
    if delay is not None:
        log.warning(
            "job %s: %s: %s; running it again in %.0f s (retry %d of %d)",
            job.job_id,
            type(exc).__name__,
            exc,
            delay,
            retries + 1,
            policy.retries,
        )
        raise RetryLater(delay, exc) from exc
    log.exception("job %s failed", job.job_id)
    if isinstance(job, GenerateJob):
        job_ended(job.job_id)  # before the failure is recorded: nothing lands under its prefix after it
        if stored:
            runtime.store.record_stopped_shard(job.job_id, shard.index if shard else 0, stored)
    message = str(exc) if job.tenant is None else tenant_safe(str(exc), runtime)
    reporter.failed(job, JobError(type=type(exc).__name__, message=message), stored)


def tenant_safe(message: str, runtime: Runtime) -> str:
    """``message`` as a tenant may read it: the deployment's storage endpoint, bucket and worker folders replaced
    by placeholders (the full text is in the worker's log, beside the job id)."""
    settings = runtime.settings
    secrets = {
        getattr(runtime.storage, "endpoint", None): "<storage>",
        repr(settings.s3.bucket): "<bucket>",  # quoted, as storage errors name it ("genq" alone is in key names)
        str(settings.model_cache_dir): "<model cache>",
        str(settings.local_dir): "<local storage>",
        str(settings.train.work_dir) if settings.train.work_dir else None: "<work dir>",
        tempfile.gettempdir(): "<tmp>",
    }
    for private, placeholder in sorted(secrets.items(), key=lambda kv: -len(kv[0] or "")):
        if private:
            message = message.replace(private, placeholder)
    return message


def _execute(job: GenerateJob, runtime: Runtime, reporter: RedisReporter, shard: Shard | None, retries: int) -> bool:
    settings = runtime.settings
    body = json.dumps([job.model_dump(mode="json"), shard.model_dump() if shard else None])
    admission, deliveries = _admit(job, runtime, reporter, shard.index if shard else 0, retries, body)
    if admission is Admission.NO_RECORD:
        return False
    if admission is Admission.DEAD_LETTERED:
        telemetry.SHARDS.labels("dead_lettered").inc()
        return True
    stored: list[OutputRef] = []
    bulk = _is_bulk(job, shard, runtime)  # it holds a bulk slot (execute_generate)
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
            sheet_images=settings.sheet_images,
            signer=runtime.signer,
            one_image_manifest=settings.one_image_manifest,
        )
    except Exception as exc:  # a transient fault runs again later; any other ends the job loudly, with its reason
        if isinstance(exc, OUTAGES):  # Redis is away: no fault of the job, and failing it would need Redis anyway
            raise
        try:
            _fail_or_retry(job, exc, runtime, reporter, stored, retries, shard)
        except RetryLater:
            telemetry.SHARDS.labels("retried").inc()
            raise
        telemetry.SHARDS.labels("failed").inc()
        telemetry.IMAGES.labels(job.model_name).inc(len(stored))
        return True
    finally:
        runtime.pages.after_job(bulk=bulk)  # hand the heap's free pages back: after a bulk shard, or now and then
    telemetry.SHARDS.labels(result.outcome).inc()
    telemetry.IMAGES.labels(job.model_name).inc(len(result.outputs))
    where = f"job {job.job_id} shard {shard.index + 1}/{shard.count}" if shard else f"job {job.job_id}"
    if result.skipped:
        log.info("%s had already ended or been stored; delivery %d ignored", where, deliveries)
    elif result.recovered:
        log.warning("%s: every shard was stored but a run died before the manifest; wrote it, job succeeded", where)
    elif result.stopped:
        reporter.stopped(job, shard or plan_shards(job.total_images, job.total_images)[0], result.outputs)
        log.info("%s stopped after %d outputs: the job ended elsewhere", where, len(result.outputs))
    else:
        log.info("%s stored %d outputs%s", where, len(result.outputs), "; job succeeded" if result.completed else "")
    return True


def execute_finetune(job: FineTuneJob, runtime: Runtime, reporter: TrainingReporter, retries: int = 0) -> None:
    """Run or resume a fine-tune under its lease. Never raises for a job-level failure: the record carries it.

    A delivery that finds the job leased (the broker redelivered a job that outlived its visibility timeout, while
    the first worker still trains) waits: it acks once the job ends, or takes over when the holder stops renewing
    its lease (that worker died) and resumes from the last checkpoint. Two workers never train one job at once.

    Raises:
        RetryLater: as :func:`execute_generate`.
        RedisUnavailable: as :func:`execute_generate`.
    """
    token = current_job.set(job.job_id)
    try:
        lease = Lease(runtime.redis, job.job_id, runtime.settings.train.lease_ttl_s)
        while not lease.acquire():
            if not runtime.store.is_active(job.job_id):
                log.info("job %s ended while this delivery waited for its lease; nothing to do", job.job_id)
                return
            time.sleep(runtime.settings.train.lease_ttl_s / 3)
        with lease.heartbeat(), heartbeat(runtime, job.job_id):
            _execute_finetune(job, runtime, reporter, lease, retries)
    except OUTAGES as exc:
        raise RedisUnavailable(exc) from exc
    finally:
        current_job.reset(token)


def _execute_finetune(
    job: FineTuneJob, runtime: Runtime, reporter: TrainingReporter, lease: Lease, retries: int
) -> None:
    settings = runtime.settings
    admission, _ = _admit(job, runtime, reporter, 0, retries, job.model_dump_json())
    if admission is Admission.NO_RECORD:  # the task checked the record before the lease; it expired since
        log.warning("fine-tune %s: its record is gone (expired); nothing to do", job.job_id)
        return
    if admission is Admission.DEAD_LETTERED:
        telemetry.FINETUNES.labels("dead_lettered").inc()
        return
    workdir = Path(tempfile.mkdtemp(prefix=f"genq-finetune-{job.job_id}-", dir=settings.train.work_dir))
    try:
        base_dir = runtime.registry.path(job.base_name, job.base_version)
        result = run_finetune(
            job,
            storage=runtime.storage,
            models=runtime.model_store,
            base_dir=base_dir,
            workdir=workdir,
            reporter=reporter,
            allocate_version=lambda name: runtime.model_store.allocate_version(runtime.redis, name),
            on_published=lambda _name, _version: runtime.registry.refresh(runtime.redis),
            keep_going=lambda: not lease.lost.is_set(),
            limits=ArchiveLimits(max_total_bytes=settings.train.max_dataset_bytes),
            url_expires_s=settings.s3.presign_expires_s,
        )
    except Exception as exc:  # a transient fault runs again later (from its checkpoint); any other ends the job
        if isinstance(exc, OUTAGES):  # Redis is away: resumed from the checkpoint once it answers
            raise
        try:
            _fail_or_retry(job, exc, runtime, reporter, [], retries)
        except RetryLater:
            telemetry.FINETUNES.labels("retried").inc()
            raise
        telemetry.FINETUNES.labels("failed").inc()
        return
    finally:
        remove_tree(workdir)  # never raises, however deep the upload's folders went
    outcome = "skipped" if result.skipped else "stopped" if result.stopped else "published"
    telemetry.FINETUNES.labels(outcome).inc()
    log.info("fine-tune %s %s%s", job.job_id, outcome, f" {result.published}" if result.published else "")
