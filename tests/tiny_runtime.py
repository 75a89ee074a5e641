"""A worker runtime in the test process over the tiny model, local storage and a real Redis, and jobs for it::

with tiny_runtime(redis_url, tmp_path, celery=CelerySettings(max_deliveries=2)) as runtime:
    execute_generate(tiny_job("job-1", 4), runtime, reporter)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tiny_model import TINY_NAME, make_tiny_model

from producer.contract import GenerateJob, LabelCount
from producer.core.settings import RedisSettings
from worker.runtime import Runtime, build_runtime
from worker.settings import BatchingSettings, WorkerSettings


@contextmanager
def tiny_runtime(redis_url: str, tmp_path: Path, **settings: Any) -> Iterator[Runtime]:
    """The runtime of a worker serving the tiny model (batches of 4, 1 ms wait unless ``batching`` says otherwise);
    ``settings`` override WorkerSettings fields. Its inference engine and upload pool are stopped on exit."""
    make_tiny_model(tmp_path / "zoo")
    fields: dict[str, Any] = {
        "redis": RedisSettings(url=redis_url),
        "storage": "local",
        "local_dir": tmp_path / "out",
        "model_dirs": [tmp_path / "zoo"],
        "model_cache_dir": tmp_path / "cache",
        "batching": BatchingSettings(max_batch=4, max_wait_ms=1),
        **settings,
    }
    runtime = build_runtime(WorkerSettings(**fields))
    try:
        yield runtime
    finally:
        runtime.engine.close()
        runtime.uploads.shutdown()


def tiny_job(job_id: str, count: int = 2, **fields: Any) -> GenerateJob:
    """A job of ``count`` bags from the tiny model, seed 7; ``fields`` override the job's."""
    return GenerateJob(
        job_id=job_id,
        model=TINY_NAME,
        model_name=TINY_NAME,
        model_version="1",
        items=[LabelCount(index=8, name="bag", count=count)],
        seed=7,
        created_at=datetime(2026, 11, 30, tzinfo=UTC),
        **fields,
    )
