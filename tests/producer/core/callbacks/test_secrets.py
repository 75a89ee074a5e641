"""Tenants' own webhook secrets: issued once, rotated with an overlap in which both sign; real Redis."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redis

from producer.core.callbacks.secrets import TenantSecrets
from producer.core.callbacks.signing import signed_headers
from producer.webhooks import WebhookVerificationError, verify

BODY = b'{"type":"succeeded"}'


def test_a_tenant_gets_one_secret_and_it_is_shown_only_when_made(redis_client: redis.Redis) -> None:
    secrets = TenantSecrets(redis_client)
    first = secrets.ensure("acme")
    assert first is not None and first.startswith("whsec_")
    assert secrets.ensure("acme") is None  # a second key of the tenant shows nothing
    other = secrets.ensure("globex")
    assert other is not None and other != first
    state = secrets.get("acme")
    assert state is not None and state.current == first


def test_rotation_signs_with_both_secrets_for_the_overlap_then_only_the_new(redis_client: redis.Redis) -> None:
    secrets = TenantSecrets(redis_client)
    old = secrets.ensure("acme")
    assert old is not None
    rotated = secrets.rotate("acme", timedelta(hours=1))
    assert rotated.current != old and rotated.previous == old and rotated.previous_until is not None

    during = rotated.signing(rotated.previous_until - timedelta(minutes=1))
    headers = signed_headers(during, "msg_1", BODY)
    assert len(headers["webhook-signature"].split()) == 2
    verify(old, headers, BODY)  # a receiver not yet switched accepts it
    verify(rotated.current, headers, BODY)  # and so does one that switched

    after = rotated.signing(rotated.previous_until + timedelta(seconds=1))
    assert after == [rotated.current]
    with pytest.raises(WebhookVerificationError):
        verify(old, signed_headers(after, "msg_2", BODY), BODY)


def test_one_tenants_secret_never_verifies_another_tenants_callbacks(redis_client: redis.Redis) -> None:
    secrets = TenantSecrets(redis_client)
    acme, globex = secrets.ensure("acme"), secrets.ensure("globex")
    assert acme is not None and globex is not None
    forged = signed_headers(globex, "msg_3", BODY)  # globex signs a "succeeded" for acme's receiver
    with pytest.raises(WebhookVerificationError):
        verify(acme, forged, BODY)


def test_signing_with_no_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="no webhook secret"):
        signed_headers([], "msg_4", BODY)
