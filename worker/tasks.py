"""Celery tasks: thin adapters that decode the payload and call plain functions."""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from celery import signals
from pydantic import ValidationError

from producer import constants
from producer.contract import GenerateJob, Shard
from producer.events import CallbackMessage
from producer.status import utcnow
from worker.app import app, settings_of
from worker.callbacks import deliver
from worker.jobs import execute_generate
from worker.registry import ModelRegistry
from worker.reporting import RedisReporter
from worker.runtime import Runtime, get_runtime, model_roots, reset_runtime

log = logging.getLogger("genq.tasks")


def _runtime() -> Runtime:
    return get_runtime(settings_of(app))


def send_callback(message: CallbackMessage) -> None:
    app.send_task(constants.CALLBACK_TASK, args=[message.model_dump(mode="json")], queue=constants.CALLBACK_QUEUE)


@app.task(name=constants.GENERATE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def generate(payload: dict[str, Any], shard: dict[str, Any] | None = None) -> None:
    """Run a generate job, or one shard of it (payloads: :class:`GenerateJob` and :class:`Shard` as JSON)."""
    try:
        job = GenerateJob.model_validate(payload)
        part = Shard.model_validate(shard) if shard is not None else None
    except ValidationError as exc:
        # Acked and dropped: retrying a message that cannot be decoded can never succeed.
        log.error("dropping malformed generate payload: %s", exc)
        return
    runtime = _runtime()
    execute_generate(job, runtime, RedisReporter(runtime.store, send_callback), part)


@app.task(name=constants.CALLBACK_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def deliver_callback(payload: dict[str, Any]) -> None:
    """POST one signed callback event and record the attempt beside the job."""
    try:
        message = CallbackMessage.model_validate(payload)
    except ValidationError as exc:
        log.error("dropping malformed callback payload: %s", exc)
        return
    runtime = _runtime()
    settings = runtime.settings.webhook
    result = deliver(
        message.url, message.event, secret=settings.secret, msg_id=message.msg_id, timeout_s=settings.timeout_s
    )
    attempt = {
        "msg_id": message.msg_id,
        "type": message.event.type.value,
        "url": message.url,
        "ok": result.ok,
        "status_code": result.status_code,
        "error": result.error,
        "duration_ms": round(result.duration_ms, 1),
        "at": utcnow().isoformat(),
    }
    key = constants.JOB_EVENTS_KEY.format(job_id=message.job_id)
    pipe = runtime.redis.pipeline()
    pipe.rpush(key, json.dumps(attempt))
    pipe.expire(key, runtime.settings.job_ttl_s)
    pipe.execute()
    if not result.ok:
        log.warning("callback %s to %s failed: %s", message.msg_id, message.url, result.error or result.status_code)


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
    if type(getattr(sender, "pool", None)).__module__.endswith("prefork"):
        registry = ModelRegistry(model_roots(settings), settings.device)
        registry.publish(redis.Redis.from_url(settings.redis.url or ""))
    else:
        runtime = _runtime()
        registry = runtime.registry
        registry.publish(runtime.redis)
        registry.preload()
    log.info("worker ready: models %s", ", ".join(sorted(registry.catalog())) or "none")
