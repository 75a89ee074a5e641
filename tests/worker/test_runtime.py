"""The worker's S3 client against a real S3 server (moto over HTTP): its connection pool holds every thread that
may call it at once, so none of their connections is thrown away under load."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from producer.core.settings import S3Settings
from worker.runtime import make_registry, s3_pool_size
from worker.settings import BatchingSettings, WorkerSettings
from worker.storage.s3 import S3Storage

POOL_FULL = "Connection pool is full"


def _settings(bucket: str, tmp_path: Path, upload_workers: int) -> WorkerSettings:
    return WorkerSettings(
        storage="s3",
        s3=S3Settings(bucket=bucket),
        model_cache_dir=tmp_path / "cache",
        batching=BatchingSettings(upload_workers=upload_workers),
    )


def _put_all_at_once(storage: S3Storage, threads: int, rounds: int) -> None:
    """``threads`` threads each PUT ``rounds`` objects, every round started together (a barrier)."""
    barrier = threading.Barrier(threads)

    def put(thread: int) -> None:
        for r in range(rounds):
            barrier.wait(timeout=30)
            storage.put(f"t{thread}/{r}.png", b"x" * 2048, "image/png")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, range(threads)))


def _pool_full_warnings(caplog: pytest.LogCaptureFixture) -> int:
    return sum(POOL_FULL in record.getMessage() for record in caplog.records)


def test_a_threads_worker_keeps_a_connection_for_every_upload_and_task_thread(
    s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(s3_bucket, tmp_path, upload_workers=4)
    storage, _store, _registry = make_registry(settings, task_threads=12)
    assert isinstance(storage, S3Storage)
    assert s3_pool_size(settings, 12) == 4 + 12 + 4

    caplog.set_level(logging.WARNING, logger="urllib3")
    _put_all_at_once(storage, threads=4 + 12, rounds=6)  # every upload thread and every task thread at once
    assert _pool_full_warnings(caplog) == 0


def test_a_pool_sized_for_the_upload_threads_alone_throws_connections_away(
    s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # What the test above guards against: the pool a prefork child (one task thread) sizes, under a threads
    # worker's load, discards connections, and urllib3 says so.
    storage, _store, _registry = make_registry(_settings(s3_bucket, tmp_path, upload_workers=4), task_threads=1)
    assert isinstance(storage, S3Storage)

    caplog.set_level(logging.WARNING, logger="urllib3")
    _put_all_at_once(storage, threads=4 + 12, rounds=6)
    assert _pool_full_warnings(caplog) > 0
