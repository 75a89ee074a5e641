"""Per-key quotas and the request rate limit, kept in Redis so every API process enforces the same numbers.

The limits, each checked and taken atomically by one Lua script:

- **rate**: a token bucket per key (``GENQ_API__RATE_PER_S`` refill, ``GENQ_API__BURST`` size), clocked by Redis
  ``TIME`` so API processes with skewed clocks agree;
- **images per day**: a counter per key and UTC day (``INCRBY`` + ``EXPIRE``), given back if the submit fails;
- **queued jobs**: a sorted set of the key's jobs that are still queued or running. Members are pruned when their
  job record says terminal (or is gone), so the count heals itself without workers knowing about keys;
- **training**: fine-tunes are metered by what they cost, the images they train on (steps x batch size, per key and
  UTC day, ``GENQ_API__TRAIN_IMAGES_PER_DAY``), and how many run at once (``GENQ_API__MAX_FINETUNES``), a sorted set
  like the queued jobs';
- **data sets**: the bytes of a key's uploads stored at once (``GENQ_API__DATASET_BYTES``), recorded with each
  upload's expiry (``GENQ_API__DATASET_TTL_S``) before it is stored; the API deletes expired uploads and gives their
  bytes back (``producer.api.finetune``);
- **priority**: a key asks for at most its ``max_priority`` (``GENQ_API__MAX_PRIORITY``, ``normal`` by default), so
  one tenant cannot put its bulk work ahead of everyone's by asking for ``high``.

The scripts read job records by key name (``genq:job:<id>``) they are not handed in ``KEYS``: fine on one Redis,
not on Redis Cluster.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

import redis

from producer.api.auth import Principal
from producer.contract import FineTuneJob, GenerateJob, Priority
from producer.core import constants
from producer.core.records import as_text
from producer.core.scripts import read_lua
from producer.errors import InvalidJob, QuotaExceeded
from producer.settings import ApiSettings

# Each script's header names its KEYS, ARGV and what it returns.
_TAKE_TOKEN = read_lua(__package__, "take_token.lua")
_TAKE_IMAGES = read_lua(__package__, "take_images.lua")
_TAKE_SLOT = read_lua(__package__, "take_slot.lua")
_TAKE_DATASET = read_lua(__package__, "take_dataset.lua")
_FORGET_DATASETS = read_lua(__package__, "forget_datasets.lua")

_IN_FLIGHT_GRACE_S = 60  # a submit takes milliseconds; a slot with no job record after this was abandoned
_STREAM_STALE_S = 60.0  # an event stream not kept alive this long was left by an API process that died
_QUEUED_RETRY_AFTER_S = 5  # when a slot frees depends on the workers; ask the caller to look again soon
_DATASETS_KEEP_S = 24 * 3600  # the data set ledger outlives its last upload's expiry by this much, then goes


@dataclass(frozen=True)
class Reservation:
    """Quota taken for one job; hand it back with :meth:`Quotas.refund` if the job is not submitted after all."""

    key_id: str
    job_id: str
    images: int
    day: str
    train_images: int = 0  # a fine-tune's steps x batch size, taken from the day's training allowance


@dataclass(frozen=True)
class StoredDataset:
    """One upload in a key's ledger: its reference, size and when it expires (Unix seconds)."""

    reference: str
    bytes: int
    expires_at: float


@dataclass(frozen=True)
class KeyDatasetMeter:
    """One key's data set quota as a :class:`producer.uploads.DatasetMeter`: what the client's uploads for the key's
    tenant count against (``Client.upload_dataset(..., meter=...)``), the HTTP API's and an operator's alike."""

    quotas: Quotas
    principal: Principal

    @property
    def tenant(self) -> str:
        return self.principal.tenant

    def take(self, reference: str, size: int) -> float:
        return self.quotas.take_dataset(self.principal, reference, size)

    def forget(self, references: list[str]) -> int:
        return self.quotas.forget_datasets(self.principal, references)


_PRIORITY_RANK = {"low": 0, "normal": 1, "high": 2}


class Quotas:
    """Check and take per-key quotas and the request rate limit."""

    def __init__(self, client: redis.Redis, settings: ApiSettings, job_ttl_s: int) -> None:
        self.redis = client
        self.settings = settings
        self.job_ttl_s = job_ttl_s
        self._take_token = client.register_script(_TAKE_TOKEN)
        self._take_images = client.register_script(_TAKE_IMAGES)
        self._take_slot = client.register_script(_TAKE_SLOT)
        self._take_dataset = client.register_script(_TAKE_DATASET)
        self._forget_datasets = client.register_script(_FORGET_DATASETS)

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

    def open_stream(self, principal: Principal) -> str:
        """Hold one of the key's ``max_streams`` event streams; returns its token (pass it to keep/close).

        A stream not kept alive for ``_STREAM_STALE_S`` (its API process died) no longer counts.

        Raises:
            QuotaExceeded: the key holds ``max_streams`` streams already (limit ``max_streams``).
        """
        key = constants.API_KEY_STREAMS_KEY.format(key_id=principal.key_id)
        token = uuid.uuid4().hex
        now = time.time()
        pipe = self.redis.pipeline()  # MULTI/EXEC: prune, add and count in one step
        pipe.zremrangebyscore(key, "-inf", now - _STREAM_STALE_S)
        pipe.zadd(key, {token: now})
        pipe.zcard(key)
        pipe.expire(key, int(_STREAM_STALE_S * 2))
        open_now = int(pipe.execute()[2])
        if open_now > self.settings.max_streams:
            self.redis.zrem(key, token)
            raise QuotaExceeded(
                f"max streams: the key has {open_now - 1} event streams open, its limit is "
                f"{self.settings.max_streams} (GENQ_API__MAX_STREAMS); close one",
                limit="max_streams",
                retry_after_s=_QUEUED_RETRY_AFTER_S,
            )
        return token

    def keep_stream(self, principal: Principal, token: str) -> None:
        """Mark the stream alive (call at least every ``_STREAM_STALE_S`` / 2)."""
        key = constants.API_KEY_STREAMS_KEY.format(key_id=principal.key_id)
        pipe = self.redis.pipeline()
        pipe.zadd(key, {token: time.time()}, xx=True)
        pipe.expire(key, int(_STREAM_STALE_S * 2))
        pipe.execute()

    def close_stream(self, principal: Principal, token: str) -> None:
        """Give the stream's slot back."""
        self.redis.zrem(constants.API_KEY_STREAMS_KEY.format(key_id=principal.key_id), token)

    def take_dataset(self, principal: Principal, reference: str, size: int, now: float | None = None) -> float:
        """Record an upload of ``size`` bytes before it is stored; returns when it expires (Unix seconds).

        Raises:
            QuotaExceeded: the key's data sets would pass its ``dataset_bytes`` (limit ``dataset_bytes``; nothing is
                taken). ``retry_after_s`` is when its oldest upload expires.
        """
        now = time.time() if now is None else now
        limit = principal.key.quotas.dataset_bytes or self.settings.dataset_bytes
        expires_at = now + self.settings.dataset_ttl_s
        keys = self._dataset_keys(principal.key_id)
        args: list[str | int | float] = [
            reference,
            size,
            limit,
            expires_at,
            self.settings.dataset_ttl_s + _DATASETS_KEEP_S,
        ]
        taken, used = (int(v) for v in self._take_dataset(keys=keys, args=args))
        if not taken:
            oldest = self.redis.zrange(keys[0], 0, 0, withscores=True)
            wait = float(oldest[0][1]) - now if oldest else float(self.settings.dataset_ttl_s)
            raise QuotaExceeded(
                f"data set bytes: this upload is {size:,} bytes and {max(0, limit - used):,} of the key's {limit:,} "
                "are left; uploads are deleted, and their bytes given back, "
                f"{self.settings.dataset_ttl_s:,} s after they were made (GENQ_API__DATASET_TTL_S)",
                limit="dataset_bytes",
                retry_after_s=max(1.0, wait),
            )
        return expires_at

    def dataset_meter(self, principal: Principal) -> KeyDatasetMeter:
        """The key's data set quota for the client's uploads (:class:`producer.uploads.DatasetMeter`).

        An operator uploading for a tenant builds it from a key ``genq keys list`` shows:
        ``stored = KeyStore(redis).find("3f2a9c"); quotas.dataset_meter(Principal(stored.key_id, stored.key))``.
        """
        return KeyDatasetMeter(self, principal)

    def expired_datasets(self, principal: Principal, now: float | None = None, limit: int = 1000) -> list[str]:
        """References of the key's uploads past their expiry, oldest first (at most ``limit``)."""
        now = time.time() if now is None else now
        expiries = self._dataset_keys(principal.key_id)[0]
        found = self.redis.zrangebyscore(expiries, "-inf", now, start=0, num=limit)
        return [as_text(cast(bytes, r)) for r in found]

    def forget_datasets(self, principal: Principal, references: list[str]) -> int:
        """Give back the bytes of uploads that are gone (deleted, or never stored); returns the bytes freed."""
        if not references:
            return 0
        return int(self._forget_datasets(keys=self._dataset_keys(principal.key_id), args=references))

    def datasets(self, principal: Principal) -> tuple[list[StoredDataset], int]:
        """The key's uploads, soonest to expire first, and the bytes they take from its quota."""
        expiries, sizes, total = self._dataset_keys(principal.key_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrange(expiries, 0, -1, withscores=True)
        pipe.hgetall(sizes)
        pipe.get(total)
        members, by_reference, used = pipe.execute()
        size_of = {as_text(k): int(v) for k, v in by_reference.items()}
        stored = [StoredDataset(as_text(r), size_of.get(as_text(r), 0), float(at)) for r, at in members]
        return stored, int(used or 0)

    @staticmethod
    def _dataset_keys(key_id: str) -> list[str]:
        return [
            constants.API_KEY_DATASETS_KEY.format(key_id=key_id),
            constants.API_KEY_DATASET_SIZES_KEY.format(key_id=key_id),
            constants.API_KEY_DATASET_BYTES_KEY.format(key_id=key_id),
        ]

    def check_priority(self, principal: Principal, priority: Priority) -> None:
        """Refuse a priority above the key's ``max_priority``.

        Raises:
            InvalidJob: on field ``priority`` (the API answers 422), naming the highest the key may use.
        """
        allowed = principal.key.quotas.max_priority or self.settings.max_priority
        if _PRIORITY_RANK[priority] > _PRIORITY_RANK[allowed]:
            raise InvalidJob(
                f"this API key may ask for priority {allowed!r} at most, not {priority!r} (an operator grants more "
                "with `genq keys create --max-priority high`)",
                field="priority",
            )

    def admit(self, principal: Principal, job: GenerateJob | FineTuneJob, now: datetime | None = None) -> Reservation:
        """Everything a job must pass before it is recorded: its priority, then its quotas (taken here).

        Raises:
            InvalidJob: a priority above the key's (field ``priority``).
            QuotaExceeded: a quota is used up (nothing is taken).
        """
        self.check_priority(principal, job.priority)
        if isinstance(job, FineTuneJob):
            return self.reserve_finetune(principal, job, now)
        return self.reserve(principal, job.job_id, job.total_images, now)

    def reserve(self, principal: Principal, job_id: str, images: int, now: datetime | None = None) -> Reservation:
        """Take ``images`` from today's allowance and one queued-job slot for ``job_id``.

        Raises:
            QuotaExceeded: ``images_per_day`` or ``max_queued`` is used up (nothing is taken).
        """
        now = now or datetime.now(UTC)
        day = now.strftime("%Y%m%d")
        per_day = principal.key.quotas.images_per_day or self.settings.images_per_day
        counter = constants.API_KEY_IMAGES_KEY.format(key_id=principal.key_id, day=day)
        self._take_daily(counter, images, per_day, now, "images_per_day", "images")
        max_queued = principal.key.quotas.max_queued or self.settings.max_queued
        active = constants.API_KEY_ACTIVE_KEY.format(key_id=principal.key_id)
        queued = self._take_a_slot(active, max_queued, job_id, now)
        if queued < 0:
            self.redis.decrby(counter, images)
            raise QuotaExceeded(
                f"max queued jobs: the key has {-queued} jobs queued or running, its limit is {max_queued}; "
                "wait for some to finish",
                limit="max_queued",
                retry_after_s=_QUEUED_RETRY_AFTER_S,
            )
        return Reservation(key_id=principal.key_id, job_id=job_id, images=images, day=day)

    def reserve_finetune(self, principal: Principal, job: FineTuneJob, now: datetime | None = None) -> Reservation:
        """Take a fine-tune's training images (steps x batch size) from today's allowance, a fine-tune slot and a
        queued-job slot.

        Raises:
            QuotaExceeded: ``train_images_per_day``, ``max_finetunes`` or ``max_queued`` is used up (nothing taken).
        """
        now = now or datetime.now(UTC)
        day = now.strftime("%Y%m%d")
        cost = job.steps * job.batch_size
        per_day = principal.key.quotas.train_images_per_day or self.settings.train_images_per_day
        counter = constants.API_KEY_TRAIN_IMAGES_KEY.format(key_id=principal.key_id, day=day)
        self._take_daily(counter, cost, per_day, now, "train_images_per_day", "training images (steps x batch size)")
        max_finetunes = principal.key.quotas.max_finetunes or self.settings.max_finetunes
        running = constants.API_KEY_FINETUNES_KEY.format(key_id=principal.key_id)
        taken = self._take_a_slot(running, max_finetunes, job.job_id, now)
        if taken < 0:
            self.redis.decrby(counter, cost)
            raise QuotaExceeded(
                f"max fine-tunes: the key has {-taken} fine-tunes queued or running, its limit is {max_finetunes}; "
                "wait for one to finish",
                limit="max_finetunes",
                retry_after_s=_QUEUED_RETRY_AFTER_S,
            )
        try:
            queued = self.reserve(principal, job.job_id, 0, now)
        except QuotaExceeded:
            self._give_back(principal.key_id, job.job_id, day, 0, cost)
            raise
        return Reservation(key_id=queued.key_id, job_id=job.job_id, images=0, day=day, train_images=cost)

    def refund(self, reservation: Reservation) -> None:
        """Give back what :meth:`reserve` or :meth:`reserve_finetune` took (the job was not submitted)."""
        self._give_back(
            reservation.key_id, reservation.job_id, reservation.day, reservation.images, reservation.train_images
        )

    def _give_back(self, key_id: str, job_id: str, day: str, images: int, train_images: int) -> None:
        pipe = self.redis.pipeline()
        pipe.decrby(constants.API_KEY_IMAGES_KEY.format(key_id=key_id, day=day), images)
        pipe.zrem(constants.API_KEY_ACTIVE_KEY.format(key_id=key_id), job_id)
        if train_images:
            pipe.decrby(constants.API_KEY_TRAIN_IMAGES_KEY.format(key_id=key_id, day=day), train_images)
            pipe.zrem(constants.API_KEY_FINETUNES_KEY.format(key_id=key_id), job_id)
        pipe.execute()

    def _take_daily(self, counter: str, amount: int, per_day: int, now: datetime, limit: str, what: str) -> None:
        total = int(self._take_images(keys=[counter], args=[amount, per_day, 2 * 24 * 3600]))
        if total < 0:
            used = -total - amount
            midnight = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
            raise QuotaExceeded(
                f"{limit.replace('_', ' ')}: this job needs {amount:,} {what} and {max(0, per_day - used):,} of the "
                f"key's {per_day:,} are left today (UTC); the allowance resets at midnight UTC",
                limit=limit,
                retry_after_s=(midnight - now).total_seconds(),
            )

    def _take_a_slot(self, members: str, limit: int, job_id: str, now: datetime) -> int:
        prefix = constants.JOB_KEY.format(job_id="")  # the script reads genq:job:<id> of each member
        args: list[str | int | float] = [prefix, limit, job_id, now.timestamp(), _IN_FLIGHT_GRACE_S, self.job_ttl_s]
        return int(self._take_slot(keys=[members], args=args))


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` in whole seconds, at least 1 (0 would invite an immediate, equally refused retry)."""
    return str(max(1, math.ceil(seconds)))
