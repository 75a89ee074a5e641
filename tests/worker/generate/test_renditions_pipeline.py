"""Renditions and contact sheets through the generate pipeline, over local storage and the tiny model."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from factories import RecordingReporter
from PIL import Image
from tiny_model import TINY_NAME

from models.grid import SHEET_BACKGROUND, SHEET_CAPTION, SHEET_CELL, SHEET_PAD
from producer.contract import GenerateJob, LabelCount, Manifest, OutputFormat, Rendition, Shard, plan_shards
from worker.catalog.registry import ModelRegistry
from worker.generate.inference import InferenceEngine
from worker.generate.pipeline import GenerateResult, run_generate
from worker.storage.local import LocalStorage

PREFIX = "jobs/job-0123456789/"
RENDITIONS = [
    Rendition(name="square", size=40, fit="cover", ops=[{"op": "unsharp_mask", "radius": 1.5}]),  # type: ignore[list-item]
    Rendition(name="feed", width=40, height=50, fit="pad", background="#ff8000"),
]


def _job(count: int = 6, **update: object) -> GenerateJob:
    job = GenerateJob(
        job_id="job-0123456789",
        model=TINY_NAME,
        model_name=TINY_NAME,
        model_version="1",
        items=[LabelCount(index=7, name="sneaker", count=count - 2), LabelCount(index=8, name="bag", count=2)],
        seed=42,
        created_at=datetime(2026, 12, 7, tzinfo=UTC),
        renditions=RENDITIONS,
    )
    return job.model_copy(update=update)


def _run(
    job: GenerateJob,
    storage: LocalStorage,
    registry: ModelRegistry,
    uploads: ThreadPoolExecutor,
    reporter: RecordingReporter | None = None,
    shard: Shard | None = None,
    sheet_images: int = 64,
    chunk_size: int = 4,
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
            shard=shard,
            sheet_images=sheet_images,
        )
    finally:
        engine.close()


@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_each_rendition_is_stored_at_its_exact_size_and_listed_in_the_manifest(
    registry: ModelRegistry, uploads: ThreadPoolExecutor, tmp_path: Path, fmt: OutputFormat
) -> None:
    storage = LocalStorage(tmp_path)
    result = _run(_job(format=fmt), storage, registry, uploads)
    ext = fmt.extension
    expected = [f"{PREFIX}{i:05d}-{name}.{ext}" for i in range(6) for name in ("square", "feed")]
    assert storage.list(PREFIX) == sorted([*expected, f"{PREFIX}manifest.json", f"{PREFIX}sheet.png"])
    manifest = Manifest.model_validate_json(storage.get(f"{PREFIX}manifest.json"))
    assert manifest.sheet_key == f"{PREFIX}sheet.png" == result.sheet_key
    assert [r.key for o in manifest.outputs for r in o.renditions or []] == expected
    for output in manifest.outputs:
        assert output.renditions is not None and [r.name for r in output.renditions] == ["square", "feed"]
        assert (output.key, output.sha256) == (output.renditions[0].key, output.renditions[0].sha256)
        for rendition, size in zip(output.renditions, [(40, 40), (40, 50)], strict=True):
            data = storage.get(rendition.key)
            assert hashlib.sha256(data).hexdigest() == rendition.sha256
            image = Image.open(io.BytesIO(data))
            assert image.size == (rendition.width, rendition.height) == size
            grey = rendition.name == "square" and fmt is not OutputFormat.WEBP  # WebP has no grey mode
            assert image.mode == ("L" if grey else "RGB")  # an orange pad makes the feed RGB
        feed = Image.open(io.BytesIO(storage.get(output.renditions[1].key))).convert("RGB")
        if fmt is not OutputFormat.JPEG:  # lossless: the pad is exactly the colour asked
            assert feed.getpixel((0, 0)) == feed.getpixel((39, 49)) == (255, 128, 0)


def test_a_rerun_and_a_sharded_run_store_byte_identical_renditions_and_sheet(
    registry: ModelRegistry, uploads: ThreadPoolExecutor, tmp_path: Path
) -> None:
    whole = LocalStorage(tmp_path / "whole")
    _run(_job(), whole, registry, uploads)
    again = LocalStorage(tmp_path / "again")
    _run(_job(), again, registry, uploads, chunk_size=1)
    sharded, reporter = LocalStorage(tmp_path / "sharded"), RecordingReporter()
    for shard in reversed(plan_shards(6, 4)):  # the last shard to finish (the first) writes the sheet
        _run(_job(), sharded, registry, uploads, reporter, shard=shard)
    assert reporter.sheet_key == f"{PREFIX}sheet.png"
    keys = [k for k in whole.list(PREFIX) if not k.endswith("manifest.json")]
    assert keys == [k for k in sharded.list(PREFIX) if not k.endswith("manifest.json")]
    for key in keys:
        assert whole.get(key) == again.get(key) == sharded.get(key), key


def test_webdataset_holds_every_rendition_of_a_sample_under_one_key(
    registry: ModelRegistry, uploads: ThreadPoolExecutor, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    _run(_job(output="webdataset"), storage, registry, uploads)
    assert storage.list(PREFIX) == [f"{PREFIX}manifest.json", f"{PREFIX}shard-00000.tar", f"{PREFIX}sheet.png"]
    manifest = Manifest.model_validate_json(storage.get(f"{PREFIX}manifest.json"))
    objects = LocalStorage(tmp_path / "objects")
    _run(_job(), objects, registry, uploads)
    with tarfile.open(fileobj=io.BytesIO(storage.get(f"{PREFIX}shard-00000.tar"))) as tar:
        names = tar.getnames()
        files = {name: tar.extractfile(name).read() for name in names}  # type: ignore[union-attr]
    assert names == [f"{i:05d}.{part}" for i in range(6) for part in ("square.png", "feed.png", "json")]
    for output in manifest.outputs:
        assert output.renditions is not None and output.member == f"{output.index:05d}.square.png"
        meta = json.loads(files[f"{output.index:05d}.json"])
        for rendition in output.renditions:
            assert rendition.key == f"{PREFIX}shard-00000.tar"
            data = files[rendition.member or ""]
            assert hashlib.sha256(data).hexdigest() == rendition.sha256 == meta["renditions"][rendition.name]["sha256"]
            object_key = f"{PREFIX}{output.index:05d}-{rendition.name}.png"
            assert data == objects.get(object_key)  # the same bytes whichever layout stores them


def _cells(sheet: Image.Image, count: int, per_row: int) -> list[np.ndarray]:
    """The image squares of a sheet's first ``count`` cells (geometry from models.grid's constants)."""
    cells = []
    for i in range(count):
        row, col = divmod(i, per_row)
        left = SHEET_PAD + col * (SHEET_CELL + SHEET_PAD)
        top = SHEET_PAD + row * (SHEET_CELL + SHEET_CAPTION + SHEET_PAD)
        cells.append(np.asarray(sheet.convert("RGB").crop((left, top, left + SHEET_CELL, top + SHEET_CELL)), float))
    return cells


def _thumbnail(data: bytes) -> np.ndarray:
    """An output scaled into a sheet cell by Pillow directly, centred on the cell's grey, as RGB."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = min(SHEET_CELL / image.width, SHEET_CELL / image.height)
    size = (round(image.width * scale), round(image.height * scale))
    canvas = Image.new("RGB", (SHEET_CELL, SHEET_CELL), (SHEET_BACKGROUND,) * 3)
    canvas.paste(
        image.resize(size, Image.Resampling.NEAREST), ((SHEET_CELL - size[0]) // 2, (SHEET_CELL - size[1]) // 2)
    )
    return np.asarray(canvas, float)


def test_the_sheet_shows_the_first_outputs_in_manifest_order(
    registry: ModelRegistry, uploads: ThreadPoolExecutor, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    _run(_job(count=12), storage, registry, uploads, sheet_images=5)
    manifest = Manifest.model_validate_json(storage.get(f"{PREFIX}manifest.json"))
    files = [r.key for o in manifest.outputs[:5] for r in o.renditions or []]
    sheet = Image.open(io.BytesIO(storage.get(f"{PREFIX}sheet.png")))
    per_row = 8  # 4 samples of 2 renditions a row
    assert sheet.size == (
        SHEET_PAD + per_row * (SHEET_CELL + SHEET_PAD),
        SHEET_PAD + 2 * (SHEET_CELL + SHEET_CAPTION + SHEET_PAD),  # 10 cells: two rows
    )
    cells = _cells(sheet, len(files), per_row)
    thumbs = [_thumbnail(storage.get(key)) for key in files]
    # Each cell is nearest to the output at its own place in the manifest, of all the outputs shown.
    nearest = [int(np.argmin([np.mean((cell - thumb) ** 2) for thumb in thumbs])) for cell in cells]
    assert nearest == list(range(len(files)))


def test_no_sheet_when_sheet_images_is_zero_and_none_with_the_old_naming(
    registry: ModelRegistry, uploads: ThreadPoolExecutor, tmp_path: Path
) -> None:
    storage, reporter = LocalStorage(tmp_path), RecordingReporter()
    result = _run(_job(renditions=None), storage, registry, uploads, reporter, sheet_images=0)
    assert storage.list(PREFIX) == [f"{PREFIX}{i:05d}.png" for i in range(6)] + [f"{PREFIX}manifest.json"]
    assert result.sheet_key is None and reporter.sheet_key is None
    assert "sheet_key" not in json.loads(storage.get(f"{PREFIX}manifest.json"))
    assert all(o.renditions is None for o in result.outputs)
