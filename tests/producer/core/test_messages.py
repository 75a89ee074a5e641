"""The Celery messages of jobs and callback events: their queue, and what Celery shows instead of their payload."""

from __future__ import annotations

from datetime import UTC, datetime

from producer.contract import EventType, GenerateJob, JobStatus, JobView, LabelCount, WebhookEvent
from producer.core import constants
from producer.core.callbacks.events import callback_message
from producer.core.messages import callback_task, job_messages, queue_for


def _job(count: int) -> GenerateJob:
    return GenerateJob(
        job_id="job-0001",
        model="fmnist-cgan",
        model_name="fmnist-cgan",
        model_version="1",
        items=[LabelCount(index=0, name="tshirt", count=count)],
        seed=7,
        created_at=datetime(2026, 12, 7, tzinfo=UTC),
        metadata={"note": "x" * 5_000},
        callback={"url": "https://shop.example/hooks/genq"},
    )


def test_a_job_message_shows_its_job_and_task_not_its_payload() -> None:
    messages = job_messages(_job(600), shard_size=250)

    assert [m.argsrepr for m in messages] == [f"(job 'job-0001', task 'job-0001.{i}')" for i in range(3)]


def test_a_callback_message_shows_its_event_and_job_not_the_view_it_carries() -> None:
    job = _job(1)
    view = JobView(
        id=job.job_id, status=JobStatus.RUNNING, model="fmnist-cgan", metadata=job.metadata, created_at=job.created_at
    )
    event = callback_message(job.callback, EventType.RUNNING, view, seq=1)
    assert event is not None

    shown = callback_task(event).argsrepr

    assert shown == f"(event 'running' of job 'job-0001', {event.msg_id!r})"
    assert "x" * 100 not in shown


def test_a_job_of_more_than_one_forward_pass_waits_in_its_prioritys_bulk_queue() -> None:
    small, bulk = _job(constants.SMALL_JOB_MAX_IMAGES), _job(constants.SMALL_JOB_MAX_IMAGES + 1)

    assert queue_for(small) == "generate" and queue_for(bulk) == "generate.bulk"
    assert queue_for(bulk.model_copy(update={"priority": "high"})) == "generate.high.bulk"
    assert {m.queue for m in job_messages(bulk, shard_size=10)} == {"generate.bulk"}  # every shard of it


def test_workers_serve_each_prioritys_small_jobs_before_its_bulk_ones_and_both_before_a_lower_priority() -> None:
    assert constants.WORKER_QUEUES == (
        "callbacks",
        "submit",
        "generate.high",
        "generate.high.bulk",
        "generate",
        "generate.bulk",
        "generate.low",
        "generate.low.bulk",
    )


def test_a_callback_event_carries_its_sequence_number_in_its_body_and_an_older_body_without_one_still_reads() -> None:
    job = _job(1)
    view = JobView(id=job.job_id, status=JobStatus.RUNNING, model="fmnist-cgan", created_at=job.created_at)

    first = callback_message(job.callback, EventType.QUEUED, view, seq=1)
    second = callback_message(job.callback, EventType.RUNNING, view, seq=2)
    assert first is not None and second is not None

    assert [first.event.seq, second.event.seq] == [1, 2]
    assert '"seq":2' in second.event.model_dump_json()
    older = second.event.model_dump(mode="json")
    del older["seq"]  # an event made before genq sent it, still on the queue after an upgrade
    assert WebhookEvent.model_validate(older).seq is None
