"""Per-key quotas and the request rate limit, kept in Redis so every API process enforces the same numbers.

Three limits, each checked and taken atomically by one Lua script:

- **rate**: a token bucket per key (``GENQ_API__RATE_PER_S`` refill, ``GENQ_API__BURST`` size), clocked by Redis
  ``TIME`` so API processes with skewed clocks agree;
- **images per day**: a counter per key and UTC day (``INCRBY`` + ``EXPIRE``), given back if the submit fails;
- **queued jobs**: a sorted set of the key's jobs that are still queued or running. Members are pruned when their
  job record says terminal (or is gone), so the count heals itself without workers knowing about keys.

The scripts read job records by key name (``genq:job:<id>``) they are not handed in ``KEYS``: fine on one Redis,
not on Redis Cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis

from producer.api.auth import Principal
from producer.core import constants
from producer.core.scripts import read_lua
from producer.errors import QuotaExceeded
from producer.settings import ApiSettings

# Each script's header names its KEYS, ARGV and what it returns.
_TAKE_TOKEN = read_lua(__package__, "take_token.lua")
_TAKE_IMAGES = read_lua(__package__, "take_images.lua")
_TAKE_SLOT = read_lua(__package__, "take_slot.lua")

_IN_FLIGHT_GRACE_S = 60  # a submit takes milliseconds; a slot with no job record after this was abandoned
_QUEUED_RETRY_AFTER_S = 5  # when a slot frees depends on the workers; ask the caller to look again soon


@dataclass(frozen=True)
class Reservation:
    """Quota taken for one job; hand it back with :meth:`Quotas.refund` if the job is not submitted after all."""

    key_id: str
    job_id: str
    images: int
    day: str


class Quotas:
    """Check and take per-key quotas and the request rate limit."""

    def __init__(self, client: redis.Redis, settings: ApiSettings, job_ttl_s: int) -> None:
        self.redis = client
        self.settings = settings
        self.job_ttl_s = job_ttl_s
        self._take_token = client.register_script(_TAKE_TOKEN)
        self._take_images = client.register_script(_TAKE_IMAGES)
        self._take_slot = client.register_script(_TAKE_SLOT)

    def take_request(self, principal: Principal) -> None:
        """Count one request against the key's rate limit. Raises QuotaExceeded (limit ``rate``)."""
        bucket = constants.API_KEY_BUCKET_KEY.format(key_id=principal.key_id)
        wait = float(self._take_token(keys=[bucket], args=[self.settings.rate_per_s, self.settings.burst]))
        if wait > 0:
            raise QuotaExceeded(
                f"rate limit: {self.settings.rate_per_s:g} requests/s with bursts of {self.settings.burst} "
                "(GENQ_API__RATE_PER_S, GENQ_API__BURST); slow down",
                limit="rate",
                retry_after_s=wait,
            )

    def reserve(self, principal: Principal, job_id: str, images: int, now: datetime | None = None) -> Reservation:
        """Take ``images`` from today's allowance and one queued-job slot for ``job_id``.

        Raises:
            QuotaExceeded: ``images_per_day`` or ``max_queued`` is used up (nothing is taken).
        """
        now = now or datetime.now(UTC)
        day = now.strftime("%Y%m%d")
        per_day = principal.key.quotas.images_per_day or self.settings.images_per_day
        max_queued = principal.key.quotas.max_queued or self.settings.max_queued
        counter = constants.API_KEY_IMAGES_KEY.format(key_id=principal.key_id, day=day)
        total = int(self._take_images(keys=[counter], args=[images, per_day, 2 * 24 * 3600]))
        if total < 0:
            used = -total - images
            midnight = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
            raise QuotaExceeded(
                f"images per day: this job needs {images} images and {max(0, per_day - used)} of the key's "
                f"{per_day} are left today (UTC); the allowance resets at midnight UTC",
                limit="images_per_day",
                retry_after_s=(midnight - now).total_seconds(),
            )
        active = constants.API_KEY_ACTIVE_KEY.format(key_id=principal.key_id)
        prefix = constants.JOB_KEY.format(job_id="")  # the script reads genq:job:<id> of each active job
        args: list[str | int | float] = [
            prefix,
            max_queued,
            job_id,
            now.timestamp(),
            _IN_FLIGHT_GRACE_S,
            self.job_ttl_s,
        ]
        queued = int(self._take_slot(keys=[active], args=args))
        if queued < 0:
            self.redis.decrby(counter, images)
            raise QuotaExceeded(
                f"max queued jobs: the key has {-queued} jobs queued or running, its limit is {max_queued}; "
                "wait for some to finish",
                limit="max_queued",
                retry_after_s=_QUEUED_RETRY_AFTER_S,
            )
        return Reservation(key_id=principal.key_id, job_id=job_id, images=images, day=day)

    def refund(self, reservation: Reservation) -> None:
        """Give back what :meth:`reserve` took (the job was not submitted)."""
        counter = constants.API_KEY_IMAGES_KEY.format(key_id=reservation.key_id, day=reservation.day)
        pipe = self.redis.pipeline()
        pipe.decrby(counter, reservation.images)
        pipe.zrem(constants.API_KEY_ACTIVE_KEY.format(key_id=reservation.key_id), reservation.job_id)
        pipe.execute()


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` in whole seconds, at least 1 (0 would invite an immediate, equally refused retry)."""
    return str(max(1, math.ceil(seconds)))
