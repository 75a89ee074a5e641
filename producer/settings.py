"""Settings shared by clients and workers, read from ``GENQ_*`` variables (nested groups with ``__``).

S3 endpoint and credentials are *not* here: boto3 reads the standard ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION`` itself.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_WEBHOOK_SECRET = "whsec_ZGV2LW9ubHktc2VjcmV0LWRvLW5vdC11c2U="  # base64("dev-only-secret-do-not-use")


class RedisSettings(BaseModel):
    """Broker and status store. No URL means embedded mode: the CLI runs jobs in-process."""

    url: str | None = Field(default=None, description="e.g. redis://127.0.0.1:6379/0")


class S3Settings(BaseModel):
    """Where outputs live."""

    bucket: str = "genq"
    presign_expires_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)


class Limits(BaseModel):
    """Per-request limits, enforced before anything is enqueued."""

    max_images_per_job: int = Field(default=10_000, ge=1)
    max_metadata_bytes: int = Field(default=4096, ge=0)


class WebhookSettings(BaseModel):
    """Signing and delivery of callbacks (Standard Webhooks v1)."""

    secret: str = DEV_WEBHOOK_SECRET
    timeout_s: float = Field(default=10.0, gt=0)


class ApiSettings(BaseModel):
    """The HTTP API (``genq api``): where it listens, what it accepts, and the per-key defaults it enforces."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, description="Larger request bodies get 413 unread.")
    rate_per_s: float = Field(default=10.0, gt=0, description="Requests per second per key (token bucket refill).")
    burst: int = Field(default=20, ge=1, description="Requests a key may make at once (token bucket size).")
    max_queued: int = Field(default=100, ge=1, description="Default per-key limit of queued or running jobs.")
    images_per_day: int = Field(default=100_000, ge=1, description="Default per-key images per UTC day.")
    events_poll_s: float = Field(default=0.5, gt=0, description="How often an SSE stream re-reads its job.")
    ready_timeout_s: float = Field(default=2.0, gt=0, description="Timeout of each readiness probe (Redis, S3).")


class ClientSettings(BaseSettings):
    """What a producer process needs: where Redis and S3 are, and the limits it enforces."""

    model_config = SettingsConfigDict(env_prefix="GENQ_", env_nested_delimiter="__", extra="ignore")

    env: Literal["dev", "prod"] = "dev"
    redis: RedisSettings = Field(default_factory=RedisSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    limits: Limits = Field(default_factory=Limits)
    api: ApiSettings = Field(default_factory=ApiSettings)
    job_ttl_s: int = Field(default=7 * 24 * 3600, ge=60, description="How long job records live in Redis.")
    shard_size: int = Field(
        default=1000, ge=1, description="Bulk jobs are split into tasks of this many images, shared by workers."
    )
