"""The Celery messages that run a job or deliver its callback events: task, queue, arguments and task id.

The client sends a job's messages when it records the job; the workers' sweeper (``worker.sweeper``) rebuilds and
sends again one the broker lost. Both build them here, so a message sent again is the one the client sent. Callback
messages carry no record to rebuild them from: whoever sends one keeps it in :class:`PendingCallbacks` until a worker
starts it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis

from producer import constants
from producer.contract import GenerateJob, plan_shards
from producer.finetune import FineTuneJob

if TYPE_CHECKING:  # producer.events imports the job store, which imports this module
    from producer.events import CallbackMessage


@dataclass(frozen=True)
class JobMessage:
    """One Celery message: of a job (a generate job has one per shard), or delivering one of its callback events."""

    task: str
    queue: str
    args: list[dict[str, Any]]
    task_id: str


def queue_for(job: GenerateJob | FineTuneJob) -> str:
    """The Celery queue a job's messages go to: one per generate priority, fine-tunes on their own."""
    return constants.TRAIN_QUEUE if isinstance(job, FineTuneJob) else constants.GENERATE_QUEUES[job.priority]


def task_id(job_id: str, shard: int) -> str:
    """The Celery task id of a job's message for ``shard`` (0 for a fine-tune): stable, so it can be looked for."""
    return f"{job_id}.{shard}"


def job_messages(job: GenerateJob | FineTuneJob, shard_size: int) -> list[JobMessage]:
    """Every message of ``job``: a fine-tune's one, or a generate job's one per shard of at most ``shard_size``."""
    payload = job.model_dump(mode="json")
    queue = queue_for(job)
    if isinstance(job, FineTuneJob):
        return [JobMessage(constants.FINETUNE_TASK, queue, [payload], task_id(job.job_id, 0))]
    return [
        JobMessage(constants.GENERATE_TASK, queue, [payload, shard.model_dump()], task_id(job.job_id, shard.index))
        for shard in plan_shards(job.total_images, shard_size)
    ]


def callback_task(message: CallbackMessage) -> JobMessage:
    """The message that makes one delivery attempt of a callback event; each send (a retry, a wait) has its own id."""
    return JobMessage(
        constants.CALLBACK_TASK, constants.CALLBACK_QUEUE, [message.model_dump(mode="json")], f"cb.{uuid.uuid4().hex}"
    )


class PendingCallbacks:
    """Callback messages sent and not started yet, kept so that the sweeper can send again one the broker lost.

    >>> pending = PendingCallbacks(client)
    >>> pending.send(callback_task(event), send_task, countdown=0)  # kept, then sent
    >>> pending.started(task_id)  # the delivery task, first thing: from now on kombu's unacked hash keeps it
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def send(self, message: JobMessage, send: Callable[[JobMessage, float], None], countdown: float = 0.0) -> None:
        """Keep ``message`` (due in ``countdown`` s), then ``send(message, countdown)``; forgotten if that raises."""
        pipe = self.redis.pipeline()
        pipe.zadd(constants.CALLBACKS_PENDING_KEY, {message.task_id: time.time() + countdown})
        pipe.hset(constants.CALLBACKS_PENDING_ARGS_KEY, message.task_id, json.dumps(message.args))
        pipe.execute()
        try:
            send(message, countdown)
        except Exception:
            self.started(message.task_id)
            raise

    def started(self, task_id: str) -> None:
        """Forget a message a worker has started (or one that could not be sent)."""
        pipe = self.redis.pipeline()
        pipe.zrem(constants.CALLBACKS_PENDING_KEY, task_id)
        pipe.hdel(constants.CALLBACKS_PENDING_ARGS_KEY, task_id)
        pipe.hdel(constants.CALLBACKS_RESENT_KEY, task_id)
        pipe.execute()

    def count_resend(self, task_id: str) -> int:
        """Count one more time the sweeper sent the message again; returns the count."""
        return int(self.redis.hincrby(constants.CALLBACKS_RESENT_KEY, task_id, 1))

    def due_before(self, ceiling: float, limit: int) -> list[str]:
        """Task ids of kept messages due before ``ceiling`` (Unix s), the earliest first, at most ``limit``."""
        raw = cast(list[bytes], self.redis.zrangebyscore(constants.CALLBACKS_PENDING_KEY, "-inf", ceiling, 0, limit))
        return [r.decode() for r in raw]

    def message(self, task_id: str) -> JobMessage | None:
        """The kept message with ``task_id``, or None once started."""
        raw = self.redis.hget(constants.CALLBACKS_PENDING_ARGS_KEY, task_id)
        if raw is None:
            return None
        return JobMessage(constants.CALLBACK_TASK, constants.CALLBACK_QUEUE, json.loads(raw), task_id)
