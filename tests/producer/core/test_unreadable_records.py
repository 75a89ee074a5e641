"""A job record genq cannot read back never takes a reader down with it, on a real Redis.

The attack (hostile-tenant review, issue 16): metadata nested a few hundred deep passed validation, was stored, and
could then not be parsed (pydantic's JSON parser stops at 200 levels). Every reader raised on it for the record's
TTL: the tenant's list, the job's GET, the sweeper at every interval. These tests write such records straight into
Redis, as an older version or a bug would have, and read them with every reader of the store.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import redis
from pydantic import JsonValue

from producer.contract import GenerateJob, JobError, JobStatus, LabelCount
from producer.core import constants
from producer.core.records import UNREADABLE_FIELD
from producer.core.store import JobStore, Undelivered
from producer.errors import InvalidJob, JobNotFound, UnreadableRecord

T0 = datetime.now(UTC)


def _job(job_id: str, created_at: datetime, metadata: dict[str, JsonValue] | None = None) -> GenerateJob:
    return GenerateJob(
        job_id=job_id,
        model="fmnist-cgan",
        model_name="fmnist-cgan",
        model_version="1",
        items=[LabelCount(index=7, name="sneaker", count=1)],
        seed=1,
        created_at=created_at,
        tenant="acme",
        metadata=metadata or {},
    )


def _arrays(depth: int) -> dict[str, JsonValue]:
    """A JSON object nesting ``depth`` objects and arrays, itself the first: {"a": [[...]]}."""
    value: JsonValue = []
    for _ in range(depth - 2):
        value = [value]
    return {"a": value}


def _deep_metadata(db: redis.Redis, key: str) -> None:
    # What an older version stored for the review's request: the spec it wrote, with metadata 300 deep.
    spec = json.loads(db.hget(key, "spec") or b"")
    spec["metadata"] = _arrays(300)
    db.hset(key, "spec", json.dumps(spec))


def _set(field: str, value: bytes | str) -> Callable[[redis.Redis, str], None]:
    def corrupt(db: redis.Redis, key: str) -> None:
        db.hset(key, field, value)

    return corrupt


def _truncated_spec(db: redis.Redis, key: str) -> None:
    db.hset(key, "spec", (db.hget(key, "spec") or b"")[:40])


def _bad_outputs(db: redis.Redis, key: str) -> None:
    db.hset(key, mapping={"status": "succeeded", "outputs": '{"index": 1}'})


CORRUPTIONS = {
    "metadata-nested-300-deep": _deep_metadata,
    "spec-truncated": _truncated_spec,
    "spec-not-utf8": _set("spec", b"\xff\xfe{"),
    "status-unknown": _set("status", "paused"),
    "shards-not-a-number": _set("shards", "many"),  # the sweeper's Lua script fails on it too
    "created-at-garbage": _set("created_at", "yesterday"),
    "outputs-not-a-list": _bad_outputs,
}
SPEC_CORRUPTIONS = ("metadata-nested-300-deep", "spec-truncated", "spec-not-utf8")


def _dead_letters(db: redis.Redis) -> list[dict[str, object]]:
    return [json.loads(raw) for raw in db.lrange(constants.DEADLETTER_KEY, 0, -1)]


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client, ttl_s=3600)


def _three_jobs(store: JobStore, corrupt: Callable[[redis.Redis, str], None]) -> tuple[str, str, str]:
    """(older, poisoned, newer), all of tenant acme; the middle one's record corrupted."""
    ids = ("job-older-01", "job-poisoned", "job-newer-01")
    for i, job_id in enumerate(ids):
        store.create(_job(job_id, T0 + timedelta(seconds=i)))
    corrupt(store.redis, store.key(ids[1]))
    return ids


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_every_reader_survives_a_corrupt_record_and_it_is_dead_lettered_once(
    store: JobStore, redis_client: redis.Redis, corruption: str
) -> None:
    older, poisoned, newer = _three_jobs(store, CORRUPTIONS[corruption])

    for _ in range(3):  # every read, again and again: one dead letter
        views, after = store.page("acme", 10)
        assert [v.id for v in views] == [newer, older] and after is None

        pages, position = [], None
        while True:
            views, position = store.page("acme", 1, after=position)
            pages.append([v.id for v in views])
            if position is None:
                break
        assert [job for page in pages for job in page] == [newer, older]

        with pytest.raises(UnreadableRecord) as raised:
            store.get(poisoned)
        assert isinstance(raised.value, JobNotFound)  # whoever handles a missing job handles this one
        assert f"job {poisoned!r} has a record genq cannot read" in str(raised.value)
        assert constants.DEADLETTER_KEY in str(raised.value)

        found = store.undelivered([older, poisoned, newer])
        assert found[older] == found[newer] == Undelivered(JobStatus.QUEUED, 1, None, (0,))
        assert store.get(older).id == older and store.get(newer).id == newer
        assert store.counts_by_status()[JobStatus.QUEUED] == 3

    (letter,) = _dead_letters(redis_client)
    assert letter["stage"] == "record" and letter["job_id"] == poisoned
    assert str(letter["reason"]).startswith("job record cannot be read: ")
    assert isinstance(letter["body"], str) and len(letter["body"]) <= 4096
    assert redis_client.hexists(store.key(poisoned), UNREADABLE_FIELD)
    assert redis_client.ttl(store.key(poisoned)) > 0  # the mark expires with the record


@pytest.mark.parametrize("corruption", SPEC_CORRUPTIONS)
def test_a_spec_that_cannot_be_read_raises_unreadable_record(store: JobStore, corruption: str) -> None:
    _, poisoned, newer = _three_jobs(store, CORRUPTIONS[corruption])
    with pytest.raises(UnreadableRecord, match="cannot read"):
        store.spec(poisoned)
    assert store.spec(newer).job_id == newer


def test_a_record_the_undelivered_script_fails_on_is_no_record_to_the_sweeper(
    store: JobStore, redis_client: redis.Redis
) -> None:
    older, poisoned, newer = _three_jobs(store, _set("shards", "many"))
    found = store.undelivered([older, poisoned, newer])
    assert found[poisoned] is None and found[older] is not None and found[newer] is not None
    assert [letter["job_id"] for letter in _dead_letters(redis_client)] == [poisoned]


def test_concurrent_readers_dead_letter_a_corrupt_record_once(store: JobStore, redis_client: redis.Redis) -> None:
    _, poisoned, _ = _three_jobs(store, _deep_metadata)

    def read(_: int) -> None:
        store.page("acme", 10)
        with pytest.raises(UnreadableRecord):
            store.get(poisoned)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(read, range(64)))
    assert len(_dead_letters(redis_client)) == 1


def test_a_key_that_is_not_a_hash_is_left_out_of_the_list(store: JobStore, redis_client: redis.Redis) -> None:
    store.create(_job("job-older-01", T0))
    redis_client.set(store.key("job-a-string"), "not a hash")
    redis_client.zadd(constants.TENANT_JOBS_KEY.format(tenant="acme"), {"job-a-string": T0.timestamp() + 1})
    views, _ = store.page("acme", 10)
    assert [v.id for v in views] == ["job-older-01"]


def test_a_job_counter_that_is_not_a_number_is_left_out_of_the_counts(
    store: JobStore, redis_client: redis.Redis
) -> None:
    store.create(_job("job-older-01", T0))
    store.mark_failed("job-older-01", JobError(type="Test", message="x"))
    redis_client.hset(constants.JOBS_BY_STATUS_KEY, "queued", "lots")
    counts = store.counts_by_status()
    assert counts[JobStatus.QUEUED] == 0 and counts[JobStatus.FAILED] == 1


# 32: the most a request may nest now; 150: what an older version accepted and its records still hold (readable).
@pytest.mark.parametrize("depth", [32, 150])
def test_metadata_below_the_parsers_limit_is_stored_and_read_back_by_every_reader(store: JobStore, depth: int) -> None:
    metadata = _arrays(depth)
    store.create(_job("job-deep-032", T0, metadata))
    assert store.get("job-deep-032").metadata == metadata
    assert store.spec("job-deep-032").metadata == metadata
    assert store.page("acme", 10)[0][0].metadata == metadata


def test_a_job_whose_record_would_not_read_back_is_never_written(store: JobStore, redis_client: redis.Redis) -> None:
    # GenerateJob, unlike the requests, bounds nothing (records of older versions must still read): the store refuses.
    job = _job("job-deep-250", T0, _arrays(250))
    with pytest.raises(InvalidJob, match="would be stored as a record genq cannot read back"):
        store.create(job)
    assert redis_client.keys("genq:*") == []
