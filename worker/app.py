"""The Celery application: Redis broker, JSON only, late acks, one message at a time per process, queues served
in the order given, poison messages dead-lettered.

``celery -A worker.app:app worker`` and ``genq worker`` both use the module-level ``app``; tests and the CLI
build their own with :func:`create_app`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from celery.app.amqp import AMQP
from kombu import Connection

from producer.core import constants
from producer.errors import ConfigurationError
from worker.settings import WorkerSettings

# The reason of the Reject that hands a bulk shard back to its queue for want of a bulk slot (worker.tasks).
GIVEN_BACK = "genq: no free bulk slot; handed back to its queue"


class _GivenBackFilter(logging.Filter):
    """Drops Celery's line for a shard handed back for want of a bulk slot: under load that happens several times a
    second, and Celery logs every Reject as a warning with a traceback (``celery.app.trace``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = record.args
        return not (isinstance(context, Mapping) and GIVEN_BACK in str(context.get("exc", "")))


# kombu's Redis transport, except that a list element that is not a kombu message is dead-lettered instead of
# stopping the worker (worker.deadletter); the broker_transport of a redis:// broker.
TRANSPORT = "worker.deadletter:Transport"


class _Connection(Connection):
    """kombu's Connection, naming genq's transport by the broker it speaks in its URL: ``redis://host:6379/0``, not
    ``worker.deadletter:Transport://host:6379/0``.

    Flower picks its broker client by that URL's scheme (``flower.utils.broker.Broker``): with kombu's text it
    answered "'redis' broker is not supported" on its broker page and showed no queue lengths. Only the text
    changes: clones and pickles (``info()``) keep genq's transport."""

    def as_uri(self, *args: Any, **kwargs: Any) -> str:
        uri: str = super().as_uri(*args, **kwargs)
        ours = f"{TRANSPORT}://"
        return "redis://" + uri[len(ours) :] if uri.startswith(ours) else uri


class _Amqp(AMQP):
    """Celery's AMQP utilities with :class:`_Connection` (every connection ``app.connection*()`` opens)."""

    Connection = _Connection


def _quiet_given_back() -> None:
    trace = logging.getLogger("celery.app.trace")
    if not any(isinstance(f, _GivenBackFilter) for f in trace.filters):
        trace.addFilter(_GivenBackFilter())


def create_app(settings: WorkerSettings) -> Celery:
    """A Celery app configured from ``settings`` with genq's tasks registered."""
    _quiet_given_back()
    broker = settings.redis.url or "redis://127.0.0.1:6379/0"
    app = Celery("genq", broker=broker, include=["worker.tasks"], amqp=_Amqp)
    if urlsplit(broker).scheme == "redis":
        # Other schemes (rediss, sentinel) keep kombu's own transport.
        app.conf.broker_transport = TRANSPORT
    app.conf.update(
        # Security: never accept pickle (Celery's security guide).
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # Job state lives in genq's own job records; Celery's result backend would duplicate it.
        task_ignore_result=True,
        # A message is acknowledged only after its job has ended; a killed process puts it back on the queue.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A prefork child loads its models before it reports up; Celery's default 4 s kills slow starters.
        worker_proc_alive_timeout=60.0,
        broker_connection_retry_on_startup=True,
        # A lost broker connection (Redis restarting) leaves running jobs running: each acks its message when it
        # ends, or hands it back if it met the outage (worker.tasks), through its channel once Redis answers (the
        # unacked hash lives in Redis; worker.deadletter.Channel). Celery 6 turns this on by default; it would
        # cancel them.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options={
            # Must exceed the longest job, or Redis redelivers a job while it still runs (see CelerySettings).
            "visibility_timeout": settings.celery.visibility_timeout_s,
            # Restore unacked messages of a dead worker promptly once the visibility timeout has passed
            # (kombu's defaults sweep only every 10 s x 10 = ~100 s).
            "unacked_restore_interval": settings.celery.unacked_restore_interval_s,
            "unacked_restore_throttle": 1,  # scan on every interval: the interval alone sets the period
            # Each sweep holds a lock in Redis (kombu's "unacked_mutex", 300 s by default) so that one consumer of the
            # fleet sweeps at a time. A worker SIGKILLed inside its sweep leaves the lock held: no one restored any
            # dead worker's messages for 5 minutes (a killed worker's shards stayed unacked, their job "running").
            # Concurrent sweeps are harmless (each restore is a WATCH transaction), so let it lapse within a few
            # intervals.
            "unacked_mutex_expire": 3 * settings.celery.unacked_restore_interval_s,
            # Serve a worker's queues strictly in the order given (-Q): BRPOP over several keys pops from the first
            # non-empty one. kombu's default, round_robin, moves the queue just served to the back, so a high job
            # would alternate with low ones instead of going first.
            "queue_order_strategy": "priority",
        },
        # Celery's consumer, recording the messages it refuses (bad content, unknown task) as dead letters.
        worker_consumer="worker.deadletter:Consumer",
        task_routes={
            constants.GENERATE_TASK: {"queue": constants.GENERATE_QUEUE},  # the client picks a queue per priority
            constants.CALLBACK_TASK: {"queue": constants.CALLBACK_QUEUE},
            constants.FINETUNE_TASK: {"queue": constants.TRAIN_QUEUE},  # long jobs on workers of their own
            constants.SUBMIT_TASK: {"queue": constants.SUBMIT_QUEUE},
        },
        task_default_queue=constants.GENERATE_QUEUE,
        worker_hijack_root_logger=False,
        # Off unless asked for: Flower sends enable_events to the workers while it runs (see CelerySettings).
        worker_send_task_events=settings.celery.task_events,
    )
    app.conf.genq_settings = settings
    return app


def settings_of(app: Celery) -> WorkerSettings:
    settings = app.conf.get("genq_settings")
    if not isinstance(settings, WorkerSettings):
        raise ConfigurationError("this Celery app was not built by worker.app.create_app")
    return settings


app = create_app(WorkerSettings())
