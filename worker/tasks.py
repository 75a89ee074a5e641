"""Celery tasks: thin adapters that decode the payload and call plain functions."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import redis
from celery import signals
from celery.exceptions import Reject
from pydantic import ValidationError

from producer.contract import FineTuneJob, GenerateJob, GenerateRequest, Shard
from producer.core import constants
from producer.core.callbacks.delivery import SETTLED_OUTCOMES, CallbackLedger, Deliverer, Settle, run_delivery
from producer.core.callbacks.events import CallbackMessage
from producer.core.callbacks.outbox import CLAIM_AFTER_S, OutboxEntry
from producer.core.callbacks.pending import PendingCallbacks
from producer.core.callbacks.secrets import TenantSecrets
from producer.core.clock import utcnow
from producer.core.intake import Intake
from producer.core.messages import JobMessage, callback_task, publish, queue_for, task_id
from producer.core.settings import dev_mode_problem
from producer.core.store import JobStore
from producer.errors import IdempotencyConflict, InvalidJob
from worker import telemetry
from worker.app import GIVEN_BACK, app, settings_of
from worker.deadletter import record_outbox_entry, record_task
from worker.jobs import NoBulkSlot, RedisUnavailable, execute_finetune, execute_generate, messages_ahead
from worker.memory import tune_malloc
from worker.outage import OUTAGES, wait_for_redis
from worker.relay import Relay
from worker.reporting import RedisReporter, TrainingReporter
from worker.retries import RetryLater
from worker.runtime import Runtime, get_runtime, make_registry, reset_runtime
from worker.settings import WorkerSettings
from worker.watchdog import Watchdog, heart_for

log = logging.getLogger("genq.tasks")


# Tasks this process runs at once: the threads pool's concurrency (set at worker_init); 1 in a prefork child.
_task_threads = 1


def _runtime() -> Runtime:
    return get_runtime(settings_of(app), _task_threads)


def _publish(message: JobMessage, countdown: float = 0.0) -> None:
    publish(app, message, countdown)


# max_retries=None: genq's retry policy (GENQ_CELERY__RETRIES) bounds retries; Celery's default of 3 would raise the
# job's error out of the fourth retry instead (acked, and the job left running).
_JOB_TASK: dict[str, Any] = {
    "bind": True,
    "acks_late": True,  # acknowledged only after the job ended: a killed worker's message comes back
    "reject_on_worker_lost": True,
    "ignore_result": True,  # the job record is the result
    "max_retries": None,
}


@app.task(name=constants.GENERATE_TASK, **_JOB_TASK)
def generate(self: Any, payload: dict[str, Any], shard: dict[str, Any] | None = None) -> None:
    """Run a generate job, or one shard of it (payloads: :class:`GenerateJob` and :class:`Shard` as JSON)."""
    try:
        job = GenerateJob.model_validate(payload)
        part = Shard.model_validate(shard) if shard is not None else None
    except ValidationError as exc:
        # Acked and dead-lettered: retrying a payload that does not validate can never succeed.
        record_task(generate, f"not a generate job: {_errors(exc)}", [payload, shard])
        return
    runtime = _runtime()
    reporter = RedisReporter(runtime.store, runtime.settings.webhook.progress_interval_s)
    retries = self.request.retries or 0
    try:
        served = self.app.amqp.queues.consume_from or ()  # -Q
        ahead = messages_ahead(runtime, queue_for(job), served)
        ran = execute_generate(job, runtime, reporter, part, retries, give_way=ahead)
    except NoBulkSlot as busy:
        # Back to its queue (kombu: to its end, in one transaction) with its task id, its retries and its delivery
        # count untouched: the thread takes the next message in -Q order, a high job before it.
        log.debug("%s: %s; handed back to its queue", task_id(job.job_id, part.index if part else 0), busy)
        raise Reject(GIVEN_BACK, requeue=True) from None
    except RetryLater as later:  # a transient fault: the same message again, after the backoff
        raise _retry(self, later, runtime, task_id(job.job_id, part.index if part else 0)) from later
    except RedisUnavailable as down:  # never acknowledged: the message goes back to its queue
        raise _hand_back(runtime, task_id(job.job_id, part.index if part else 0), down.cause) from down
    if not ran:  # clients record a job before they enqueue it
        reason = f"no record of job {job.job_id} (never created, or expired after GENQ_JOB_TTL_S)"
        record_task(generate, reason, [payload, shard], job_id=job.job_id)


@app.task(name=constants.FINETUNE_TASK, **_JOB_TASK)
def finetune(self: Any, payload: dict[str, Any]) -> None:
    """Run or resume a fine-tune job (payload: :class:`FineTuneJob` as JSON) and publish its model version."""
    try:
        job = FineTuneJob.model_validate(payload)
    except ValidationError as exc:
        record_task(finetune, f"not a fine-tune job: {_errors(exc)}", [payload])
        return
    runtime = _runtime()
    if not runtime.store.exists(job.job_id):
        reason = f"no record of job {job.job_id} (never created, or expired after GENQ_JOB_TTL_S)"
        record_task(finetune, reason, [payload], job_id=job.job_id)
        return
    reporter = TrainingReporter(runtime.store, runtime.settings.webhook.progress_interval_s)
    try:
        execute_finetune(job, runtime, reporter, self.request.retries or 0)
    except RetryLater as later:  # resumes from the job's last checkpoint
        raise _retry(self, later, runtime, task_id(job.job_id, 0)) from later
    except RedisUnavailable as down:  # resumed from its checkpoint once Redis answers
        raise _hand_back(runtime, task_id(job.job_id, 0), down.cause) from down


@app.task(name=constants.SUBMIT_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def submit(self: Any, **request: Any) -> None:
    """Record and enqueue a generate job that any Celery client sent (docs/celery.md): ``request`` is a
    :class:`GenerateRequest` as keyword arguments, validated exactly as the Python client and the HTTP API validate
    it; the job's id is this task's id, so the sender knows it. A request that is refused is dead-lettered with the
    reason, naming the field."""
    job_id = str(self.request.id)
    try:
        parsed = GenerateRequest.model_validate(request)
    except ValidationError as exc:
        record_task(submit, f"not a generate request: {_errors(exc)}", [request], job_id=job_id)
        return
    intake = _intake()
    try:
        if intake.store.exists(job_id):  # a redelivered submission: the job it recorded is under way
            log.info("job %s: submitted already; this delivery changes nothing", job_id)
            return
        view = intake.submit(parsed, job_id=job_id)
    except (InvalidJob, IdempotencyConflict) as exc:  # nothing was recorded; the key, if any, was let go
        record_task(submit, f"refused: {exc}", [request], job_id=job_id)
        return
    except ValidationError as exc:  # the task id is no job id (a sender that chose its own)
        record_task(submit, f"refused: {_errors(exc)}", [request], job_id=job_id)
        return
    except OUTAGES as exc:  # handed back: the next delivery submits it, or finds it recorded
        wait_s = settings_of(app).celery.redis_wait_s
        raise _requeue_when_redis_answers(intake.redis, wait_s, job_id, exc, "the submission") from exc
    log.info("job %s: %d images of %s, submitted by a Celery client", view.id, view.progress.total, view.model)


_intake_lock = threading.Lock()
_intake_instance: Intake | None = None


def _intake() -> Intake:
    # A Redis client and the job store, not the runtime: a worker that only takes submissions loads no model.
    global _intake_instance
    with _intake_lock:
        if _intake_instance is None:
            settings = settings_of(app)
            client = redis.Redis.from_url(settings.redis.url or "")
            _intake_instance = Intake(client, JobStore(client, settings.job_ttl_s), settings, _publish)
        return _intake_instance


def _retry(task: Any, later: RetryLater, runtime: Runtime, shard_task_id: str) -> Exception:
    """What the task raises to run the same message again after the backoff: Celery's Retry, once it published the
    retry (this message is then acked). Celery drops the message when it cannot publish (its Reject(requeue=False)):
    Redis, the broker, is then away, and the message is handed back instead (:func:`_hand_back`)."""
    try:
        return task.retry(countdown=later.delay_s, exc=later.cause, throw=False)
    except Reject as unsent:
        if unsent.requeue:
            raise
        return _hand_back(runtime, shard_task_id, unsent.reason)


def _hand_back(runtime: Runtime, shard_task_id: str, cause: Any) -> Reject:
    """The Reject that puts a job's message back on its queue once Redis answers (:func:`_requeue_when_redis_answers`).
    The shard is listed as running (``worker.watchdog``): should its message be gone (Redis lost it), it is sent
    again."""

    def watch() -> None:
        try:
            heart_for(runtime.redis, runtime.settings.sweeper.heartbeat_s).watch(shard_task_id)
        except redis.RedisError as exc:  # Redis went away again: the reject meets the same fate
            log.warning("%s: not listed for the watchdog (%s)", shard_task_id, exc)

    what = "the job stays as it is and its message"
    return _requeue_when_redis_answers(
        runtime.redis, runtime.settings.celery.redis_wait_s, shard_task_id, cause, what, watch
    )


def _requeue_when_redis_answers(
    client: redis.Redis, wait_s: float, task: str, cause: Any, what: str, answered: Callable[[], None] | None = None
) -> Reject:
    """The Reject that puts a message back on its queue (kombu moves it out of ``unacked`` in one transaction), once
    Redis answers again: wait for it up to ``GENQ_CELERY__REDIS_WAIT_S`` (then ``answered()``). If it still does not
    answer, the reject fails, Celery logs that, and the message stays in ``unacked``, restored after the visibility
    timeout. Never an ack: what the task did not finish is not lost."""
    log.warning(
        "%s: Redis did not answer (%s); %s goes back to its queue once Redis answers (waiting up to %g s)",
        task,
        cause,
        what,
        wait_s,
    )
    if wait_for_redis(client, wait_s):
        if answered is not None:
            answered()
    else:
        log.error(
            "%s: Redis still did not answer after %g s; the message stays unacknowledged and Redis restores it "
            "to its queue after GENQ_CELERY__VISIBILITY_TIMEOUT_S",
            task,
            wait_s,
        )
    return Reject(cause, requeue=True)


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in exc.errors())


@signals.task_failure.connect
@signals.task_internal_error.connect
def _generate_raised(
    sender: Any = None,
    exception: BaseException | None = None,
    args: Any = None,
    kwargs: Any = None,
    request: Any = None,
    **_: Any,
) -> None:
    # generate never raises for a job (execute_generate fails the job instead); what raises is a message whose
    # arguments do not fit the task (wrong count, kwargs not a mapping) or a worker that cannot build its runtime.
    # Celery acks such a message anyway: keep it as a dead letter rather than lose it.
    if getattr(sender, "name", None) in (constants.GENERATE_TASK, constants.FINETUNE_TASK, constants.CALLBACK_TASK):
        reason = f"the task raised {type(exception).__name__}: {exception}"
        record_task(sender, reason, [args, kwargs], request=request)


@app.task(name=constants.CALLBACK_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def deliver_callback(self: Any, payload: dict[str, Any]) -> None:
    """Deliver one signed callback event (one attempt), record it, and enqueue its retry if it failed. With Redis
    away the message goes back to its queue, unacknowledged, once Redis answers: the attempt runs again (the receiver
    may get the event twice, with one ``webhook-id``) rather than be lost."""
    client, deliverer = _callback_deps()
    try:
        _deliver(self, payload, client, deliverer)
    except OUTAGES as exc:
        wait_s = settings_of(app).celery.redis_wait_s
        raise _requeue_when_redis_answers(client, wait_s, self.request.id, exc, "the callback event") from exc


def _deliver(task: Any, payload: dict[str, Any], client: redis.Redis, deliverer: Deliverer) -> None:
    pending = PendingCallbacks(client)
    pending.started(task.request.id)  # kombu's unacked hash holds the message from now on
    try:
        message = CallbackMessage.model_validate(payload)
    except ValidationError as exc:  # acked and dead-lettered: a payload that does not validate never will
        record_task(deliver_callback, f"not a callback event: {_errors(exc)}", [payload])
        return
    _attempt(message, client, deliverer)


def _attempt(message: CallbackMessage, client: redis.Redis, deliverer: Deliverer, settle: Settle | None = None) -> bool:
    """One delivery attempt of ``message``, from the delivery task or the relay's first attempt: what follows (a
    retry, a deferral while its host is busy) goes on the callbacks queue. True when ``settle`` (the relay's
    acknowledgement of the event's outbox entry) ran in the transaction of the attempt's record."""
    settings = settings_of(app)
    pending = PendingCallbacks(client)
    outcome = run_delivery(
        message,
        webhook=settings.webhook,
        ledger=CallbackLedger(client, settings.job_ttl_s),
        requeue=lambda later, countdown: pending.send(callback_task(later), _publish, countdown),
        # Retries wait on the broker in hops well inside the visibility timeout (see producer.core.callbacks.delivery).
        max_hop_s=settings.celery.visibility_timeout_s / 2,
        deliverer=deliverer,
        signing_secrets=lambda tenant: _tenant_signing(client, tenant),
        settle=settle,
    )
    telemetry.CALLBACKS.labels(outcome.value).inc()
    return settle is not None and outcome in SETTLED_OUTCOMES


def _tenant_signing(client: redis.Redis, tenant: str) -> list[str] | None:
    """The tenant's signing secrets now (two during a rotation's overlap), or None if it has none."""
    secret = TenantSecrets(client).get(tenant)
    return secret.signing(utcnow()) if secret is not None else None


_callbacks: tuple[redis.Redis, Deliverer] | None = None
_callbacks_lock = threading.Lock()


def _callback_deps() -> tuple[redis.Redis, Deliverer]:
    # Redis and the delivery threads' HTTP clients and host slots, built on the first delivery; not the runtime,
    # whose models and S3 client a callbacks-only worker has no use for.
    global _callbacks
    with _callbacks_lock:
        if _callbacks is None:
            settings = settings_of(app)
            _callbacks = (redis.Redis.from_url(settings.redis.url or ""), Deliverer(settings.webhook))
        return _callbacks


@signals.worker_init.connect
def _before_the_pool_starts(sender: Any = None, **_: Any) -> None:
    # Before the pool starts its threads (or forks its children): what is allocated later obeys these.
    global _task_threads
    concurrency = getattr(sender, "concurrency", None)
    if isinstance(concurrency, int) and "thread" in str(getattr(sender, "pool_cls", "")):
        _task_threads = concurrency  # every task thread may store a manifest or a shard at once: see s3_pool_size
    settings = settings_of(app)
    if settings.storage == "s3":
        problem = dev_mode_problem(settings, s3_endpoint=os.environ.get("AWS_ENDPOINT_URL", ""))
        if problem is not None:  # the placeholder webhook secret is public: never sign real outputs' callbacks with it
            log.critical("refusing to start: %s", problem)
            raise SystemExit(2)  # Celery logs and ignores a signal handler's exceptions, not an exit
    tuned = tune_malloc(settings.malloc_arena_max, settings.malloc_policy)
    if tuned:
        log.info("malloc: %s", ", ".join(f"{k}={v}" for k, v in tuned.items()))


@signals.worker_process_init.connect
def _init_pool_process(**_: Any) -> None:
    # A prefork child: build its own connections and load models here, never in the parent (torch hangs in a
    # child forked after the parent ran a forward pass).
    reset_runtime()
    _runtime().registry.preload()


@signals.worker_ready.connect
def _worker_ready(sender: Any = None, **_: Any) -> None:
    # ``sender`` is the consumer; its pool tells prefork (children build their runtime and load models in
    # _init_pool_process; the parent only publishes the catalogue and must not touch torch) from threads/solo
    # (this process serves jobs: build the runtime and load models now).
    settings = settings_of(app)
    client = redis.Redis.from_url(settings.redis.url or "")
    _start_sweeper(settings, client)
    if constants.CALLBACK_QUEUE in _consumed(sender):
        _start_relay()
    if _serves_only_callbacks(sender):  # loads no model: deliveries need none (worker.tasks.deliver_callback)
        if settings.metrics_port is not None:
            telemetry.serve(settings.metrics_port)
        log.info("worker ready: callbacks only")
        return
    if type(getattr(sender, "pool", None)).__module__.endswith("prefork"):
        _storage, _store, registry = make_registry(settings)
        registry.publish(client)
    else:
        runtime = _runtime()
        registry = runtime.registry
        registry.publish(runtime.redis)
        registry.preload()
        if settings.metrics_port is not None:  # one process serves every job: its registry has every metric
            telemetry.serve(settings.metrics_port)
            log.info("metrics on :%d/metrics", settings.metrics_port)
    log.info("worker ready: models %s", ", ".join(sorted(registry.catalog())) or "none")


def _consumed(consumer: Any) -> set[str]:
    queues = getattr(getattr(getattr(consumer, "app", None), "amqp", None), "queues", None)
    return set(getattr(queues, "consume_from", None) or ())


def _serves_only_callbacks(consumer: Any) -> bool:
    return _consumed(consumer) == {constants.CALLBACK_QUEUE}


_relay: Relay | None = None


def _start_relay() -> None:
    # In the main process, whatever the pool, beside the deliveries this worker serves: it reads the outbox and
    # makes each event's first attempt on threads of its own, sharing this process's HTTP clients and host slots
    # with the delivery task (worker.relay).
    global _relay
    if _relay is not None:
        return
    client, deliverer = _callback_deps()
    webhook = settings_of(app).webhook

    def dead_letter(entry: OutboxEntry, reason: str) -> None:
        record_outbox_entry(client, entry, reason)

    _relay = Relay(
        client,
        lambda message, settle: _attempt(message, client, deliverer, settle),
        dead_letter,
        threads=min(webhook.concurrency, RELAY_THREADS_MAX),
        # Never claim an entry whose attempt may still be under way: the attempt deadline bounds it.
        claim_after_s=max(CLAIM_AFTER_S, 2 * webhook.attempt_deadline_s + 5),
    )
    _relay.start()
    log.info("callback events: first attempts from the outbox as %s", _relay.outbox.consumer)


RELAY_THREADS_MAX = 16  # the relay's delivery threads; retries and deferrals run on the worker's own pool


_sweeper: Watchdog | None = None


def _start_sweeper(settings: WorkerSettings, client: redis.Redis) -> None:
    # In the worker's main process, whatever the pool: it only reads Redis and sends messages (worker.sweeper), and
    # looks after running shards whose worker and message are gone (worker.watchdog).
    global _sweeper
    if not settings.sweeper.enabled or _sweeper is not None:
        return

    _sweeper = Watchdog(client, JobStore(client, settings.job_ttl_s), _publish, settings.sweeper)
    _sweeper.start()
    log.info(
        "sweeping for lost messages every %g s (jobs queued over %g s, running shards unbeaten for %g s)",
        settings.sweeper.interval_s,
        settings.sweeper.stranded_after_s,
        settings.sweeper.orphaned_after_s,
    )
