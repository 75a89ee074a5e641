"""The per-tenant job index in Redis: newest first, every job exactly once across pages, ties on time included."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import redis

from producer.contract import GenerateJob, JobError, JobStatus, LabelCount
from producer.core import constants
from producer.core.store import JobStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _job(job_id: str, created_at: datetime, tenant: str | None = "acme") -> GenerateJob:
    return GenerateJob(
        job_id=job_id,
        model="fmnist-cgan",
        model_name="fmnist-cgan",
        model_version="1",
        items=[LabelCount(index=7, name="sneaker", count=1)],
        seed=1,
        created_at=created_at,
        tenant=tenant,
    )


def _all_pages(store: JobStore, limit: int, **filters: object) -> list[list[str]]:
    pages, after = [], None
    while True:
        views, after = store.page("acme", limit, after=after, **filters)  # type: ignore[arg-type]
        pages.append([v.id for v in views])
        if after is None:
            return pages


@pytest.mark.parametrize("limit", [1, 2, 3, 10])
def test_pages_return_every_job_once_newest_first_even_with_equal_timestamps(
    redis_client: redis.Redis, limit: int
) -> None:
    store = JobStore(redis_client, ttl_s=3600)
    now = datetime.now(UTC)
    times = [now, now, now + timedelta(seconds=1), now + timedelta(seconds=1), now + timedelta(seconds=2)]
    for i, created in enumerate(times):
        store.create(_job(f"job-{i:010d}", created))
    expected = ["job-0000000004", "job-0000000003", "job-0000000002", "job-0000000001", "job-0000000000"]
    pages = _all_pages(store, limit)
    assert [job for page in pages for job in page] == expected
    assert all(len(page) == limit for page in pages[:-1])


def test_filters_and_scan_budget_still_reach_every_match(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, ttl_s=3600)
    now = datetime.now(UTC)
    for i in range(12):
        store.create(_job(f"job-{i:010d}", now + timedelta(seconds=i)))
    store.mark_failed("job-0000000002", JobError(type="Test", message="x"))
    store.mark_failed("job-0000000009", JobError(type="Test", message="x"))
    views, after = store.page("acme", 5, status=JobStatus.FAILED, scan_budget=4)  # reads jobs 11..8 only
    assert [v.id for v in views] == ["job-0000000009"] and after is not None  # short page, with a cursor
    views, after = store.page("acme", 5, after=after, status=JobStatus.FAILED, scan_budget=4)  # reads 7..4
    assert views == [] and after is not None
    found = [job for page in _all_pages(store, 5, status=JobStatus.FAILED) for job in page]
    assert found == ["job-0000000009", "job-0000000002"]


def test_jobs_without_a_tenant_or_with_expired_records_are_not_listed(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, ttl_s=3600)
    now = datetime.now(UTC)
    store.create(_job("job-0000000001", now, tenant=None))
    store.create(_job("job-0000000002", now))
    store.create(_job("job-0000000003", now + timedelta(seconds=1)))
    redis_client.delete(constants.JOB_KEY.format(job_id="job-0000000003"))
    assert _all_pages(store, 10) == [["job-0000000002"]]


def test_index_entries_older_than_the_ttl_are_pruned_on_create(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, ttl_s=3600)
    store.create(_job("job-0000000001", T0))
    store.create(_job("job-0000000002", datetime.now(UTC)))
    index = constants.TENANT_JOBS_KEY.format(tenant="acme")
    assert [m.decode() for m in redis_client.zrange(index, 0, -1)] == ["job-0000000002"]
