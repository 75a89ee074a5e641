"""Renditions and the contact sheet through the real stack: a sharded job in queue mode (Redis, a `genq worker`
process, a moto S3 server, a webhook receiver), and the same request in embedded mode, byte for byte."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from stack import Stack
from webhook_receiver import WebhookReceiver
from worker_process import WorkerProcess

from models.grid import SHEET_BACKGROUND, SHEET_CAPTION, SHEET_CELL, SHEET_PAD
from producer.client import Client
from producer.contract import GenerateRequest, JobStatus, Manifest, WebhookEvent
from producer.core.settings import DEV_WEBHOOK_SECRET

pytestmark = pytest.mark.integration

RENDITIONS: list[dict[str, Any]] = [
    {
        "name": "square",
        "size": 1080,
        "fit": "cover",
        "ops": [{"op": "autocontrast", "cutoff": 1}, {"op": "unsharp_mask", "radius": 2, "percent": 120}],
    },
    {"name": "feed", "width": 1080, "height": 1350, "fit": "pad", "background": "#ffffff"},
]
SIZES = {"square": (1080, 1080), "feed": (1080, 1350)}
COUNTS = {"sneaker": 3, "bag": 2}
SEED = 20


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver(secret=DEV_WEBHOOK_SECRET) as r:
        yield r


@pytest.fixture(scope="module")
def queued_job(stack: Stack, module_worker: WorkerProcess, receiver: WebhookReceiver) -> tuple[str, Client]:
    """The job of this module: 5 samples x 2 renditions in 3 shards of 2 (the last to finish makes the sheet)."""
    client = Client(stack.client.settings.model_copy(update={"shard_size": 2}))
    request = GenerateRequest.model_validate(
        {
            "model": "fmnist-cgan",
            "counts": COUNTS,
            "seed": SEED,
            "renditions": RENDITIONS,
            "callback": {"url": receiver.url},
        }
    )
    job = client.submit(request)
    view = client.wait(job.id, timeout=120)
    assert view.status is JobStatus.SUCCEEDED and view.shards == 3, view.error
    return job.id, client


def _expected_keys(prefix: str) -> list[str]:
    files = [f"{prefix}{i:05d}-{name}.png" for i in range(5) for name in ("square", "feed")]
    return sorted([*files, f"{prefix}manifest.json", f"{prefix}sheet.png"])


def test_two_renditions_in_queue_mode_store_exactly_the_expected_keys_at_their_exact_sizes(
    stack: Stack, queued_job: tuple[str, Client], receiver: WebhookReceiver
) -> None:
    job_id, client = queued_job
    prefix = f"jobs/{job_id}/"
    assert stack.keys(prefix) == _expected_keys(prefix)
    view = client.status(job_id)
    manifest = Manifest.model_validate_json(stack.get(f"{prefix}manifest.json"))
    assert manifest.outputs == view.outputs and manifest.sheet_key == view.sheet_key == f"{prefix}sheet.png"
    assert [o.label for o in manifest.outputs] == ["sneaker"] * 3 + ["bag"] * 2
    for output in manifest.outputs:
        assert output.renditions is not None and [r.name for r in output.renditions] == ["square", "feed"]
        for rendition in output.renditions:
            assert rendition.key == f"{prefix}{output.index:05d}-{rendition.name}.png"
            data = stack.get(rendition.key)
            assert hashlib.sha256(data).hexdigest() == rendition.sha256
            image = Image.open(io.BytesIO(data))
            assert image.size == (rendition.width, rendition.height) == SIZES[rendition.name]
            assert image.text["genq:rendition"] == rendition.name  # type: ignore[attr-defined]
            assert image.text["genq:seed"] == str(output.seed)  # type: ignore[attr-defined]
        feed = Image.open(io.BytesIO(stack.get(output.renditions[1].key)))
        assert feed.getpixel((0, 0)) == feed.getpixel((1079, 1349)) == 255  # the white pad, above and below

    deadline = time.monotonic() + 30
    succeeded: list[WebhookEvent] = []
    while not succeeded and time.monotonic() < deadline:
        events = [WebhookEvent.model_validate_json(r.body) for r in receiver.received if r.verified]
        succeeded = [e for e in events if e.data.id == job_id and e.type.value == "succeeded"]
        time.sleep(0.05)
    assert succeeded, "no succeeded callback"
    assert succeeded[0].data.sheet_key == f"{prefix}sheet.png"
    assert succeeded[0].data.outputs == manifest.outputs  # every rendition listed in the callback too

    urls = client.with_urls(view)
    assert urls.sheet_url and "sheet.png" in urls.sheet_url
    assert all(r.url and r.key in r.url for o in urls.outputs for r in o.renditions or [])


def _cells(sheet: Image.Image, count: int, per_row: int) -> list[np.ndarray]:
    """The image squares of a sheet's first ``count`` cells, by the geometry models.grid documents."""
    squares = []
    for i in range(count):
        row, col = divmod(i, per_row)
        left = SHEET_PAD + col * (SHEET_CELL + SHEET_PAD)
        top = SHEET_PAD + row * (SHEET_CELL + SHEET_CAPTION + SHEET_PAD)
        squares.append(np.asarray(sheet.convert("L").crop((left, top, left + SHEET_CELL, top + SHEET_CELL)), float))
    return squares


def _downscaled(data: bytes) -> np.ndarray:
    """An output shrunk into a sheet cell with Pillow's own thumbnail (not genq's code), centred on the cell's grey."""
    image = Image.open(io.BytesIO(data)).convert("L")
    image.thumbnail((SHEET_CELL, SHEET_CELL), Image.Resampling.BILINEAR)
    canvas = Image.new("L", (SHEET_CELL, SHEET_CELL), SHEET_BACKGROUND)
    canvas.paste(image, ((SHEET_CELL - image.width) // 2, (SHEET_CELL - image.height) // 2))
    return np.asarray(canvas, float)


def test_the_contact_sheet_shows_every_output_in_manifest_order(stack: Stack, queued_job: tuple[str, Client]) -> None:
    job_id, _ = queued_job
    prefix = f"jobs/{job_id}/"
    manifest = Manifest.model_validate_json(stack.get(f"{prefix}manifest.json"))
    files = [r.key for o in manifest.outputs for r in o.renditions or []]  # manifest order
    sheet = Image.open(io.BytesIO(stack.get(f"{prefix}sheet.png")))
    per_row = 8  # four samples of two renditions a row: 10 cells in two rows
    assert sheet.size == (
        SHEET_PAD + per_row * (SHEET_CELL + SHEET_PAD),
        SHEET_PAD + 2 * (SHEET_CELL + SHEET_CAPTION + SHEET_PAD),
    )
    thumbs = [_downscaled(stack.get(key)) for key in files]
    cells = _cells(sheet, len(files), per_row)
    errors = np.array([[np.mean((cell - thumb) ** 2) for thumb in thumbs] for cell in cells])
    assert [int(i) for i in errors.argmin(axis=1)] == list(range(len(files)))  # cell i looks most like output i
    assert float(errors.diagonal().max()) < 200  # and closely: only the resampling filter differs


def _embedded(out: Path, sheet: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "AWS_"))}
    args = ["generate", "--counts", ",".join(f"{k}={v}" for k, v in COUNTS.items()), "--seed", str(SEED)]
    for rendition in RENDITIONS:
        args += ["--rendition", json.dumps(rendition)]
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args, "--out", str(out), "--sheet", str(sheet)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_embedded_mode_reruns_byte_identical_and_matches_queue_mode(
    stack: Stack, queued_job: tuple[str, Client], tmp_path: Path
) -> None:
    runs = []
    for name in ("first", "second"):
        result = _embedded(tmp_path / name, tmp_path / f"{name}-sheet.png")
        assert result.returncode == 0, result.stderr
        assert "(2 renditions each)" in result.stderr and "sheet.png" in result.stderr
        runs.append({p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir()) if p.name != "manifest.json"})
    first, second = runs
    assert sorted(first) == [k for k in _expected_keys("") if k != "manifest.json"]
    assert first == second  # every rendition and the sheet, byte for byte
    assert (tmp_path / "first-sheet.png").read_bytes() == first["sheet.png"]  # --sheet writes the same sheet

    job_id, _ = queued_job  # the same request in queue mode, sharded, on a worker process: the same bytes
    prefix = f"jobs/{job_id}/"
    assert {name: stack.get(prefix + name) for name in first} == first

    manifest = json.loads((tmp_path / "first" / "manifest.json").read_text())
    listed = [r["key"] for o in manifest["outputs"] for r in o["renditions"]]
    assert listed == [f"{i:05d}-{n}.png" for i in range(5) for n in ("square", "feed")]


def test_download_fetches_every_rendition_and_the_sheet_checked(
    stack: Stack, queued_job: tuple[str, Client], tmp_path: Path
) -> None:
    job_id, client = queued_job
    paths = client.download(client.status(job_id), tmp_path)
    assert sorted(p.name for p in paths) == _expected_keys("")
    assert (tmp_path / "sheet.png").read_bytes() == stack.get(f"jobs/{job_id}/sheet.png")


def test_cli_in_queue_mode_follows_the_job_and_writes_its_sheet(
    stack: Stack, module_worker: WorkerProcess, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env |= {"GENQ_REDIS__URL": stack.redis_url, "GENQ_S3__BUCKET": stack.bucket}
    sheet = tmp_path / "review" / "sheet.png"
    result = subprocess.run(
        [sys.executable, "-m", "producer.cli", "generate", "--label", "bag", "--count", "2", "--seed", "3"]
        + ["--rendition", "tile=300x200,fit=pad,background=#fff", "--sheet", str(sheet)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    job_id, status = result.stdout.split()[:2]  # --sheet follows the job: its summary line, not its id alone
    assert status == "succeeded:" and f"sheet jobs/{job_id}/sheet.png" in result.stdout
    assert sheet.read_bytes() == stack.get(f"jobs/{job_id}/sheet.png")
    assert stack.keys(f"jobs/{job_id}/") == sorted(
        [f"jobs/{job_id}/{i:05d}-tile.png" for i in range(2)]
        + [f"jobs/{job_id}/manifest.json", f"jobs/{job_id}/sheet.png"]
    )
