"""Each tenant's own webhook signing secret, so a tenant that can verify its callbacks cannot forge another's.

A tenant's secret (Standard Webhooks ``whsec_`` format) is made with its first API key and shown once; rotating it
keeps the old one valid for an overlap, during which every callback carries both signatures (``webhook-signature``
holds several space-separated ``v1,<sig>`` entries by the spec, and receivers accept any match), so a receiver can
switch secrets without losing a callback. Jobs without a tenant (an operator's own client, the CLI) are signed with
the deployment's secret, ``GENQ_WEBHOOK__SECRET``.

Redis holds the secrets themselves (``genq:tenant:<tenant>:webhook``), since workers must sign with them: whoever
reads Redis can sign as any tenant, as with the deployment secret.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

import redis

from producer.core import constants
from producer.core.callbacks.signing import generate_secret
from producer.core.clock import utcnow

DEFAULT_OVERLAP = timedelta(hours=24)  # long enough for a receiver's deploy; the old secret signs alongside till then


@dataclass(frozen=True)
class TenantSecret:
    """A tenant's current secret, and the one it replaced while that still signs too."""

    current: str
    previous: str | None = None
    previous_until: datetime | None = None

    def signing(self, now: datetime) -> list[str]:
        """The secrets a callback is signed with at ``now``: the current one, and the previous during the overlap."""
        if self.previous is not None and self.previous_until is not None and now < self.previous_until:
            return [self.current, self.previous]
        return [self.current]

    def to_json(self) -> str:
        return json.dumps(
            {
                "current": self.current,
                "previous": self.previous,
                "previous_until": self.previous_until.isoformat() if self.previous_until else None,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> TenantSecret:
        data = json.loads(raw)
        until = data.get("previous_until")
        return cls(data["current"], data.get("previous"), datetime.fromisoformat(until) if until else None)


class TenantSecrets:
    """Issue, rotate and look up tenants' webhook secrets in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def ensure(self, tenant: str) -> str | None:
        """Give ``tenant`` a secret if it has none; returns the new secret (to show once), or None if it had one."""
        secret = generate_secret()
        created = self.redis.set(self._key(tenant), TenantSecret(secret).to_json(), nx=True)
        return secret if created else None

    def rotate(self, tenant: str, overlap: timedelta = DEFAULT_OVERLAP) -> TenantSecret:
        """A new current secret for ``tenant``; the old one keeps signing for ``overlap``. Returns the new state."""
        key = self._key(tenant)
        while True:  # WATCH: two rotations at once must not both keep the same "previous"
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    old = TenantSecret.from_json(raw) if raw is not None else None
                    new = TenantSecret(
                        generate_secret(),
                        previous=old.current if old else None,
                        previous_until=utcnow() + overlap if old else None,
                    )
                    pipe.multi()
                    pipe.set(key, new.to_json())
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue

    def get(self, tenant: str) -> TenantSecret | None:
        """``tenant``'s secrets, or None if it has never been given one (keys made before tenants had secrets)."""
        raw = self.redis.get(self._key(tenant))
        return TenantSecret.from_json(raw) if raw is not None else None

    @staticmethod
    def _key(tenant: str) -> str:
        return constants.TENANT_WEBHOOK_SECRET_KEY.format(tenant=tenant)
