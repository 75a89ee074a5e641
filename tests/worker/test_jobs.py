"""Running delivered jobs in a worker process: bulk shards take turns, small jobs never wait behind them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY
from tiny_runtime import tiny_job as _job
from tiny_runtime import tiny_runtime

from producer.contract import GenerateJob, JobStatus, Manifest, OutputRef, Shard, plan_shards
from producer.core import constants
from producer.core.store import JobStore
from worker.errors import StorageError, StorageUnavailable
from worker.jobs import execute_generate
from worker.reporting import RedisReporter
from worker.retries import RetryLater
from worker.runtime import Runtime
from worker.settings import BatchingSettings, CelerySettings
from worker.storage.local import LocalStorage


class CompanyReporter(RedisReporter):
    """Counts shards running at once. Each started shard waits a moment for ``company`` others to start too, so
    shards that are allowed to overlap do overlap, and a gate that lets them through is seen."""

    def __init__(self, runtime: Runtime, company: int) -> None:
        super().__init__(runtime.store, lambda message: None)
        self.company = company
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def started(self, job: GenerateJob, shard: Shard) -> bool:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        deadline = time.monotonic() + 1.0
        while self.running < self.company and time.monotonic() < deadline:
            time.sleep(0.01)
        return super().started(job, shard)

    def shard_stored(self, job: GenerateJob, shard: Shard, outputs: list[OutputRef]) -> bool:
        with self.lock:
            self.running -= 1
        return super().shard_stored(job, shard, outputs)


@pytest.fixture
def runtime(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[Runtime]:
    with tiny_runtime(
        redis_url,
        tmp_path,
        batching=BatchingSettings(max_batch=4, max_wait_ms=1, max_bulk_shards=1),
    ) as runtime:
        yield runtime


def _run_at_once(runtime: Runtime, reporter: RedisReporter, work: list[tuple[GenerateJob, Shard | None]]) -> None:
    threads = [threading.Thread(target=execute_generate, args=(job, runtime, reporter, part)) for job, part in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


def test_bulk_shards_take_turns_up_to_max_bulk_shards(runtime: Runtime) -> None:
    job, shards = _job("job-bulk", 24), plan_shards(24, 8)  # 3 shards of 8 images, max_batch 4: bulk
    runtime.store.create(job, shards=len(shards))
    reporter = CompanyReporter(runtime, company=2)

    _run_at_once(runtime, reporter, [(job, shard) for shard in shards])

    view = runtime.store.get(job.job_id)
    assert view.status is JobStatus.SUCCEEDED and view.progress.done == 24
    assert reporter.peak == 1  # max_bulk_shards=1: one at a time, though three threads had one each


def test_small_jobs_never_wait_for_a_bulk_slot(runtime: Runtime) -> None:
    jobs = [_job(f"job-small-{n}", 4) for n in range(3)]  # 4 images = one forward pass each: not bulk
    for job in jobs:
        runtime.store.create(job)
    reporter = CompanyReporter(runtime, company=3)

    with runtime.bulk_slots:  # every bulk slot is taken
        _run_at_once(runtime, reporter, [(job, None) for job in jobs])

    assert all(runtime.store.get(job.job_id).status is JobStatus.SUCCEEDED for job in jobs)
    assert reporter.peak == 3


class CommandLog(redis.Redis):
    """A Redis client that notes the name of every command it sends (each one is a round trip)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: list[str] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(str(args[0]))
        return super().execute_command(*args, **options)


@pytest.mark.parametrize("callback", [None, {"url": "https://hooks.example/genq"}], ids=["no-callback", "callback"])
def test_a_one_image_job_costs_three_redis_round_trips_with_or_without_callbacks(
    runtime: Runtime, redis_url: str, callback: dict[str, str] | None
) -> None:
    # Every round trip is latency against a remote Redis and CPU in the worker: count the delivery (refused when
    # the job has no record), start the shard (refused if stored or ended, and whether to announce it), success
    # (with its one output: no progress write or shard record in between). Callback events add none: each is
    # written in its transition's step.
    client = CommandLog.from_url(redis_url)
    runtime.store = JobStore(client, runtime.settings.job_ttl_s)
    reporter = RedisReporter(runtime.store)
    for job_id in ("job-warm", "job-counted"):  # the first run loads the Lua scripts into Redis
        runtime.store.create(_job(job_id, 1, callback=callback))
        client.commands.clear()
        execute_generate(_job(job_id, 1, callback=callback), runtime, reporter)

    sent = list(client.commands)
    assert runtime.store.get("job-counted").status is JobStatus.SUCCEEDED
    assert sent == ["EVALSHA"] * 3, sent
    assert runtime.store.get("job-counted").progress.done == 1
    announced = client.xrange(constants.CALLBACK_OUTBOX_KEY)
    assert [f[b"event"] for _id, f in announced] == ([b"running", b"succeeded"] * 2 if callback else [])


def test_a_job_without_a_record_is_not_run_and_gets_none(runtime: Runtime, redis_client: redis.Redis) -> None:
    reporter = RedisReporter(runtime.store)

    assert not execute_generate(_job("job-expired", 1), runtime, reporter)

    assert not redis_client.exists(runtime.store.key("job-expired")), "counting its delivery must not create one"
    assert not list((runtime.settings.local_dir).rglob("*.png"))


class ProcessDies(BaseException):
    """The worker process dying (SIGKILL, in production): nothing in a task catches it."""


class DiesAtTheManifest(LocalStorage):
    """Stores every image, then the process dies as it stores the manifest: after the last shard was recorded."""

    def put_file(self, key: str, source: Any, content_type: str) -> None:
        raise ProcessDies(key)


@pytest.mark.parametrize("shards", [1, 3])
def test_a_redelivery_writes_the_manifest_a_dead_run_left_unwritten(
    runtime: Runtime, shards: int, caplog: pytest.LogCaptureFixture
) -> None:
    job, parts = _job(f"job-died-{shards}", 12), plan_shards(12, 12 // shards)
    runtime.store.create(job, shards=len(parts))
    reporter = RedisReporter(runtime.store)
    healthy = runtime.storage
    for part in parts[:-1]:
        execute_generate(job, runtime, reporter, part)
    runtime.storage = DiesAtTheManifest(runtime.settings.local_dir)
    with pytest.raises(ProcessDies):
        execute_generate(job, runtime, reporter, parts[-1])  # records the job's last shard, then dies
    assert runtime.store.get(job.job_id).status is JobStatus.RUNNING
    assert runtime.store.awaiting_manifest(job.job_id)

    runtime.storage = healthy
    passes = sum(runtime.engine.batch_sizes.values())
    recovered = REGISTRY.get_sample_value("genq_worker_shards_total", {"outcome": "recovered"}) or 0.0
    execute_generate(job, runtime, reporter, parts[-1])  # the broker redelivers the dead run's message

    view = runtime.store.get(job.job_id)
    assert view.status is JobStatus.SUCCEEDED and view.manifest_key is not None
    assert [o.index for o in view.outputs] == list(range(12))
    manifest = Manifest.model_validate_json(healthy.get(view.manifest_key))
    assert [o.index for o in manifest.outputs] == list(range(12))
    # Nothing sampled again but the contact sheet's samples, which the run writing the manifest draws afresh.
    sheet_passes = -(-min(runtime.settings.sheet_images, 12) // runtime.settings.batching.max_batch)
    assert sum(runtime.engine.batch_sizes.values()) == passes + sheet_passes
    assert "a run died before the manifest; wrote it" in caplog.text
    assert REGISTRY.get_sample_value("genq_worker_shards_total", {"outcome": "recovered"}) == recovered + 1
    assert not runtime.store.awaiting_manifest(job.job_id)


def test_a_redelivered_stored_shard_leaves_the_manifest_to_the_shards_still_running(runtime: Runtime) -> None:
    job, parts = _job("job-partial", 12), plan_shards(12, 4)
    runtime.store.create(job, shards=len(parts))
    reporter = RedisReporter(runtime.store)
    execute_generate(job, runtime, reporter, parts[0])
    execute_generate(job, runtime, reporter, parts[0])  # a redelivery of a stored shard; two others still run

    view = runtime.store.get(job.job_id)
    assert view.status is JobStatus.RUNNING and view.manifest_key is None
    assert not runtime.store.awaiting_manifest(job.job_id)


class StoreDown(LocalStorage):
    """An object store that does not answer, as S3Storage reports it once its retry window is used up."""

    def put(self, key: str, data: bytes, content_type: str) -> None:
        raise StorageUnavailable(f"S3 put of {key!r} still failing after the retry window")


def test_a_storage_outage_retries_the_job_later_then_fails_it_with_the_reason(runtime: Runtime) -> None:
    runtime.settings = runtime.settings.model_copy(
        update={"celery": CelerySettings(retries=2, retry_backoff_s=10.0, retry_backoff_max_s=15.0)}
    )
    runtime.storage = StoreDown(runtime.settings.local_dir)
    job = _job("job-outage", 3)
    runtime.store.create(job)
    reporter = RedisReporter(runtime.store)

    delays = []
    for retries in range(2):
        with pytest.raises(RetryLater) as later:
            execute_generate(job, runtime, reporter, retries=retries)
        assert isinstance(later.value.cause, StorageUnavailable)
        delays.append(later.value.delay_s)
        assert runtime.store.get(job.job_id).status is JobStatus.RUNNING  # waiting for its retry, not failed
    assert execute_generate(job, runtime, reporter, retries=2)  # the retries are used up: the job fails

    view = runtime.store.get(job.job_id)
    assert view.status is JobStatus.FAILED
    assert view.error is not None and view.error.type == "StorageUnavailable"
    assert "still failing after the retry window" in view.error.message
    assert 9.0 <= delays[0] <= 11.0 and 13.5 <= delays[1] <= 16.5  # 10 s, then doubled and capped at 15 s


def test_a_retried_run_stores_the_job_once_the_store_is_back(runtime: Runtime) -> None:
    healthy = runtime.storage
    runtime.storage = StoreDown(runtime.settings.local_dir)
    job = _job("job-comeback", 3)
    runtime.store.create(job)
    reporter = RedisReporter(runtime.store)
    with pytest.raises(RetryLater):
        execute_generate(job, runtime, reporter)

    runtime.storage = healthy  # the retry arrives after the outage
    assert execute_generate(job, runtime, reporter, retries=1)

    view = runtime.store.get(job.job_id)
    assert view.status is JobStatus.SUCCEEDED and [o.index for o in view.outputs] == [0, 1, 2]


def test_a_permanent_failure_fails_the_job_without_a_retry(runtime: Runtime) -> None:
    class Refused(LocalStorage):
        def put(self, key: str, data: bytes, content_type: str) -> None:
            raise StorageError(f"access denied to S3 put of {key!r}")

    runtime.storage = Refused(runtime.settings.local_dir)
    job = _job("job-refused", 2)
    runtime.store.create(job)

    assert execute_generate(job, runtime, RedisReporter(runtime.store))

    view = runtime.store.get(job.job_id)
    assert view.status is JobStatus.FAILED and view.error is not None and view.error.type == "StorageError"


def test_retries_do_not_count_as_deaths_of_the_worker(runtime: Runtime) -> None:
    # Every retry is one more delivery of the message; only deliveries beyond the retries are the worker dying.
    limit = runtime.settings.celery.max_deliveries
    job = _job("job-many-retries", 1)
    runtime.store.create(job)
    for _ in range(limit):  # the worker "died" this many times, then the runner asked for 2 retries
        runtime.store.count_delivery(job.job_id, 0)
    runtime.store.count_delivery(job.job_id, 0)

    assert execute_generate(job, runtime, RedisReporter(runtime.store), retries=2)
    assert runtime.store.get(job.job_id).status is JobStatus.SUCCEEDED


def test_a_tenants_job_error_names_no_storage_endpoint_bucket_or_worker_folder(runtime: Runtime) -> None:
    class Refused(LocalStorage):
        endpoint = "http://minio.internal:9000"

        def put(self, key: str, data: bytes, content_type: str) -> None:
            raise StorageError(
                f"access denied (AccessDenied) to S3 put of {key!r} in bucket 'genq' at {self.endpoint}; cache "
                f"{runtime.settings.model_cache_dir}/x"
            )

    runtime.storage = Refused(runtime.settings.local_dir)
    job = _job("job-tenant-err", 1).model_copy(update={"tenant": "acme"})
    runtime.store.create(job)

    execute_generate(job, runtime, RedisReporter(runtime.store))

    error = runtime.store.get(job.job_id).error
    assert error is not None and error.type == "StorageError"
    assert "minio.internal" not in error.message and "'genq'" not in error.message
    assert str(runtime.settings.model_cache_dir) not in error.message
    assert "access denied (AccessDenied) to S3 put" in error.message and "<storage>" in error.message


class ShardStorage(LocalStorage):
    """Stores the images in ``good`` once ``release`` is set (their uploads wait in flight till then); every other
    upload fails as one of an S3 outage past the retry window does."""

    def __init__(self, root: Path, good: range) -> None:
        super().__init__(root)
        self.good = good
        self.release = threading.Event()
        self.keys: list[str] = []
        self.lock = threading.Lock()

    def put(self, key: str, data: bytes, content_type: str) -> None:
        with self.lock:
            self.keys.append(key)
        if int(key.rsplit("/", 1)[1][:5]) not in self.good:
            raise StorageUnavailable(f"S3 put of {key!r} still failing after the retry window")
        assert self.release.wait(10)
        super().put(key, data, content_type)


def test_a_failed_sharded_job_lists_every_stored_output_and_its_other_shards_stop(runtime: Runtime) -> None:
    runtime.settings = runtime.settings.model_copy(update={"celery": CelerySettings(retries=0)})
    job = _job("job-split-fail", 20)
    prefix = f"jobs/{job.job_id}/"
    first, second, last = plan_shards(20, 8)  # images 0-7, 8-15 (two chunks of 4), 16-19
    runtime.store.create(job, shards=3, shard_size=8)
    reporter = RedisReporter(runtime.store)
    assert execute_generate(job, runtime, reporter, first)  # stored and recorded before the outage

    storage = ShardStorage(runtime.settings.local_dir, good=range(8, 16))
    runtime.storage = storage
    running = threading.Thread(target=execute_generate, args=(job, runtime, reporter, second))
    running.start()  # its first chunk's uploads (8-11) wait in flight
    deadline = time.monotonic() + 10
    while len(storage.keys) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert execute_generate(job, runtime, reporter, last)  # its uploads fail, no retry is left: the job fails
    storage.release.set()
    running.join(30)

    view = runtime.store.get(job.job_id)
    assert view.status is JobStatus.FAILED and view.error is not None and view.error.type == "StorageUnavailable"
    # Every output stored is listed: the finished shard's and what the stopped shard had in flight, not only the
    # failing shard's (none); the stopped shard sent nothing of its second chunk.
    assert [o.index for o in view.outputs] == list(range(12))
    assert sorted(o.key for o in view.outputs) == runtime.storage.list(prefix)
    assert not [key for key in storage.keys if int(key.rsplit("/", 1)[1][:5]) in range(12, 16)]


@pytest.mark.parametrize(
    ("count", "shard_size", "expected"),
    [
        # 1 image: its only chunk completes the job; "succeeded" says as much a moment later
        (1, None, ["running", "succeeded"]),
        # 10 images in chunks of 4: progress for 4 and 8, not for the 10 that "succeeded" reports
        (10, None, ["running", "progress", "progress", "succeeded"]),
        # 2 shards of 4: each shard's progress counts, the job's end is the last shard's business
        (8, 4, ["running", "progress", "progress", "succeeded"]),
    ],
)
def test_events_sent_for_a_job_skip_the_progress_that_succeeded_follows_at_once(
    runtime: Runtime, count: int, shard_size: int | None, expected: list[str]
) -> None:
    job = _job(f"job-events-{count}", count, callback={"url": "http://receiver.example/hook"})
    shards = plan_shards(count, shard_size or count)
    runtime.store.create(job, shards=len(shards))
    reporter = RedisReporter(runtime.store, 0.0)

    for shard in shards:  # one after the other: the second shard's start is not the job's first
        execute_generate(job, runtime, reporter, shard if len(shards) > 1 else None)

    assert runtime.store.get(job.job_id).status is JobStatus.SUCCEEDED
    announced = runtime.store.redis.xrange(constants.CALLBACK_OUTBOX_KEY)
    assert [fields[b"event"].decode() for _id, fields in announced] == expected
    assert [int(fields[b"seq"]) for _id, fields in announced] == list(range(1, len(expected) + 1))
