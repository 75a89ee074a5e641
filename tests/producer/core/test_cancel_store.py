"""Canceling jobs in Redis: only queued or running jobs, never undone by a shard that finishes later, outputs kept."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest
import redis
from api_server import publish_catalog
from factories import output_refs

from producer.client import Client
from producer.contract import (
    Callback,
    EventType,
    GenerateJob,
    GenerateRequest,
    JobError,
    JobStatus,
    LabelCount,
    OutputRef,
    WebhookEvent,
)
from producer.core import constants
from producer.core.settings import RedisSettings
from producer.core.store import JobStore
from producer.errors import JobEnded, JobNotFound
from producer.settings import ClientSettings

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _job(job_id: str = "job-0001", count: int = 4, tenant: str | None = None) -> GenerateJob:
    return GenerateJob(
        job_id=job_id,
        model="fmnist-cgan",
        model_name="fmnist-cgan",
        model_version="1",
        items=[LabelCount(index=8, name="bag", count=count)],
        seed=1,
        created_at=T0,
        tenant=tenant,
    )


def _outputs(indices: range) -> list[OutputRef]:
    return output_refs(indices)


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client, ttl_s=3600)


def test_a_queued_job_is_canceled_with_its_finish_time_and_no_outputs(store: JobStore) -> None:
    store.create(_job())
    assert store.mark_canceled("job-0001")
    view = store.get("job-0001")
    assert view.status is JobStatus.CANCELED and view.finished_at is not None
    assert view.started_at is None and view.outputs == []
    assert not store.is_active("job-0001")
    assert store.start("job-0001") is None, "a canceled job must never start"


@pytest.mark.parametrize("end", ["succeeded", "failed", "canceled"])
def test_a_job_that_already_ended_cannot_be_canceled(store: JobStore, end: str) -> None:
    store.create(_job())
    store.start("job-0001")
    if end == "succeeded":
        store.mark_succeeded("job-0001", _outputs(range(4)), "jobs/job-0001/manifest.json")
    elif end == "failed":
        store.mark_failed("job-0001", JobError(type="Boom", message="boom"))
    else:
        store.mark_canceled("job-0001")
    assert not store.mark_canceled("job-0001")
    assert store.get("job-0001").status.value == end


def test_the_last_shard_finishing_after_a_cancel_never_marks_the_job_succeeded(store: JobStore) -> None:
    store.create(_job(count=8), shards=2)
    store.start("job-0001")
    assert not store.complete_shard("job-0001", 0, 2, _outputs(range(0, 4)))
    assert store.mark_canceled("job-0001")

    assert store.complete_shard("job-0001", 1, 2, _outputs(range(4, 8)))  # the running shard lands, last
    every = [o for part in store.shard_outputs("job-0001", 2) for o in part]
    assert [o.index for o in every] == list(range(8))
    assert not store.mark_succeeded("job-0001", every, "jobs/job-0001/manifest.json")
    assert not store.mark_failed("job-0001", JobError(type="Late", message="late"))
    view = store.get("job-0001")
    assert view.status is JobStatus.CANCELED and view.manifest_key is None and view.error is None
    assert [o.index for o in view.outputs] == list(range(8))


def test_a_canceled_view_lists_finished_shards_and_what_stopped_shards_stored(store: JobStore) -> None:
    store.create(_job(count=12), shards=3)
    store.start("job-0001")
    store.complete_shard("job-0001", 1, 3, _outputs(range(4, 8)))
    store.set_progress("job-0001", 1, 4)
    store.set_progress("job-0001", 0, 2)
    store.mark_canceled("job-0001")
    store.record_stopped_shard("job-0001", 0, _outputs(range(0, 2)))  # stopped after its current chunk
    view = store.get("job-0001")
    assert [o.index for o in view.outputs] == [0, 1, 4, 5, 6, 7]
    assert view.progress.done == len(view.outputs) == 6 and not view.outputs_truncated


@pytest.fixture
def client(redis_client: redis.Redis, redis_url: str) -> Client:
    publish_catalog(redis_client)
    return Client(ClientSettings(redis=RedisSettings(url=redis_url)))


def _queued_events(db: redis.Redis) -> list[WebhookEvent]:
    """The callback events waiting on the callbacks queue (Celery messages: base64 JSON [args, kwargs, embed])."""
    events = []
    for raw in db.lrange(constants.CALLBACK_QUEUE, 0, -1):
        args = json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
        events.append(WebhookEvent.model_validate(args[0]["event"]))
    return events


def test_client_cancel_answers_the_canceled_view_and_queues_a_canceled_event(
    client: Client, redis_client: redis.Redis
) -> None:
    # A public address literal: the SSRF guard needs no DNS for it, and nothing is delivered here (no worker).
    callback = Callback(url="https://1.1.1.1/hooks", events={EventType.CANCELED})  # type: ignore[arg-type]
    job = client.submit(GenerateRequest(model="fmnist-cgan", label="bag", count=2, callback=callback))
    view = client.cancel(job.id)
    assert view.status is JobStatus.CANCELED and view.finished_at is not None
    (event,) = _queued_events(redis_client)
    assert event.type is EventType.CANCELED and event.data.id == job.id and event.data.status is JobStatus.CANCELED

    with pytest.raises(JobEnded) as ended:
        client.cancel(job.id)
    assert ended.value.status == "canceled" and "already canceled" in str(ended.value)
    assert len(_queued_events(redis_client)) == 1


def test_client_cancel_of_another_tenants_job_is_not_found_and_changes_nothing(client: Client) -> None:
    job = client.submit(GenerateRequest(model="fmnist-cgan", label="bag"), tenant="acme")
    with pytest.raises(JobNotFound):
        client.cancel(job.id, tenant="globex")
    with pytest.raises(JobNotFound):
        client.cancel("no-such-job-1234")
    assert client.status(job.id).status is JobStatus.QUEUED
    assert client.cancel(job.id, tenant="acme").status is JobStatus.CANCELED


@pytest.mark.parametrize(
    ("priority", "queue"),
    [("high", "generate.high"), ("normal", "generate"), ("low", "generate.low"), (None, "generate")],
)
def test_each_shard_of_a_job_goes_to_the_queue_of_its_priority(
    redis_client: redis.Redis, redis_url: str, priority: str | None, queue: str
) -> None:
    publish_catalog(redis_client)
    client = Client(ClientSettings(redis=RedisSettings(url=redis_url), shard_size=2))
    fields = {"model": "fmnist-cgan", "label": "bag", "count": 5} | ({"priority": priority} if priority else {})
    view = client.submit(GenerateRequest.model_validate(fields))
    assert view.priority == (priority or "normal") and view.shards == 3
    assert {q: redis_client.llen(q) for q in constants.GENERATE_QUEUES.values()} == {
        q: 3 if q == queue else 0 for q in constants.GENERATE_QUEUES.values()
    }


def test_cli_cancel_prints_the_canceled_view_and_exits_1_for_an_ended_job(
    client: Client, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from producer.cli import app

    job = client.submit(GenerateRequest(model="fmnist-cgan", label="bag"))
    monkeypatch.setenv("GENQ_REDIS__URL", redis_url)
    first = CliRunner().invoke(app, ["cancel", job.id])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["status"] == "canceled"
    again = CliRunner().invoke(app, ["cancel", job.id])
    assert again.exit_code == 1 and "already canceled" in again.output
