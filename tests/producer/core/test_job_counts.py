"""Jobs per status in Redis (what ``genq_jobs{status}`` reports): counted on create and in the transition script,
exactly when a status changes, never for a refused transition."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import redis

from producer.contract import GenerateJob, JobError, JobStatus, LabelCount, OutputRef
from producer.core import constants
from producer.core.store import JobStore
from producer.errors import JobNotFound

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NONE = {status: 0 for status in JobStatus}


def _job(job_id: str) -> GenerateJob:
    return GenerateJob(
        job_id=job_id,
        model="fmnist-cgan",
        model_name="fmnist-cgan",
        model_version="1",
        items=[LabelCount(index=8, name="bag", count=1)],
        seed=1,
        created_at=T0,
    )


_OUTPUT = OutputRef(
    index=0, label="bag", label_index=8, seed=1, key="jobs/j/00000.png", sha256="0" * 64, content_type="image/png"
)


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client, ttl_s=3600)


def test_counts_start_at_zero_for_every_status(store: JobStore) -> None:
    assert store.counts_by_status() == NONE


def test_each_job_is_counted_once_in_its_current_status_and_ended_jobs_stay_counted(store: JobStore) -> None:
    for n in range(5):
        store.create(_job(f"job-{n:04d}"))
    assert store.counts_by_status() == {**NONE, JobStatus.QUEUED: 5}

    store.start("job-0000")
    store.start("job-0000")  # a redelivered shard re-enters running: still one running job
    store.start("job-0001")
    assert store.counts_by_status() == {**NONE, JobStatus.QUEUED: 3, JobStatus.RUNNING: 2}

    store.mark_succeeded("job-0000", [_OUTPUT], "jobs/job-0000/manifest.json")
    store.mark_failed("job-0001", JobError(type="Boom", message="boom"))
    store.mark_canceled("job-0002")
    assert store.counts_by_status() == {
        JobStatus.QUEUED: 2,
        JobStatus.RUNNING: 0,
        JobStatus.SUCCEEDED: 1,
        JobStatus.FAILED: 1,
        JobStatus.CANCELED: 1,
    }

    store.redis.delete(store.key("job-0000"))  # a record that expired: its job still counts as succeeded
    assert store.counts_by_status()[JobStatus.SUCCEEDED] == 1


def test_a_refused_transition_moves_no_count(store: JobStore) -> None:
    store.create(_job("job-0001"))
    assert store.mark_canceled("job-0001")
    before = store.counts_by_status()
    assert not store.mark_canceled("job-0001")
    assert store.start("job-0001") is None
    assert not store.mark_succeeded("job-0001", [_OUTPUT], "jobs/job-0001/manifest.json")
    assert not store.mark_failed("job-0001", JobError(type="Late", message="late"))
    assert store.counts_by_status() == before == {**NONE, JobStatus.CANCELED: 1}


def test_a_duplicate_create_is_refused_and_not_counted(store: JobStore) -> None:
    store.create(_job("job-0001"))
    with pytest.raises(ValueError, match="already exists"):
        store.create(_job("job-0001"))
    assert store.counts_by_status() == {**NONE, JobStatus.QUEUED: 1}


def test_the_counters_live_in_one_hash_that_never_expires(store: JobStore) -> None:
    store.create(_job("job-0001"))
    store.mark_canceled("job-0001")
    assert store.redis.hgetall(constants.JOBS_BY_STATUS_KEY) == {b"queued": b"0", b"canceled": b"1"}
    assert store.redis.ttl(constants.JOBS_BY_STATUS_KEY) == -1


def test_started_at_is_when_the_first_shard_started(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.create(_job("job-0001"), shards=3)
    clock = iter([datetime(2026, 1, 1, 0, 0, s, tzinfo=UTC) for s in (1, 2, 3)])
    monkeypatch.setattr("producer.core.store.utcnow", lambda: next(clock))
    for _ in range(3):  # three shards start, one after another (or one is redelivered)
        assert store.start("job-0001") is not None
    assert store.get("job-0001").started_at == datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)


def test_start_tells_the_first_start_and_refuses_a_stored_shard_or_an_ended_job(store: JobStore) -> None:
    store.create(_job("job-0001"), shards=2)

    assert store.start("job-0001", 0) is JobStatus.QUEUED  # the job's first start: the worker announces it
    assert store.start("job-0001", 1) is JobStatus.RUNNING
    assert not store.complete_shard("job-0001", 0, 2, [_OUTPUT])
    assert store.start("job-0001", 0) is None, "shard 0 is stored: a redelivery must not run it again"
    assert store.counts_by_status() == NONE | {JobStatus.RUNNING: 1}

    assert store.mark_canceled("job-0001")
    assert store.start("job-0001", 1) is None, "a canceled job must never start"
    with pytest.raises(JobNotFound):
        store.start("job-9999", 0)


def test_success_drops_the_per_shard_output_lists(store: JobStore, redis_client: redis.Redis) -> None:
    store.create(_job("job-0001"), shards=2)
    store.start("job-0001", 0)
    store.complete_shard("job-0001", 0, 2, [_OUTPUT])
    store.complete_shard("job-0001", 1, 2, [_OUTPUT.model_copy(update={"index": 1})])

    assert store.mark_succeeded("job-0001", [_OUTPUT], "jobs/j/manifest.json", total=2)

    fields = {f.decode() for f in redis_client.hkeys(store.key("job-0001"))}
    assert not {f for f in fields if f.startswith("shard:")}, fields
    assert {"shards", "shards_done", "outputs", "manifest_key"} <= fields  # only the shard:<k> lists go
    assert store.get("job-0001").status is JobStatus.SUCCEEDED
