"""The Celery messages that run a job or deliver its callback events: task, queue, arguments and task id.

The client sends a job's messages when it records the job; the workers' sweeper (``worker.sweeper``) rebuilds and
sends again one the broker lost. Both build them here, so a message sent again is the one the client sent. Callback
messages carry no record to rebuild them from: whoever sends one keeps it in :class:`PendingCallbacks` until a worker
starts it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from producer.contract import FineTuneJob, GenerateJob, plan_shards
from producer.core import constants

if TYPE_CHECKING:  # producer.core.callbacks.events imports the job store, which imports this module
    from producer.core.callbacks.events import CallbackMessage


@dataclass(frozen=True)
class JobMessage:
    """One Celery message: of a job (a generate job has one per shard), or delivering one of its callback events."""

    task: str
    queue: str
    args: list[dict[str, Any]]
    task_id: str

    @property
    def argsrepr(self) -> str:
        """What Celery shows for the arguments (worker logs, Flower, the message's ``argsrepr`` header): the job and
        its shard or event, not the payload. Left to Celery, ``saferepr`` of a payload holding a job view costs about
        0.3 ms of CPU per message and up to 1 KB more on the wire."""
        first = self.args[0] if self.args else {}
        if self.task == constants.CALLBACK_TASK:
            event = first.get("event", {})
            return f"(event {event.get('type')!r} of job {first.get('job_id')!r}, {first.get('msg_id')!r})"
        return f"(job {first.get('job_id')!r}, task {self.task_id!r})"


def publish(app: Any, message: JobMessage, countdown: float = 0.0) -> None:
    """Send ``message`` through the Celery app ``app`` (the client's or a worker's), to run ``countdown`` s from now
    (0: at once). Its task id is the message's, so the sweeper can look for it; Celery shows
    :attr:`JobMessage.argsrepr` instead of the payload."""
    app.send_task(
        message.task,
        args=message.args,
        argsrepr=message.argsrepr,
        kwargsrepr="{}",
        queue=message.queue,
        task_id=message.task_id,
        countdown=countdown or None,
    )


def queue_for(job: GenerateJob | FineTuneJob) -> str:
    """The Celery queue a job's messages go to: per generate priority, one for small jobs and one for bulk ones
    (more than ``SMALL_JOB_MAX_IMAGES`` images, served after the small ones); fine-tunes on their own."""
    if isinstance(job, FineTuneJob):
        return constants.TRAIN_QUEUE
    bulk = job.total_images > constants.SMALL_JOB_MAX_IMAGES
    return (constants.GENERATE_BULK_QUEUES if bulk else constants.GENERATE_QUEUES)[job.priority]


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
