"""Settings of a producer process (the Python client, the CLI, the HTTP API), from ``GENQ_*`` variables."""

from __future__ import annotations

from pydantic import BaseModel, Field

from producer.contract import Priority
from producer.core.settings import GenqSettings


class ApiSettings(BaseModel):
    """The HTTP API (``genq api``): where it listens, what it accepts, and the per-key defaults it enforces."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, description="Larger request bodies get 413 unread.")
    max_dataset_bytes: int = Field(
        default=256 * 2**20, ge=1024, description="Largest data set archive `POST /v1/datasets` accepts."
    )
    dataset_bytes: int = Field(
        default=2 * 2**30,
        ge=1,
        description="Default per-key bytes of uploaded data sets stored at once (expired ones no longer count).",
    )
    dataset_ttl_s: int = Field(
        default=7 * 24 * 3600, ge=1, description="Uploaded data sets are deleted this long after their upload."
    )
    rate_per_s: float = Field(default=10.0, gt=0, description="Requests per second per key (token bucket refill).")
    burst: int = Field(default=20, ge=1, description="Requests a key may make at once (token bucket size).")
    max_queued: int = Field(default=100, ge=1, description="Default per-key limit of queued or running jobs.")
    images_per_day: int = Field(default=100_000, ge=1, description="Default per-key images per UTC day.")
    max_priority: Priority = Field(
        default="normal",
        description="Default highest priority a key may ask for; `high` only for keys granted it (genq keys create).",
    )
    train_images_per_day: int = Field(
        default=2_000_000,
        ge=1,
        description="Default per-key training images (steps x batch size of its fine-tunes) per UTC day.",
    )
    max_finetunes: int = Field(default=2, ge=1, description="Default per-key fine-tunes queued or running at once.")
    events_poll_s: float = Field(default=0.5, gt=0, description="How often an SSE stream re-reads its job.")
    max_streams: int = Field(default=10, ge=1, description="Event streams (SSE) one key may hold open at once.")
    ready_timeout_s: float = Field(default=2.0, gt=0, description="Timeout of each readiness probe (Redis, S3).")


class ClientSettings(GenqSettings):
    """What a producer process needs: the shared groups and the HTTP API's."""

    api: ApiSettings = Field(default_factory=ApiSettings)
