"""The Celery messages that run a job: which task, on which queue, with which arguments and task id.

The client sends them when it records a job; the workers' sweeper (``worker.sweeper``) rebuilds and sends again a
message the broker lost. Both build them here, so a message sent again is the one the client sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from producer import constants
from producer.contract import GenerateJob, plan_shards
from producer.finetune import FineTuneJob


@dataclass(frozen=True)
class JobMessage:
    """One Celery message of a job (a generate job has one per shard)."""

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
