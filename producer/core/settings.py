"""The settings base both sides share, read from ``GENQ_*`` variables (nested groups with ``__``): where Redis and S3
are, request limits, callbacks, record lifetimes. :class:`producer.settings.ClientSettings` and
:class:`worker.settings.WorkerSettings` extend :class:`GenqSettings`.

S3 endpoint and credentials are *not* here: boto3 reads the standard ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION`` itself.
"""

from __future__ import annotations

import ipaddress
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.core.callbacks.signing import SECRET_PREFIX, decode_secret
from producer.core.callbacks.ssrf import AllowList
from producer.errors import ConfigurationError

DEV_WEBHOOK_SECRET = "whsec_ZGV2LW9ubHktc2VjcmV0LWRvLW5vdC11c2U="  # base64("dev-only-secret-do-not-use")


class RedisSettings(BaseModel):
    """Broker and status store. No URL means embedded mode: the CLI runs jobs in-process."""

    url: str | None = Field(default=None, description="e.g. redis://127.0.0.1:6379/0")


class S3Settings(BaseModel):
    """Where outputs live, and the URLs that reach them."""

    bucket: str = "genq"
    presign_expires_s: int = Field(
        default=3600,
        ge=1,
        le=7 * 24 * 3600,  # SigV4's limit
        description="Lifetime of presigned output URLs (job views, the API's redirects, Client.with_urls).",
    )
    public_base_url: str | None = Field(
        default=None,
        description=(
            "Where a CDN or a public bucket serves the bucket's objects (https://cdn.example.com): output URLs are "
            "then <base>/<key>, unsigned, instead of presigned."
        ),
    )

    create_bucket: bool | None = Field(
        default=None,
        description=(
            "Workers create the bucket at start when it is missing. Unset: yes when the S3 endpoint is on loopback "
            "(a local MinIO or moto), no for AWS S3 and any other endpoint, whose buckets operators make; then a "
            "missing bucket stops the worker at start."
        ),
    )

    def creates_bucket(self, endpoint: str | None) -> bool:
        """Whether a worker creates a missing bucket at start (:attr:`create_bucket`, or its default for ``endpoint``).

        Args:
            endpoint: the S3 endpoint the worker uses (its boto3 client's ``endpoint_url``; None or empty: AWS).
        """
        if self.create_bucket is not None:
            return self.create_bucket
        return is_loopback_url(endpoint or "")

    @field_validator("create_bucket", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        return None if value == "" else value  # a compose file's "GENQ_S3__CREATE_BUCKET=": the default

    @field_validator("public_base_url")
    @classmethod
    def _public_base_url(cls, url: str | None) -> str | None:
        if not url:  # unset, or set empty (a compose file's "GENQ_S3__PUBLIC_BASE_URL=")
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(
                f"{url!r} is not a base URL: give scheme, host and an optional path, e.g. https://cdn.example.com/genq"
            )
        return url.rstrip("/")


class Limits(BaseModel):
    """Per-request limits, enforced before anything is enqueued."""

    max_images_per_job: int = Field(default=10_000, ge=1)
    max_metadata_bytes: int = Field(default=4096, ge=0)
    # 1 gigapixel: 10,000 images at 316 x 316, or 850 samples at 1080 x 1080 + 1080 x 1350. Resizing and encoding
    # large renditions costs far more than sampling a small model, and a job holds its worker for all of it.
    max_output_pixels_per_job: int = Field(
        default=1_000_000_000,
        ge=1,
        description="Pixels a job may write in all: images x the pixels of each (every rendition counted).",
    )


# The Standard Webhooks schedule: at once, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h and 24 h after the
# previous attempt; about three days in all, long enough to outlast a receiver's weekend outage.
STANDARD_RETRY_SCHEDULE_S = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0)


class WebhookSettings(BaseModel):
    """Signing, delivery, retries and allowed destinations of callbacks (Standard Webhooks v1)."""

    secret: str = Field(
        default=DEV_WEBHOOK_SECRET,
        description="Signs callbacks of jobs without a tenant secret: 'whsec_' + base64 (`genq keys webhook-secret`).",
    )
    timeout_s: float = Field(
        default=10.0, gt=0, description="Limit of each phase of a POST: connecting, each write, each read."
    )
    attempt_deadline_s: float = Field(
        default=15.0,
        gt=0,
        description=(
            "Wall-clock limit of one delivery attempt as a whole (connect, TLS, send, the answer), however slowly "
            "the receiver trickles it; then the attempt fails and is retried."
        ),
    )
    max_in_flight_per_host: int = Field(
        default=4,
        ge=1,
        description=(
            "Attempts one worker process makes at once to one receiver host; its other events wait their turn on "
            "the broker, so a hanging receiver holds this many delivery threads at most."
        ),
    )
    concurrency: int = Field(
        default=32,
        ge=1,
        description="Delivery threads of a callbacks worker (started by `genq worker`, or `genq worker -Q callbacks`).",
    )
    retry_schedule_s: list[float] = Field(
        default_factory=lambda: list(STANDARD_RETRY_SCHEDULE_S),
        description="Delay before each attempt of an event, in seconds, after the previous one; the first is 0.",
    )
    jitter: float = Field(
        default=0.1, ge=0, le=1, description="Each retry delay is scaled by a random factor in 1 ± jitter."
    )
    progress_interval_s: float = Field(default=0.5, ge=0, description="At most one progress event per job this often.")
    allow_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts, addresses and networks (CIDR) callbacks may reach although they are not public.",
    )

    @field_validator("secret")
    @classmethod
    def _standard_webhooks_secret(cls, secret: str) -> str:
        # Refused here, when any process starts, rather than by every delivery, in the worker log only. A
        # ConfigurationError, not a ValueError: pydantic's message would quote the value, and it is a secret.
        try:
            decode_secret(secret)
        except ValueError:
            pass
        else:
            if secret.strip().startswith(SECRET_PREFIX):
                return secret.strip()  # a newline from a secret file is no part of the key
        raise ConfigurationError(
            f"GENQ_WEBHOOK__SECRET is not a Standard Webhooks secret ({SECRET_PREFIX!r} followed by base64; the value "
            f"set has {len(secret)} characters): make one with `genq keys webhook-secret`"
        )

    @field_validator("retry_schedule_s")
    @classmethod
    def _schedule(cls, schedule: list[float]) -> list[float]:
        if not schedule or schedule[0] != 0:
            raise ValueError("the retry schedule starts with 0 (the first attempt is made at once), e.g. [0, 5, 300]")
        if any(delay < 0 for delay in schedule):
            raise ValueError("retry delays must be >= 0 seconds")
        return schedule

    @field_validator("allow_hosts")
    @classmethod
    def _allow_list(cls, entries: list[str]) -> list[str]:
        AllowList.parse(entries)  # refuse a malformed entry at start-up, not at the first callback
        return entries


class GenqSettings(BaseSettings):
    """The groups every genq process reads; each process's settings class adds its own."""

    model_config = SettingsConfigDict(env_prefix="GENQ_", env_nested_delimiter="__", extra="ignore")

    env: Literal["dev", "prod"] = "dev"
    redis: RedisSettings = Field(default_factory=RedisSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    limits: Limits = Field(default_factory=Limits)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)  # clients check callback URLs (allow_hosts)
    job_ttl_s: int = Field(default=7 * 24 * 3600, ge=60, description="How long job records live in Redis.")
    shard_size: int = Field(
        default=1000, ge=1, description="Bulk jobs are split into tasks of this many images, shared by workers."
    )


_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def is_loopback_url(url: str) -> bool:
    """Whether ``url``'s host is this machine: ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    host = (urlsplit(url).hostname or "") if "//" in url else ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dev_mode_problem(
    settings: GenqSettings, *, bind_host: str | None = None, s3_endpoint: str | None = None
) -> str | None:
    """Why ``settings`` must not run as they are, or None: development mode (``GENQ_ENV=dev``, which accepts the
    placeholder webhook secret published in this repository) serving beyond this machine or storing in real S3.

    Args:
        bind_host: the address an API process listens on (None: not an API process).
        s3_endpoint: ``AWS_ENDPOINT_URL`` as the process sees it (None or empty: AWS S3 itself).
    """
    if settings.env != "dev":
        return None
    fix = "set GENQ_ENV=prod and a real GENQ_WEBHOOK__SECRET (`genq keys webhook-secret` makes one)"
    if bind_host is not None and bind_host not in _LOOPBACK_HOSTS:
        return f"development mode (GENQ_ENV=dev) listens on loopback only, not {bind_host!r}: {fix}"
    if s3_endpoint is not None:
        host = (urlsplit(s3_endpoint).hostname or "") if s3_endpoint else ""
        if not s3_endpoint or host.endswith(".amazonaws.com"):
            return f"development mode (GENQ_ENV=dev) stores outputs in real S3 ({s3_endpoint or 'AWS'}): {fix}"
    return None
