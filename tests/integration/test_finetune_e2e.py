"""Fine-tuning through the real stack: upload, a training worker (-Q train), S3 checkpoints and model registry, a
generation worker that serves the new version without a restart, SIGKILL mid-training, cancel, hostile archives."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from stack import Stack, wait_until, worker_env
from tiny_model import make_tiny_base

from producer.contract import FineTuneRequest, GenerateRequest, JobStatus, JobView, PromotionGate, TrainingView

pytestmark = pytest.mark.integration

CLASSES = ("logo", "sneaker")  # "sneaker" is one of the base's classes, "logo" is new


def make_folder(root: Path, per_class: int = 10) -> Path:
    """An ImageFolder tree of small PNGs of other sizes and modes than the model's (they get resized)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, size=(36, 30, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels, "RGB").save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def base(stack: Stack) -> str:
    make_tiny_base(stack.model_root)  # before any worker starts, so workers publish it
    return "tiny-base"


def submit(stack: Stack, dataset: str, name: str, **fields: object) -> JobView:
    request = FineTuneRequest.model_validate(
        {"base": "tiny-base", "dataset": dataset, "name": name, "batch_size": 4, **fields}
    )
    return stack.client.submit_finetune(request)


def test_a_finetune_publishes_a_version_that_a_running_generation_worker_serves(  # type: ignore[no-untyped-def]
    stack: Stack, base: str, start_worker, tmp_path: Path
) -> None:
    generation = start_worker(worker_env(stack), concurrency=2)  # started before the version exists
    start_worker(worker_env(stack), queues="train", concurrency=1)
    upload = stack.client.upload_dataset(make_folder(tmp_path / "brand_x"))
    job = submit(
        stack, upload.dataset, "tiny-ft", steps=6, sample_every=3, checkpoint_every=2, gate=PromotionGate(max_fid=1e9)
    )
    assert job.kind == "finetune" and job.status is JobStatus.QUEUED

    view = stack.client.wait(job.id, timeout=120)
    assert view.status is JobStatus.SUCCEEDED, view.error
    t = view.training
    assert t is not None and t.model == "tiny-ft@1" and t.step == 6 and view.progress.done == 6
    assert t.dataset == {"logo": 10, "sneaker": 10} and t.resumed_from is None
    assert set(t.aliases) == {"latest", "production"} and t.gate_passed is True and "fid" in t.metrics
    assert stack.keys("models/tiny-ft/") == [
        f"models/tiny-ft/1/{f}"
        for f in (
            "MODEL_CARD.md",
            "config.json",
            "discriminator.safetensors",
            "metrics.json",
            "samples.png",
            "weights.safetensors",
        )
    ] + ["models/tiny-ft/aliases.json"]
    assert json.loads(stack.get("models/tiny-ft/aliases.json")) == {"latest": "1", "production": "1"}
    assert json.loads(stack.get("models/tiny-ft/1/config.json"))["class_names"] == list(CLASSES)
    grids = [k for k in stack.keys(f"training/{job.id}/") if "/samples/" in k]
    assert [k.rsplit("/", 1)[1] for k in grids] == ["step-000003.png", "step-000006.png"]
    assert t.samples_key == grids[-1]
    assert "tiny-ft" in stack.client.models()

    image_job = stack.client.submit(GenerateRequest(model="tiny-ft:production", label="logo", count=3, seed=1))
    done = stack.client.wait(image_job.id, timeout=60)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert done.model_version == "tiny-ft@1" and len(done.outputs) == 3
    assert "loaded tiny-ft@1" in generation.log()


def test_cli_finetune_uploads_follows_and_names_the_published_version(  # type: ignore[no-untyped-def]
    stack: Stack, base: str, start_worker, tmp_path: Path
) -> None:
    start_worker(worker_env(stack), queues="train", concurrency=1)
    folder = make_folder(tmp_path / "brand_x")
    (folder / "logo" / ".DS_Store").write_bytes(b"finder litter")  # hidden: never uploaded
    env = {**worker_env(stack), "COLUMNS": "200"}
    before = set(stack.keys("datasets/"))  # other tests of this module upload too
    argv = [sys.executable, "-m", "producer.cli", "finetune", "--base", "tiny-base", "--data", str(folder)]
    argv += ["--name", "tiny-cli", "--steps", "4", "--batch-size", "4", "--sample-every", "2", "--wait"]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    view = JobView.model_validate_json(result.stdout)
    assert view.status is JobStatus.SUCCEEDED and view.training is not None and view.training.model == "tiny-cli@1"
    assert "queued fine-tune" in result.stderr and "published tiny-cli@1" in result.stderr
    assert "samples at step 4" in result.stderr and "genq generate --model tiny-cli@1" in result.stderr
    uploaded = set(stack.keys("datasets/")) - before
    assert len(uploaded) == 20 and len({k.split("/")[1] for k in uploaded}) == 1  # one upload of both classes
    assert sum("/logo/" in k for k in uploaded) == 10 and not any(".DS_Store" in k for k in uploaded)


def test_cli_finetune_refuses_bad_input_before_uploading(stack: Stack, tmp_path: Path) -> None:
    env = {**worker_env(stack), "COLUMNS": "200"}
    before = stack.keys("datasets/")
    argv = [sys.executable, "-m", "producer.cli", "finetune", "--data", str(tmp_path), "--name", "Bad Name"]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "name:" in result.stderr
    assert stack.keys("datasets/") == before


def test_a_training_worker_killed_mid_job_is_resumed_from_its_checkpoint(  # type: ignore[no-untyped-def]
    stack: Stack, base: str, start_worker, tmp_path: Path
) -> None:
    # A short visibility timeout brings the message back soon after the whole worker dies; the lease (2 s) expires
    # about as fast, so the next worker takes the job over.
    env = worker_env(stack, GENQ_CELERY__VISIBILITY_TIMEOUT_S="3", GENQ_TRAIN__LEASE_TTL_S="2")
    first = start_worker(env, queues="train", concurrency=1)
    upload = stack.client.upload_dataset(make_folder(tmp_path / "data"))
    # 1,000 steps: the kill lands after the second checkpoint with some 800 steps to spare, and the rest stays short.
    job = submit(stack, upload.dataset, "tiny-resumed", steps=1000, checkpoint_every=100, sample_every=1000)
    wait_until(lambda: (training(stack, job.id).checkpoint_step or 0) >= 200, 120, "two checkpoints")
    first.kill()
    checkpoint = stack.get(f"training/{job.id}/checkpoint.safetensors")
    (tmp_path / "ckpt").write_bytes(checkpoint)
    with safe_open(str(tmp_path / "ckpt"), framework="pt") as fh:
        stored_step = json.loads((fh.metadata() or {})["genq"])["step"]
    assert stored_step >= 200 and stored_step % 100 == 0
    killed_at = stack.client.status(job.id).training
    assert killed_at is not None and killed_at.step < 1000

    second = start_worker(env, queues="train", concurrency=1)
    view = stack.client.wait(job.id, timeout=180)
    assert view.status is JobStatus.SUCCEEDED, view.error
    assert view.training is not None and view.training.resumed_from == stored_step  # never from zero
    assert view.training.model == "tiny-resumed@1"
    assert f"resumes from its checkpoint at step {stored_step}" in second.log()


def training(stack: Stack, job_id: str) -> TrainingView:
    """The job's training view, or an empty one before the worker wrote it."""
    return stack.client.status(job_id).training or TrainingView(total_steps=0)


def test_a_canceled_finetune_stops_at_its_next_step_and_publishes_nothing(  # type: ignore[no-untyped-def]
    stack: Stack, base: str, start_worker, tmp_path: Path
) -> None:
    worker = start_worker(worker_env(stack), queues="train", concurrency=1)
    upload = stack.client.upload_dataset(make_folder(tmp_path / "data"))
    job = submit(stack, upload.dataset, "tiny-canceled", steps=100_000, sample_every=10_000, checkpoint_every=10_000)
    wait_until(lambda: training(stack, job.id).step >= 20, 120, "training to run")
    assert stack.client.cancel(job.id).status is JobStatus.CANCELED
    wait_until(lambda: f"job {job.id} stops at step" in worker.log(), 30, "the worker to stop")
    view = stack.client.status(job.id)
    assert view.status is JobStatus.CANCELED and view.training is not None and view.training.step < 100_000
    assert stack.keys("models/tiny-canceled/") == []


def test_a_hostile_archive_fails_the_job_with_the_reason(  # type: ignore[no-untyped-def]
    stack: Stack, base: str, start_worker, tmp_path: Path
) -> None:
    start_worker(worker_env(stack), queues="train", concurrency=1)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("sneaker/ok.png", b"whatever")
        archive.writestr("../../escape.png", b"evil")
    path = tmp_path / "evil.zip"
    path.write_bytes(buffer.getvalue())
    upload = stack.client.upload_dataset(path)
    job = submit(stack, upload.dataset, "tiny-evil", steps=5)
    view = stack.client.wait(job.id, timeout=60)
    assert view.status is JobStatus.FAILED and view.error is not None
    assert "../../escape.png" in view.error.message
    assert stack.keys("models/tiny-evil/") == []
