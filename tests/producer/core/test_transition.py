"""The job store's status transition (``transition.lua``): the fields it sets, sets only when absent and drops, all
in the one step that checks the current status."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import redis

from producer.contract import GenerateJob, JobStatus, LabelCount
from producer.core import constants
from producer.core.store import JobStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


def _job(job_id: str = "job-0001") -> GenerateJob:
    return GenerateJob(
        job_id=job_id,
        model="fmnist-cgan",
        model_name="fmnist-cgan",
        model_version="1",
        items=[LabelCount(index=8, name="bag", count=2)],
        seed=1,
        created_at=T0,
    )


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client, ttl_s=3600)


def _fields(redis_client: redis.Redis, store: JobStore, job_id: str = "job-0001") -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in redis_client.hgetall(store.key(job_id)).items()}


def test_set_if_absent_sets_a_missing_field_once_while_plain_fields_are_overwritten(
    store: JobStore, redis_client: redis.Redis
) -> None:
    store.create(_job())

    assert store.transition("job-0001", JobStatus.RUNNING, ACTIVE, set_if_absent={"started_at": "first"}, note="a")
    assert store.transition("job-0001", JobStatus.RUNNING, ACTIVE, set_if_absent={"started_at": "second"}, note="b")

    fields = _fields(redis_client, store)
    assert fields["started_at"] == "first"
    assert fields["note"] == "b"
    assert "?started_at" not in fields and "set_if_absent" not in fields


def test_drop_prefixes_deletes_every_field_with_one_of_the_prefixes_and_nothing_else(
    store: JobStore, redis_client: redis.Redis
) -> None:
    store.create(_job(), shards=2)
    redis_client.hset(
        store.key("job-0001"),
        mapping={"shard:0": "[]", "shard:1": "[]", "shards_done": 2, "partial:0": "[]", "progress:0": 1},
    )

    assert store.transition(
        "job-0001", JobStatus.SUCCEEDED, ACTIVE, drop_prefixes=("shard:", "progress:"), finished_at="then"
    )

    fields = _fields(redis_client, store)
    assert not [f for f in fields if f.startswith(("shard:", "progress:"))], fields
    assert {"shards": "2", "shards_done": "2", "partial:0": "[]", "finished_at": "then"}.items() <= fields.items()
    assert fields["status"] == "succeeded"
    assert "-shard:" not in fields and "drop_prefixes" not in fields


def test_a_refused_transition_writes_nothing_and_moves_no_count(store: JobStore, redis_client: redis.Redis) -> None:
    store.create(_job())
    redis_client.hset(store.key("job-0001"), "shard:0", "[]")
    assert store.mark_canceled("job-0001")
    before = _fields(redis_client, store)
    counts = store.counts_by_status()

    applied = store.transition(
        "job-0001",
        JobStatus.RUNNING,
        ACTIVE,
        set_if_absent={"started_at": "now"},
        drop_prefixes=("shard:",),
        note="x",
    )

    assert not applied
    assert _fields(redis_client, store) == before
    assert store.counts_by_status() == counts


def test_values_other_than_str_and_int_are_stored_as_json(store: JobStore, redis_client: redis.Redis) -> None:
    store.create(_job())
    assert store.transition("job-0001", JobStatus.RUNNING, ACTIVE, set_if_absent={"meta": {"a": [1]}}, count=3)
    fields = _fields(redis_client, store)
    assert fields["meta"] == '{"a": [1]}'
    assert fields["count"] == "3"


def test_a_bare_string_of_prefixes_is_refused_before_anything_is_written(
    store: JobStore, redis_client: redis.Redis
) -> None:
    store.create(_job())
    before = _fields(redis_client, store)
    with pytest.raises(TypeError, match="tuple of prefixes"):
        store.transition("job-0001", JobStatus.RUNNING, ACTIVE, drop_prefixes="shard:")  # type: ignore[arg-type]
    assert _fields(redis_client, store) == before


@pytest.mark.parametrize(
    "args",
    [
        # status, ttl, guard; 2 allowed statuses; 1 field to set; nothing set if absent; nothing dropped; one too many
        ["running", 3600, "", 2, "queued", "running", 1, "note", "x", 0, 0, "extra"],
        # the same with the field's value missing: the counts run past the end
        ["running", 3600, "", 2, "queued", "running", 1, "note", 0, 0],
    ],
    ids=["extra-argument", "missing-value"],
)
def test_the_script_refuses_arguments_that_do_not_match_their_counts_before_writing(
    store: JobStore, redis_client: redis.Redis, args: list[str | int]
) -> None:
    store.create(_job())
    before = _fields(redis_client, store)
    with pytest.raises(redis.ResponseError):
        store._transition(keys=[store.key("job-0001"), constants.JOBS_BY_STATUS_KEY], args=args)
    assert _fields(redis_client, store) == before
    assert store.counts_by_status()[JobStatus.QUEUED] == 1
