"""Prometheus metrics of a worker process, served on ``GENQ_METRICS_PORT`` (threads/solo pools).

Rates come from counters (``rate(genq_images_stored_total[1m])`` is images/s); the API process exposes queue
depths and submissions on its own ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

SHARDS = Counter("genq_worker_shards_total", "Job shards run by this worker, by outcome.", ["outcome"])
IMAGES = Counter("genq_images_stored_total", "Output images stored.", ["model"])
BATCH_SIZE = Histogram("genq_batch_size", "Images per forward pass.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
FORWARD_SECONDS = Histogram("genq_forward_seconds", "Duration of one forward pass.", ["model"])
MODEL_LOAD_SECONDS = Histogram(
    "genq_model_load_seconds", "Time to load a model version.", buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30)
)
FINETUNES = Counter("genq_finetunes_total", "Fine-tune deliveries run by this worker, by outcome.", ["outcome"])
MESSAGES_RESENT = Counter(
    "genq_messages_resent_total",
    "Job messages the broker lost (the job recorded, its message nowhere) that this worker's sweeper sent again.",
    ["queue"],
)
CALLBACKS = Counter("genq_callback_attempts_total", "Callback delivery task runs, by outcome.", ["outcome"])


def serve(port: int, host: str = "0.0.0.0") -> None:  # noqa: S104 - scraped from outside the container
    """Expose this process's metrics over HTTP (a daemon thread)."""
    start_http_server(port, addr=host)
