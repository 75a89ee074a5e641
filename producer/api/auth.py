"""API keys: ``genq_<random>`` secrets bound to a tenant, stored in Redis only as their sha256.

A key is shown once, when it is created (``genq keys create``); Redis holds ``genq:apikey:<sha256>`` ->
:class:`ApiKey` JSON, so a leaked Redis dump reveals no usable key, and the set ``genq:apikeys`` of every id, so
``genq keys list`` never scans the keyspace. A revoked key keeps its record, marked ``revoked_at``, and is refused
from the next request on. Light: no FastAPI here, the CLI uses it too.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import redis
from pydantic import BaseModel, Field, ValidationError

from producer.contract import TENANT_PATTERN, Priority
from producer.core import constants
from producer.core.clock import utcnow
from producer.core.records import as_text
from producer.errors import KeyNotFound, Unauthorized

log = logging.getLogger("genq.auth")

SECRET_PREFIX = "genq_"
_MAX_SECRET_CHARS = 128  # a genq key is 48 characters; anything much longer is not one of ours
SHORT_ID_CHARS = 12  # how much of a key id `genq keys list` shows; enough to tell keys apart
MIN_PREFIX_CHARS = 6  # `genq keys revoke` wants at least this much of an id: one typo must not revoke a stranger


class KeyQuotas(BaseModel):
    """Per-key limits; None means the deployment's default (``GENQ_API__MAX_QUEUED``, ``GENQ_API__IMAGES_PER_DAY``)."""

    max_queued: int | None = Field(default=None, ge=1, description="Jobs queued or running at once.")
    images_per_day: int | None = Field(default=None, ge=1, description="Images submitted per UTC day.")
    max_priority: Priority | None = Field(default=None, description="The highest priority its jobs may ask for.")
    train_images_per_day: int | None = Field(
        default=None, ge=1, description="Training images (steps x batch size) of fine-tunes submitted per UTC day."
    )
    max_finetunes: int | None = Field(default=None, ge=1, description="Fine-tunes queued or running at once.")
    dataset_bytes: int | None = Field(default=None, ge=1, description="Bytes of uploaded data sets stored at once.")
    provenance: Literal["c2pa"] | None = Field(
        default=None,
        description=(
            "c2pa: every job of the key carries signed Content Credentials (a request that omits provenance gets "
            "c2pa; one that asks for xmp is refused). None: each request chooses (default xmp)."
        ),
    )


class ApiKey(BaseModel):
    """What Redis holds for one key (never the key itself)."""

    tenant: str = Field(pattern=TENANT_PATTERN)
    name: str = Field(default="", max_length=200)
    created_at: datetime
    quotas: KeyQuotas = Field(default_factory=KeyQuotas)
    revoked_at: datetime | None = Field(default=None, description="When the key was revoked; refused since.")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the key's id (its sha256, safe to log and to use in Redis keys) and its record."""

    key_id: str
    key: ApiKey

    @property
    def tenant(self) -> str:
        return self.key.tenant


@dataclass(frozen=True)
class StoredKey:
    """One key as ``genq keys list`` shows it: its id (the sha256 of the secret, never the secret) and record."""

    key_id: str
    key: ApiKey

    @property
    def short_id(self) -> str:
        return self.key_id[:SHORT_ID_CHARS]


def key_id(secret: str) -> str:
    """The id a secret key is stored under: its sha256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """Create, look up, list and revoke API keys in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def create(self, tenant: str, name: str = "", quotas: KeyQuotas | None = None) -> tuple[str, ApiKey]:
        """Make a new key for ``tenant``; returns (the secret, shown only now, and its record).

        Raises:
            pydantic.ValidationError: the tenant name is not ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``.
        """
        record = ApiKey(tenant=tenant, name=name, created_at=utcnow(), quotas=quotas or KeyQuotas())
        while True:
            secret = SECRET_PREFIX + secrets.token_urlsafe(32)
            kid = key_id(secret)
            pipe = self.redis.pipeline()  # MULTI/EXEC: a key is never stored without its index entry
            pipe.set(constants.API_KEY.format(key_id=kid), record.model_dump_json(), nx=True)
            pipe.sadd(constants.API_KEYS_INDEX_KEY, kid)
            stored, _ = pipe.execute()
            if stored:  # else a 256-bit collision: the index already held that id, so the SADD changed nothing
                return secret, record

    def list(self, tenant: str | None = None) -> list[StoredKey]:
        """Every key (revoked ones too), oldest first; only ``tenant``'s when given."""
        ids = sorted(as_text(kid) for kid in self.redis.smembers(constants.API_KEYS_INDEX_KEY))
        records = self.redis.mget([constants.API_KEY.format(key_id=kid) for kid in ids]) if ids else []
        keys: list[StoredKey] = []
        for kid, raw in zip(ids, records, strict=True):
            if raw is None:  # deleted by hand; nothing to show
                continue
            try:
                record = ApiKey.model_validate_json(raw)
            except ValidationError as exc:  # authenticate() refuses it too; say so instead of failing the listing
                log.warning("API key %s has an unreadable record (%d errors)", kid[:SHORT_ID_CHARS], exc.error_count())
                continue
            if tenant is None or record.tenant == tenant:
                keys.append(StoredKey(kid, record))
        return sorted(keys, key=lambda k: (k.key.created_at, k.key_id))

    def find(self, prefix: str) -> StoredKey:
        """The one key whose id starts with ``prefix`` (``genq keys list`` shows the first 12 characters).

        Raises:
            ValueError: the prefix is not hex, or shorter than 6 characters.
            KeyNotFound: no key id starts with it, or more than one does (the message lists them).
        """
        prefix = prefix.strip().lower()
        if not re.fullmatch(rf"[0-9a-f]{{{MIN_PREFIX_CHARS},64}}", prefix):
            raise ValueError(
                f"{prefix!r} is not a key id: give at least {MIN_PREFIX_CHARS} hex characters of it "
                "(the first column of `genq keys list`)"
            )
        matches = [k for k in self.list() if k.key_id.startswith(prefix)]
        if not matches:
            raise KeyNotFound(f"no API key id starts with {prefix!r} (see `genq keys list`)")
        if len(matches) > 1:
            named = ", ".join(f"{k.short_id} ({k.key.tenant}, {k.key.name!r})" for k in matches)
            raise KeyNotFound(f"{len(matches)} API key ids start with {prefix!r}: {named}; give more of the id")
        return matches[0]

    def revoke(self, prefix: str) -> tuple[StoredKey, bool]:
        """Revoke the key whose id starts with ``prefix``: every request with it is refused (401) from now on.

        The record stays, marked ``revoked_at``, so listings still show the key. Revoking a revoked key changes
        nothing.

        Returns:
            The key as now stored, and whether this call revoked it (False: it already was).

        Raises:
            ValueError, KeyNotFound: as :meth:`find`.
        """
        found = self.find(prefix)
        if found.key.revoked_at is not None:
            return found, False
        record = found.key.model_copy(update={"revoked_at": utcnow()})
        # XX: never recreate a record deleted meanwhile; a concurrent revoke writes the same thing give or take a ms.
        self.redis.set(constants.API_KEY.format(key_id=found.key_id), record.model_dump_json(), xx=True)
        return StoredKey(found.key_id, record), True

    def authenticate(self, secret: str | None) -> Principal:
        """The principal a bearer secret belongs to.

        Raises:
            Unauthorized: no secret, or one that is not a known genq key.
        """
        if not secret:
            raise Unauthorized("missing API key: send the header 'Authorization: Bearer genq_...'")
        if not secret.startswith(SECRET_PREFIX) or len(secret) > _MAX_SECRET_CHARS:
            raise Unauthorized("unknown API key: genq keys start with 'genq_' (create one with `genq keys create`)")
        kid = key_id(secret)
        raw = self.redis.get(constants.API_KEY.format(key_id=kid))
        if raw is None:
            raise Unauthorized("unknown API key (revoked, or never issued by this deployment)")
        try:
            record = ApiKey.model_validate_json(raw)
        except ValidationError as exc:  # a hand-edited record; refuse rather than guess a tenant
            raise Unauthorized(f"API key record is unreadable ({exc.error_count()} errors); issue a new key") from exc
        if record.revoked_at is not None:
            when = record.revoked_at.isoformat(timespec="seconds")
            raise Unauthorized(f"API key revoked at {when}; ask the operator for a new one (`genq keys create`)")
        return Principal(key_id=kid, key=record)
