"""The generate pipeline: a plain function over injected storage, model loader and reporter.

The Celery task and the embedded CLI both call :func:`run_generate`; neither adds logic of its own. A job ends
``succeeded`` only after every image and the manifest are stored; any error propagates to the caller, which
marks the job failed (with the outputs stored so far).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from models.generator import ImageGenerator
from producer import constants
from producer.contract import GenerateJob, Manifest, OutputRef
from producer.seeds import image_seed
from worker.encode import encode_image, provenance
from worker.storage import Storage


class Reporter(Protocol):
    """Where the pipeline reports what it does: Redis + callbacks in a worker, a progress bar in the CLI."""

    def started(self, job: GenerateJob) -> bool:
        """Mark the job running; False means it already ended (a late redelivery) and must not run."""
        ...

    def progress(self, job: GenerateJob, done: int) -> None: ...

    def succeeded(self, job: GenerateJob, outputs: list[OutputRef], manifest_key: str) -> None: ...


ModelLoader = Callable[[str, str], ImageGenerator]


@dataclass(frozen=True)
class GenerateResult:
    """What a finished run stored."""

    outputs: list[OutputRef]
    manifest_key: str
    skipped: bool = False  # the job had already ended; nothing was done


def job_prefix(job_id: str) -> str:
    return constants.JOB_PREFIX.format(job_id=job_id)


def output_key(prefix: str, index: int, extension: str) -> str:
    return f"{prefix}{index:05d}.{extension}"


def run_generate(
    job: GenerateJob,
    *,
    storage: Storage,
    load_model: ModelLoader,
    reporter: Reporter,
    batch_size: int,
    prefix: str | None = None,
    stored: list[OutputRef] | None = None,
) -> GenerateResult:
    """Sample, encode and store every image of ``job``, then its manifest.

    Args:
        prefix: object key prefix (default ``jobs/<job-id>/``; the embedded CLI writes at the top of its folder).
        stored: filled in as images are stored, so a caller can report partial outputs when the run fails.

    Raises whatever the model loader, the model or the storage raise; nothing is swallowed.
    """
    prefix = job_prefix(job.job_id) if prefix is None else prefix
    outputs = stored if stored is not None else []
    if not reporter.started(job):
        return GenerateResult(outputs=[], manifest_key="", skipped=True)
    model = load_model(job.model_name, job.model_version)
    version = f"{job.model_name}@{job.model_version}"
    labels = job.image_labels()
    for start in range(0, len(labels), batch_size):
        indices = range(start, min(start + batch_size, len(labels)))
        seeds = [image_seed(job.seed, i) for i in indices]
        images = model.sample([labels[i].index for i in indices], seeds).numpy()  # (B, C, H, W) uint8
        for i, seed, image in zip(indices, seeds, images, strict=True):
            label = labels[i]
            info = provenance(generator=job.model_name, version=version, label=label.name, seed=seed)
            data = encode_image(image, job.format, info)
            key = output_key(prefix, i, job.format.extension)
            storage.put(key, data, job.format.content_type)
            outputs.append(
                OutputRef(
                    index=i,
                    label=label.name,
                    label_index=label.index,
                    seed=seed,
                    key=key,
                    sha256=hashlib.sha256(data).hexdigest(),
                    content_type=job.format.content_type,
                )
            )
        reporter.progress(job, len(outputs))
    manifest = Manifest(
        job_id=job.job_id,
        model=job.model,
        model_version=version,
        seed=job.seed,
        format=job.format,
        created_at=job.created_at,
        outputs=outputs,
    )
    manifest_key = prefix + constants.MANIFEST_NAME
    storage.put(manifest_key, manifest.model_dump_json(indent=2).encode(), "application/json")
    reporter.succeeded(job, outputs, manifest_key)
    return GenerateResult(outputs=list(outputs), manifest_key=manifest_key)
