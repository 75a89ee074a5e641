"""What a team would run instead of genq (issue 19): a plain Celery task per image, the peer of
``python -m benchmarks.throughput``'s section (h).

    celery -A benchmarks.plain_task worker -Q plain --pool threads -c 8

One task per image: the generator loaded once per worker process through genq's own loader
(:func:`models.generator.load_generator`), one forward pass at batch 1 for (label, seed), a PNG from Pillow, one boto3
``put_object``, and the object key as the task's result in the Redis result backend. No batching, no job record, no
manifest, no callbacks: the least a team would write. It is written plainly on purpose; genq's own tasks follow
STYLE.md.

Configured from the environment, as a worker started by the benchmark sees it: ``PLAIN_REDIS_URL`` (broker and
result backend), ``PLAIN_MODEL_DIR`` (a version folder: ``config.json`` + ``weights.safetensors``),
``PLAIN_BUCKET``, ``PLAIN_DEVICE`` (default ``cpu``); boto3 reads ``AWS_ENDPOINT_URL`` and the credentials.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
from celery import Celery
from PIL import Image

from models.generator import ImageGenerator, load_generator

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

QUEUE = "plain"  # its own queue: genq's workers never see these messages
TASK = "plain.generate"
KEY_PREFIX = "plain/"


def create_app(redis_url: str) -> Celery:
    """The plain app on ``redis_url``: JSON only, results in Redis, its own queue."""
    app = Celery("plain", broker=redis_url, backend=redis_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_default_queue=QUEUE,
        worker_hijack_root_logger=False,
    )
    return app


app = create_app(os.environ.get("PLAIN_REDIS_URL", "redis://127.0.0.1:6379/14"))

_lock = threading.Lock()
_loaded: dict[str, ImageGenerator] = {}
_clients: dict[str, S3Client] = {}


def generator() -> ImageGenerator:
    """The worker process's generator, loaded on first use (the pool's threads share it)."""
    with _lock:
        if "model" not in _loaded:
            _loaded["model"] = load_generator(
                Path(os.environ["PLAIN_MODEL_DIR"]), os.environ.get("PLAIN_DEVICE", "cpu")
            )
        return _loaded["model"]


def s3() -> S3Client:
    """The worker process's boto3 client (thread-safe; its 10 pooled connections cover -c 8)."""
    with _lock:
        if "s3" not in _clients:
            _clients["s3"] = boto3.client("s3")
        return _clients["s3"]


def render_png(model: ImageGenerator, label: int, seed: int) -> bytes:
    """One forward pass at batch 1 for (label, seed), encoded as PNG by Pillow with its defaults."""
    image = model.sample([label], [seed])[0].numpy()  # (C, H, W) uint8
    hwc = image.transpose(1, 2, 0)  # (H, W, C)
    pil = Image.fromarray(hwc[:, :, 0]) if hwc.shape[2] == 1 else Image.fromarray(hwc)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


@app.task(name=TASK)
def generate(label: int, seed: int) -> str:
    """Render one image and store it; returns its key."""
    key = f"{KEY_PREFIX}{label}/{seed}.png"
    body = render_png(generator(), label, seed)
    s3().put_object(Bucket=os.environ["PLAIN_BUCKET"], Key=key, Body=body, ContentType="image/png")
    return key
