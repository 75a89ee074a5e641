"""The generate pipeline over injected storage and reporter: complete outputs or a loud failure."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from factories import output_refs
from tiny_model import TINY_NAME, make_tiny_model

from producer.contract import GenerateJob, LabelCount, Manifest, OutputFormat, OutputRef, Shard, plan_shards
from worker.catalog.registry import ModelRegistry
from worker.errors import IncompleteJob, StorageUnavailable
from worker.generate import pipeline
from worker.generate.inference import InferenceEngine
from worker.generate.pipeline import GenerateResult, run_generate
from worker.storage.base import Storage
from worker.storage.local import LocalStorage


class RecordingReporter:
    def __init__(self, start: bool = True) -> None:
        self.start = start
        self.events: list[tuple[str, int]] = []
        self.shards: dict[int, list[OutputRef]] = {}

    def started(self, job: GenerateJob, shard: Shard) -> bool:
        self.events.append(("started", 0))
        return self.start

    def progress(self, job: GenerateJob, shard: Shard, done: int) -> None:
        self.events.append(("progress", done))

    def active(self, job: GenerateJob) -> bool:
        return True

    def awaiting_manifest(self, job: GenerateJob) -> bool:
        return False

    def shard_stored(self, job: GenerateJob, shard: Shard, outputs: list[OutputRef]) -> bool:
        self.shards[shard.index] = outputs
        return len(self.shards) == shard.count

    def stored_outputs(self, job: GenerateJob, shards: int) -> Iterator[list[OutputRef]]:
        for index in range(shards):
            yield self.shards[index]

    def succeeded(self, job: GenerateJob, first: list[OutputRef], total: int, manifest_key: str) -> None:
        self.events.append(("succeeded", total))


class FailingStorage(LocalStorage):
    """Stores ``ok`` objects, then the object store goes away."""

    def __init__(self, root: Path, ok: int) -> None:
        super().__init__(root)
        self.ok = ok
        self.lock = threading.Lock()

    def put(self, key: str, data: bytes, content_type: str) -> None:
        with self.lock:  # uploads run on several threads
            if self.ok == 0:
                raise StorageUnavailable(f"S3 put of {key!r} still failing")
            self.ok -= 1
        super().put(key, data, content_type)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    root = tmp_path_factory.mktemp("zoo")
    make_tiny_model(root)
    return ModelRegistry([root])


@pytest.fixture(scope="module")
def uploads() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as pool:
        yield pool


def run(
    job: GenerateJob,
    storage: Storage,
    registry: ModelRegistry,
    uploads: ThreadPoolExecutor,
    reporter: RecordingReporter | None = None,
    chunk_size: int = 4,
    **kwargs: object,
) -> GenerateResult:
    engine = InferenceEngine(registry.load, max_batch=chunk_size, max_wait_s=0.001)
    try:
        return run_generate(
            job,
            storage=storage,
            sample=engine.submit,
            reporter=reporter or RecordingReporter(),
            chunk_size=chunk_size,
            uploads=uploads,
            **kwargs,
        )  # type: ignore[arg-type]
    finally:
        engine.close()


def _job(count: int = 10, fmt: OutputFormat = OutputFormat.PNG) -> GenerateJob:
    return GenerateJob(
        job_id="job-0123456789",
        model=TINY_NAME,
        model_name=TINY_NAME,
        model_version="1",
        items=[LabelCount(index=7, name="sneaker", count=count - 3), LabelCount(index=8, name="bag", count=3)],
        seed=42,
        format=fmt,
        created_at=datetime(2026, 11, 29, tzinfo=UTC),
    )


def test_every_image_and_the_manifest_are_stored_before_success(
    registry: ModelRegistry, uploads: ThreadPoolExecutor, tmp_path: Path
) -> None:
    storage, reporter = LocalStorage(tmp_path), RecordingReporter()
    result = run(_job(), storage, registry, uploads, reporter)
    assert [e for e, _ in reporter.events] == ["started", "progress", "progress", "progress", "succeeded"]
    assert [n for e, n in reporter.events if e == "progress"] == [4, 8, 10]
    keys = storage.list("jobs/job-0123456789/")
    assert len(keys) == 11 and result.manifest_key == "jobs/job-0123456789/manifest.json"
    manifest = Manifest.model_validate_json(storage.get(result.manifest_key))
    assert [o.label for o in manifest.outputs] == ["sneaker"] * 7 + ["bag"] * 3
    for output in manifest.outputs:
        assert hashlib.sha256(storage.get(output.key)).hexdigest() == output.sha256


@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_outputs_do_not_depend_on_the_batch_they_ride_in(
    registry: ModelRegistry, uploads: ThreadPoolExecutor, tmp_path: Path, fmt: OutputFormat
) -> None:
    hashes = []
    for batch_size in (1, 3, 64):
        result = run(_job(fmt=fmt), LocalStorage(tmp_path / str(batch_size)), registry, uploads, chunk_size=batch_size)
        hashes.append([o.sha256 for o in result.outputs])
    assert hashes[0] == hashes[1] == hashes[2]


def test_a_failed_upload_propagates_and_reports_only_what_was_stored(
    registry: ModelRegistry, uploads: ThreadPoolExecutor, tmp_path: Path
) -> None:
    reporter, stored = RecordingReporter(), []
    with pytest.raises(StorageUnavailable):
        run(_job(), FailingStorage(tmp_path, ok=5), registry, uploads, reporter, stored=stored)
    indices = sorted(o.index for o in stored)  # the second chunk uploads in parallel: one of its four got through
    assert len(indices) == 5 and indices[:4] == [0, 1, 2, 3] and indices[4] in range(4, 8)
    assert ("succeeded", 10) not in reporter.events
    assert not (tmp_path / "jobs" / "job-0123456789" / "manifest.json").exists()


def test_a_job_that_already_ended_is_not_run_again(
    registry: ModelRegistry, uploads: ThreadPoolExecutor, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    result = run(_job(), storage, registry, uploads, RecordingReporter(start=False))
    assert result.skipped and storage.list("") == []


def test_shards_store_disjoint_images_and_the_last_one_writes_the_manifest(
    registry: ModelRegistry, uploads: ThreadPoolExecutor, tmp_path: Path
) -> None:
    storage, reporter = LocalStorage(tmp_path), RecordingReporter()
    shards = plan_shards(10, 4)
    results = [run(_job(), storage, registry, uploads, reporter, shard=shard) for shard in reversed(shards)]
    assert [r.manifest_key for r in results] == [None, None, "jobs/job-0123456789/manifest.json"]
    assert [sorted(o.index for o in r.outputs) for r in results] == [[8, 9], [4, 5, 6, 7], [0, 1, 2, 3]]
    manifest = Manifest.model_validate_json(storage.get("jobs/job-0123456789/manifest.json"))
    assert [o.index for o in manifest.outputs] == list(range(10))
    whole = run(_job(), LocalStorage(tmp_path / "whole"), registry, uploads)
    assert [o.sha256 for o in manifest.outputs] == [o.sha256 for o in whole.outputs]  # sharding changes no byte


class LosingReporter(RecordingReporter):
    """Loses one output of the shard it records: the job's stored outputs have a hole."""

    def shard_stored(self, job: GenerateJob, shard: Shard, outputs: list[OutputRef]) -> bool:
        return super().shard_stored(job, shard, [o for o in outputs if o.index != 5])


def test_a_job_whose_stored_outputs_have_a_hole_fails_without_a_manifest(
    registry: ModelRegistry, uploads: ThreadPoolExecutor, tmp_path: Path
) -> None:
    storage, reporter = LocalStorage(tmp_path), LosingReporter()
    first, last = plan_shards(10, 6)
    run(_job(), storage, registry, uploads, reporter, shard=first)
    with pytest.raises(IncompleteJob, match="output 5 is missing"):
        run(_job(), storage, registry, uploads, reporter, shard=last)
    assert not storage.exists("jobs/job-0123456789/manifest.json")
    assert ("succeeded", 10) not in reporter.events and ("succeeded", 9) not in reporter.events


def _refs(indices: range) -> list[OutputRef]:
    return output_refs(indices, prefix="jobs/j/")


def test_a_large_manifest_is_streamed_through_a_file_and_the_view_gets_its_first_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "MANIFEST_SPOOL_BYTES", 4096)  # roll over to a temporary file early
    job = _job(count=2500)
    parts = (_refs(range(s, min(s + 1000, 2500))) for s in range(0, 2500, 1000))
    storage = LocalStorage(tmp_path)

    first, total = pipeline.write_manifest(job, storage, "jobs/j/manifest.json", parts)

    manifest = Manifest.model_validate_json(storage.get("jobs/j/manifest.json"))
    assert [o.index for o in manifest.outputs] == list(range(2500)) and total == 2500
    assert first == manifest.outputs[: pipeline.VIEW_OUTPUTS_MAX] and len(first) == 1000
    assert (manifest.job_id, manifest.model_version, manifest.seed) == (job.job_id, f"{TINY_NAME}@1", 42)
    assert "member" not in json.loads(storage.get("jobs/j/manifest.json"))["outputs"][0]  # None fields left out


def test_a_manifest_with_a_repeated_or_missing_index_is_refused(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    with pytest.raises(IncompleteJob, match="output 2 is listed twice"):
        pipeline.write_manifest(_job(count=10), storage, "m.json", [_refs(range(3)), _refs(range(2, 10))])
    with pytest.raises(IncompleteJob, match="9 of 10 outputs stored"):
        pipeline.write_manifest(_job(count=10), storage, "m.json", [_refs(range(9))])
    assert storage.list("") == []


def test_webdataset_output_is_one_deterministic_tar_per_shard_with_images_and_json(
    registry: ModelRegistry, uploads: ThreadPoolExecutor, tmp_path: Path
) -> None:
    job = _job().model_copy(update={"output": "webdataset"})
    reporter = RecordingReporter()
    storage = LocalStorage(tmp_path / "a")
    for shard in plan_shards(10, 6):
        run(job, storage, registry, uploads, reporter, shard=shard)
    prefix = "jobs/job-0123456789/"
    assert storage.list(prefix) == [f"{prefix}manifest.json", f"{prefix}shard-00000.tar", f"{prefix}shard-00001.tar"]
    manifest = Manifest.model_validate_json(storage.get(f"{prefix}manifest.json"))
    assert [(o.key.rsplit("/", 1)[1], o.member) for o in manifest.outputs[5:7]] == [
        ("shard-00000.tar", "00005.png"),
        ("shard-00001.tar", "00006.png"),
    ]
    with tarfile.open(fileobj=io.BytesIO(storage.get(f"{prefix}shard-00001.tar"))) as tar:
        names = tar.getnames()
        image = tar.extractfile("00006.png").read()  # type: ignore[union-attr]
        meta = json.loads(tar.extractfile("00006.json").read())  # type: ignore[union-attr]
    assert names == [f"{i:05d}.{ext}" for i in range(6, 10) for ext in ("png", "json")]
    assert hashlib.sha256(image).hexdigest() == manifest.outputs[6].sha256 == meta["sha256"]
    assert meta["label"] == "sneaker" and meta["seed"] == manifest.outputs[6].seed
    objects = run(_job(), LocalStorage(tmp_path / "objects"), registry, uploads)
    assert [o.sha256 for o in objects.outputs] == [o.sha256 for o in manifest.outputs]  # same images either way
    again = LocalStorage(tmp_path / "b")
    run(job, again, registry, uploads, shard=plan_shards(10, 6)[1])
    assert again.get(f"{prefix}shard-00001.tar") == storage.get(f"{prefix}shard-00001.tar")  # a retry rewrites it
