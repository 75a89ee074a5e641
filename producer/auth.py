"""API keys: ``genq_<random>`` secrets bound to a tenant, stored in Redis only as their sha256.

A key is shown once, when it is created (``genq keys create``); Redis holds ``genq:apikey:<sha256>`` ->
:class:`ApiKey` JSON, so a leaked Redis dump reveals no usable key. Light: no FastAPI here, the CLI uses it too.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

import redis
from pydantic import BaseModel, Field, ValidationError

from producer import constants
from producer.contract import TENANT_PATTERN
from producer.errors import Unauthorized
from producer.status import utcnow

SECRET_PREFIX = "genq_"
_MAX_SECRET_CHARS = 128  # a genq key is 48 characters; anything much longer is not one of ours


class KeyQuotas(BaseModel):
    """Per-key limits; None means the deployment's default (``GENQ_API__MAX_QUEUED``, ``GENQ_API__IMAGES_PER_DAY``)."""

    max_queued: int | None = Field(default=None, ge=1, description="Jobs queued or running at once.")
    images_per_day: int | None = Field(default=None, ge=1, description="Images submitted per UTC day.")


class ApiKey(BaseModel):
    """What Redis holds for one key (never the key itself)."""

    tenant: str = Field(pattern=TENANT_PATTERN)
    name: str = Field(default="", max_length=200)
    created_at: datetime
    quotas: KeyQuotas = Field(default_factory=KeyQuotas)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the key's id (its sha256, safe to log and to use in Redis keys) and its record."""

    key_id: str
    key: ApiKey

    @property
    def tenant(self) -> str:
        return self.key.tenant


def key_id(secret: str) -> str:
    """The id a secret key is stored under: its sha256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """Create and look up API keys in Redis."""

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
            if self.redis.set(constants.API_KEY.format(key_id=key_id(secret)), record.model_dump_json(), nx=True):
                return secret, record

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
            return Principal(key_id=kid, key=ApiKey.model_validate_json(raw))
        except ValidationError as exc:  # a hand-edited record; refuse rather than guess a tenant
            raise Unauthorized(f"API key record is unreadable ({exc.error_count()} errors); issue a new key") from exc
