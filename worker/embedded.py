"""Embedded mode: the same pipeline, in this process, writing into a local folder. No Redis, no S3, no Celery."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from producer.contract import GenerateJob, GenerateRequest, OutputRef, Shard
from producer.core.clock import utcnow
from producer.core.resolve import resolve_request
from worker.catalog.registry import ModelRegistry
from worker.generate.credentials import NOT_CONFIGURED, load_signer
from worker.generate.pipeline import GenerateResult, run_generate
from worker.memory import tune_malloc
from worker.runtime import acceleration, make_engine, model_roots
from worker.settings import WorkerSettings
from worker.storage.local import LocalStorage


class LocalReporter:
    """Reports to a callback instead of Redis; the CLI draws a progress bar with it."""

    def __init__(self, on_progress: Callable[[int, int], None] | None = None) -> None:
        self.on_progress = on_progress
        self._stored: list[OutputRef] = []

    def started(self, job: GenerateJob, shard: Shard) -> bool:
        self.progress(job, shard, 0)
        return True

    def progress(self, job: GenerateJob, shard: Shard, done: int) -> None:
        if self.on_progress is not None:
            self.on_progress(done, job.total_images)

    def active(self, job: GenerateJob) -> bool:
        return True

    def awaiting_manifest(self, job: GenerateJob) -> bool:
        return False  # started() never refuses: one process runs the whole job

    def shard_stored(self, job: GenerateJob, shard: Shard, outputs: list[OutputRef]) -> bool:
        self._stored = outputs
        return True  # one process, one shard: it completes the job

    def stored_outputs(self, job: GenerateJob, shards: int) -> Iterator[list[OutputRef]]:
        yield self._stored

    def succeeded(
        self,
        job: GenerateJob,
        first: list[OutputRef],
        total: int,
        manifest_key: str | None,
        sheet_key: str | None = None,
    ) -> bool:
        return True


def run_embedded(
    request: GenerateRequest,
    out: Path,
    settings: WorkerSettings,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[GenerateJob, GenerateResult]:
    """Resolve ``request`` against the local models and write its images and manifest.json into ``out``.

    Raises InvalidJob for a bad request (before anything is written) and whatever the pipeline raises.
    """
    tune_malloc(settings.malloc_arena_max, settings.malloc_policy)  # this process is the worker: same settings
    registry = ModelRegistry(
        model_roots(settings), settings.device, accel=acceleration(settings), max_loaded=settings.max_loaded_models
    )
    job = resolve_request(
        request,
        registry.catalog(),
        settings.limits,
        job_id=uuid.uuid4().hex,
        now=utcnow(),
        allow_hosts=settings.webhook.allow_hosts,
    )
    signer = load_signer(settings.c2pa) if job.provenance == "c2pa" else NOT_CONFIGURED  # c2pa loaded only if asked
    engine = make_engine(registry, settings)
    with ThreadPoolExecutor(settings.batching.upload_workers, thread_name_prefix="genq-upload") as uploads:
        try:
            result = run_generate(
                job,
                storage=LocalStorage(out),
                sample=engine.submit,
                reporter=LocalReporter(on_progress),
                chunk_size=settings.batching.max_batch,
                uploads=uploads,
                prefix="",
                sheet_images=settings.sheet_images,
                signer=signer,
                one_image_manifest=True,  # a folder of outputs always has its manifest.json
            )
        finally:
            engine.close()
    return job, result
