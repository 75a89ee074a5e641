"""The generate pipeline over injected storage and reporter: complete outputs or a loud failure."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from botocore.exceptions import EndpointConnectionError
from factories import RecordingReporter, output_refs
from tiny_model import TINY_NAME

from producer.contract import (
    GenerateJob,
    JobStatus,
    JobView,
    LabelCount,
    Manifest,
    OutputFormat,
    OutputRef,
    Shard,
    plan_shards,
)
from worker.catalog.registry import ModelRegistry
from worker.errors import IncompleteJob, StorageUnavailable
from worker.generate import pipeline
from worker.generate.inference import InferenceEngine
from worker.generate.pipeline import GenerateResult, run_generate
from worker.settings import StorageRetrySettings
from worker.storage.base import Storage
from worker.storage.local import LocalStorage
from worker.storage.s3 import S3Storage


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
def test_a_job_of_one_image_stores_it_alone_and_its_view_makes_the_manifest_a_stored_one_would_be(
    registry: ModelRegistry, uploads: ThreadPoolExecutor, tmp_path: Path, fmt: OutputFormat
) -> None:
    job = _job(fmt=fmt).model_copy(update={"items": [LabelCount(index=7, name="sneaker", count=1)]})
    alone, reporter = LocalStorage(tmp_path / "alone"), RecordingReporter()
    result = run(job, alone, registry, uploads, reporter, sheet_images=64)
    assert result.completed and result.manifest_key is None and result.sheet_key is None
    [image] = alone.list("jobs/")  # one object: no manifest, no sheet
    assert image.startswith(f"jobs/{job.job_id}/00000.")
    assert reporter.events == [("started", 0), ("succeeded", 1)]  # one step from the stored image to success

    stored = LocalStorage(tmp_path / "stored")  # a worker with GENQ_ONE_IMAGE_MANIFEST=true
    with_manifest = run(job, stored, registry, uploads, sheet_images=64, one_image_manifest=True)
    assert with_manifest.manifest_key == f"jobs/{job.job_id}/manifest.json"
    assert stored.list("jobs/") == sorted([image, with_manifest.manifest_key]) and stored.get(image) == alone.get(image)
    view = JobView(
        id=job.job_id,
        status=JobStatus.SUCCEEDED,
        model=job.model,
        model_version=f"{job.model_name}@{job.model_version}",
        seed=job.seed,
        format=job.format,
        outputs=reporter.first,
        created_at=job.created_at,
    )
    made = Manifest.of_view(view).model_dump_json(exclude_none=True).encode()
    assert made == stored.get(with_manifest.manifest_key)  # byte for byte


def test_a_one_image_job_canceled_between_its_image_and_its_success_lists_the_image_as_stopped(
    registry: ModelRegistry, uploads: ThreadPoolExecutor, tmp_path: Path
) -> None:
    # No shard record precedes the success of a job of one image: the run reports its stored image as a stopped
    # shard's, so the canceled job's view lists it (every stored object listed).
    job = _job().model_copy(update={"items": [LabelCount(index=7, name="sneaker", count=1)]})
    storage, reporter = LocalStorage(tmp_path), RecordingReporter(succeeds=False)
    result = run(job, storage, registry, uploads, reporter)
    assert result.stopped and not result.completed
    assert [o.key for o in result.outputs] == storage.list("jobs/")


def test_a_view_makes_no_manifest_of_a_job_that_has_not_succeeded_or_lists_only_its_first_outputs() -> None:
    view = JobView(
        id="j",
        status=JobStatus.RUNNING,
        model="m",
        model_version="m@1",
        seed=1,
        format=OutputFormat.PNG,
        created_at=datetime(2026, 12, 7, tzinfo=UTC),
    )
    with pytest.raises(ValueError, match="cannot make its manifest"):
        Manifest.of_view(view)
    with pytest.raises(ValueError, match="cannot make its manifest"):
        Manifest.of_view(view.model_copy(update={"status": JobStatus.SUCCEEDED, "outputs_truncated": True}))
    assert Manifest.of_view(view.model_copy(update={"status": JobStatus.SUCCEEDED})).outputs == []


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


class FakeClock:
    """A clock whose sleeps take no time: they move it on (one upload thread, so sleeps do not overlap)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float, wake: threading.Event) -> None:
        self.t += seconds


class DownS3Client:
    """A boto3 S3 client whose endpoint refuses connections until the fake clock reaches ``back_at``."""

    meta = SimpleNamespace(endpoint_url="http://s3.test", region_name="us-east-1")

    def __init__(self, clock: FakeClock, back_at: float = float("inf")) -> None:
        self.clock, self.back_at = clock, back_at
        self.calls: list[tuple[str, float]] = []  # (key, when)

    def put_object(self, *, Bucket: str, Key: str, Body: bytes, ContentType: str) -> dict[str, object]:  # noqa: N803
        self.calls.append((Key, self.clock.now()))
        if self.clock.now() < self.back_at:
            raise EndpointConnectionError(endpoint_url=self.meta.endpoint_url)
        return {}


WINDOW = StorageRetrySettings(window_s=20.0, initial_s=0.5, max_s=8.0)


def test_an_outage_past_the_window_costs_the_shard_one_window_not_one_per_upload(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    clock = FakeClock()
    client = DownS3Client(clock)
    storage = S3Storage("genq", WINDOW, client=cast(Any, client))
    with ThreadPoolExecutor(1) as one_thread, pytest.raises(StorageUnavailable, match="00000.png.*still failing"):
        run(_job(count=12), storage, registry, one_thread, clock=clock)

    # The first upload waited the window out and gave up; the chunk's 3 other uploads were skipped, and the shard's
    # later chunks never sampled for upload: 20 s, where a window per upload spent 4 x 20 s before the error came.
    assert {key for key, _ in client.calls} == {"jobs/job-0123456789/00000.png"}
    assert clock.t - 1000.0 == pytest.approx(WINDOW.window_s)
    assert 3 <= len(client.calls) <= 40  # backoff 0.5 s doubling up to 8 s with full jitter, inside 20 s


def test_an_outage_shorter_than_the_window_is_waited_out_once_and_the_shard_stored(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    clock = FakeClock()
    client = DownS3Client(clock, back_at=1015.0)
    storage = S3Storage("genq", WINDOW, client=cast(Any, client))
    with ThreadPoolExecutor(1) as one_thread:
        result = run(_job(count=12), storage, registry, one_thread, clock=clock)

    assert sorted(o.index for o in result.outputs) == list(range(12)) and result.manifest_key is not None
    failed = [key for key, when in client.calls if when < 1015.0]
    assert set(failed) == {"jobs/job-0123456789/00000.png"}  # the outage was met once, by the first upload
    assert len(client.calls) == len(failed) + 13  # then every image and the manifest went up at the first try
    # Waits have full jitter and the last is cut at the window's end, so the try that succeeds may be at that end.
    assert 1015.0 <= clock.t <= 1000.0 + WINDOW.window_s


class CountingStorage(LocalStorage):
    """Counts puts; each fails (``fail``) or waits for ``release`` and stores."""

    def __init__(self, root: Path, *, fail: bool = False) -> None:
        super().__init__(root)
        self.fail = fail
        self.release = threading.Event()
        self.keys: list[str] = []
        self.lock = threading.Lock()

    def put(self, key: str, data: bytes, content_type: str) -> None:
        with self.lock:
            self.keys.append(key)
        if self.fail:
            raise StorageUnavailable(f"S3 put of {key!r} still failing after the window")
        assert self.release.wait(10)
        super().put(key, data, content_type)


def test_the_first_upload_that_fails_stops_the_shards_queued_uploads(
    registry: ModelRegistry, uploads: ThreadPoolExecutor, tmp_path: Path
) -> None:
    storage = CountingStorage(tmp_path, fail=True)
    with pytest.raises(StorageUnavailable):
        run(_job(count=32), storage, registry, uploads, chunk_size=16)
    assert 1 <= len(storage.keys) <= 4  # at most one per upload thread; the chunk's other 12 and chunk 2 skipped


def test_a_shard_whose_job_ended_puts_nothing_more(registry: ModelRegistry, tmp_path: Path) -> None:
    job, storage = _job(count=16), CountingStorage(tmp_path)
    results: list[GenerateResult] = []
    with ThreadPoolExecutor(2) as two_threads:
        shard = threading.Thread(target=lambda: results.append(run(job, storage, registry, two_threads, chunk_size=8)))
        shard.start()
        deadline = time.monotonic() + 10
        while len(storage.keys) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        pipeline.job_ended(job.job_id)  # failed by another shard of this process (worker.jobs does this)
        puts_at_the_end = len(storage.keys)
        storage.release.set()
        shard.join(10)

    (result,) = results
    assert puts_at_the_end == 2 and len(storage.keys) == 2  # the 2 in flight went up; the 6 queued were skipped
    assert result.stopped and sorted(o.index for o in result.outputs) == [0, 1]  # what it stored, to be listed
    assert storage.list("") == [f"jobs/job-0123456789/{i:05d}.png" for i in (0, 1)]
