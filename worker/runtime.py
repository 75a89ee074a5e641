"""Per-process dependencies of a worker (storage, model registry, job store), built once and shared by tasks."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import redis

from models.generator import Acceleration
from producer.core.store import JobStore
from producer.errors import ConfigurationError
from worker.catalog.registry import ZOO_DIR, ModelRegistry
from worker.catalog.store import ModelStore
from worker.generate.credentials import NOT_CONFIGURED, Signer, load_signer
from worker.generate.inference import InferenceEngine
from worker.memory import PageReleaser
from worker.settings import WorkerSettings
from worker.storage.base import Storage
from worker.storage.s3 import S3Storage, make_storage

log = logging.getLogger("genq.runtime")


@dataclass
class Runtime:
    """What tasks need, built from one :class:`WorkerSettings`."""

    settings: WorkerSettings
    redis: redis.Redis
    store: JobStore
    storage: Storage
    model_store: ModelStore
    registry: ModelRegistry
    engine: InferenceEngine
    uploads: ThreadPoolExecutor
    # Bulk shards running at once in this process (each holds its chunks, encoded images and tar in memory).
    bulk_slots: threading.BoundedSemaphore
    # When the heap's free pages go back to the OS (worker.memory).
    pages: PageReleaser
    # Signs the outputs of c2pa jobs; built once per process (a forked child builds its own runtime, and signer).
    signer: Signer = field(default=NOT_CONFIGURED)


def build_runtime(settings: WorkerSettings, task_threads: int = 1) -> Runtime:
    """Everything a worker process's tasks share; ``task_threads`` is how many tasks it runs at once (a threads
    pool's concurrency; 1 in a prefork child or the solo pool)."""
    if settings.redis.url is None:
        raise ConfigurationError("a worker needs Redis: set GENQ_REDIS__URL (e.g. redis://127.0.0.1:6379/0)")
    client = redis.Redis.from_url(settings.redis.url)
    storage, model_store, registry = make_registry(settings, task_threads)
    return Runtime(
        settings=settings,
        redis=client,
        store=JobStore(client, settings.job_ttl_s),
        storage=storage,
        model_store=model_store,
        registry=registry,
        engine=make_engine(registry, settings),
        uploads=ThreadPoolExecutor(settings.batching.upload_workers, thread_name_prefix="genq-upload"),
        bulk_slots=threading.BoundedSemaphore(settings.batching.max_bulk_shards),
        pages=PageReleaser(),
        signer=load_signer(settings.c2pa),
    )


def make_registry(settings: WorkerSettings, task_threads: int = 1) -> tuple[Storage, ModelStore, ModelRegistry]:
    """Storage, the model store in it, and the registry over local roots and that store (no torch involved)."""
    storage = make_storage(
        settings.storage,
        bucket=settings.s3.bucket,
        local_dir=settings.local_dir,
        retry=settings.storage_retry,
        max_pool_connections=s3_pool_size(settings, task_threads),
    )
    if isinstance(storage, S3Storage):
        log.info(
            "S3 client: up to %d connections (%d upload threads, %d task threads)",
            s3_pool_size(settings, task_threads),
            settings.batching.upload_workers,
            task_threads,
        )
    model_store = make_model_store(settings, storage)
    registry = ModelRegistry(
        model_roots(settings),
        settings.device,
        store=model_store,
        accel=acceleration(settings),
        max_loaded=settings.max_loaded_models,
    )
    return storage, model_store, registry


def s3_pool_size(settings: WorkerSettings, task_threads: int) -> int:
    """Connections the S3 client keeps open: one for every thread that may call S3 at once (each upload thread, and
    each task thread storing a manifest or a WebDataset shard) and a few for the model store and dead letters.

    A pool smaller than that discards a connection whenever more calls end at once than it holds ("Connection
    pool is full" in the log), and the next call opens a new one: a TCP and, against AWS, a TLS handshake. An
    idle slot costs nothing: connections are opened on demand.
    """
    return settings.batching.upload_workers + task_threads + 4


def acceleration(settings: WorkerSettings) -> Acceleration:
    """The forward-pass options of ``settings.inference`` for the model loader."""
    return Acceleration(**settings.inference.model_dump())


def make_model_store(settings: WorkerSettings, storage: Storage) -> ModelStore:
    """Model versions published into ``storage``, downloaded into the settings' cache folder."""
    return ModelStore(
        storage,
        settings.model_cache_dir,
        local_roots=model_roots(settings),
        cache_max_bytes=settings.model_cache_max_bytes,
    )


def make_engine(registry: ModelRegistry, settings: WorkerSettings) -> InferenceEngine:
    return InferenceEngine(
        registry.load, max_batch=settings.batching.max_batch, max_wait_s=settings.batching.max_wait_ms / 1000
    )


def model_roots(settings: WorkerSettings) -> list[Path]:
    """The shipped zoo first, then the deployment's own model folders."""
    return [ZOO_DIR, *settings.model_dirs]


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime(settings: WorkerSettings, task_threads: int = 1) -> Runtime:
    """The process's runtime, built on first use (thread-safe); ``task_threads`` as in :func:`build_runtime`."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = build_runtime(settings, task_threads)
        return _runtime


def reset_runtime() -> None:
    """Forget the runtime (a forked child must build its own connections)."""
    global _runtime
    with _lock:
        _runtime = None
