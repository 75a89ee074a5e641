"""Standard Webhooks v1 signing and verification, for genq's workers and for the integrators receiving callbacks.

Standard library only (no torch, Celery, pydantic or httpx), so a receiver can import it on its own::

    from producer.webhooks import WebhookVerificationError, verify

    try:
        verify(secret, request.headers, raw_body)  # the bytes as received, before any JSON parsing
    except WebhookVerificationError:
        return 400

Every POST carries three headers (https://www.standardwebhooks.com/):

- ``webhook-id``: the message id, the same on every retry of one event (use it to drop duplicates);
- ``webhook-timestamp``: Unix seconds when this attempt was signed;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, several entries separated by
  spaces while a secret is being rotated.

The secret is ``whsec_`` followed by the base64 key; the HMAC key is the decoded bytes, not the text.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping, Sequence
from enum import Enum

from producer.errors import GenqError

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300  # the spec's ±5 minutes: wide enough for clock skew, narrow enough to limit replays

HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"


class WebhookVerificationError(GenqError):
    """A callback failed verification (missing header, stale timestamp, no matching signature): reject it."""


def generate_secret() -> str:
    """A new signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def decode_secret(secret: str) -> bytes:
    """The HMAC key inside a ``whsec_`` secret.

    Args:
        secret: ``whsec_<base64>``; the bare base64 is accepted too, as the reference libraries do.

    Returns:
        The decoded key bytes.

    Raises:
        ValueError: the secret is empty or not valid base64 (the message never echoes the secret).
    """
    # Surrounding whitespace is a copy-paste or secret-file artefact, never part of the key.
    encoded = secret.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"malformed webhook secret ({len(secret)} characters): expected {SECRET_PREFIX!r} followed by "
            "standard base64 with padding; make one with producer.core.callbacks.signing.generate_secret()"
        ) from None
    if not key:
        raise ValueError(f"empty webhook secret: expected {SECRET_PREFIX!r} followed by a base64 key")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` entry for one message.

    Args:
        secret: the ``whsec_`` signing secret.
        msg_id: the ``webhook-id`` header value.
        timestamp: the ``webhook-timestamp`` header value, Unix seconds.
        body: the exact bytes sent as the request body.

    Returns:
        ``v1,<base64 HMAC-SHA256 of f"{msg_id}.{timestamp}.".encode() + body>``.

    Raises:
        ValueError: the secret is malformed.
    """
    keyed = _keyed(secret).copy()
    keyed.update(f"{msg_id}.{timestamp}.".encode())
    keyed.update(body)
    return f"{SIGNATURE_VERSION},{base64.b64encode(keyed.digest()).decode('ascii')}"


@functools.lru_cache(maxsize=64)
def _keyed(secret: str) -> hmac.HMAC:
    # The secret decoded and its HMAC key schedule made once per secret, not per event; each signature works on a
    # copy. A malformed secret raises here every time (lru_cache keeps no exception).
    return hmac.new(decode_secret(secret), digestmod=hashlib.sha256)


def signed_headers(secret: str | Sequence[str], msg_id: str, body: bytes, now: int | None = None) -> dict[str, str]:
    """The headers for POSTing ``body``: id, timestamp (``now``, default the current time), signature, JSON type.

    Several secrets (a rotation's overlap) give several space-separated signatures; a receiver accepts any match.

    Raises:
        ValueError: the secret is malformed.
    """
    timestamp = int(time.time()) if now is None else now
    signing = [secret] if isinstance(secret, str) else list(secret)
    if not signing:
        raise ValueError("no webhook secret to sign with")
    return {
        HEADER_ID: msg_id,
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_SIGNATURE: " ".join(sign(s, msg_id, timestamp, body) for s in signing),
        "content-type": "application/json",
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: int | None = None,
) -> None:
    """Check that ``body`` was signed with ``secret`` and recently; return quietly when it was.

    Args:
        secret: the ``whsec_`` secret shared with genq.
        headers: the request headers; names are matched case-insensitively.
        body: the raw request body, byte for byte as received.
        tolerance_s: how far the signed timestamp may be from ``now``, either way.
        now: the current Unix time (default: the clock), for tests.

    Raises:
        WebhookVerificationError: a header is missing, the timestamp is not an integer or is more than
            ``tolerance_s`` in the past or future, or no ``v1`` entry of the signature header matches.
        ValueError: the secret itself is malformed (a configuration error on the receiver's side).
    """
    key = decode_secret(secret)
    lowered = {name.lower(): value for name, value in headers.items()}
    missing = [name for name in (HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE) if not lowered.get(name)]
    if missing:
        raise WebhookVerificationError(f"missing webhook header(s): {', '.join(missing)}")
    msg_id, raw_timestamp, signatures = lowered[HEADER_ID], lowered[HEADER_TIMESTAMP], lowered[HEADER_SIGNATURE]

    if not (raw_timestamp.isascii() and raw_timestamp.isdigit()):
        raise WebhookVerificationError(f"{HEADER_TIMESTAMP} must be Unix seconds, got {raw_timestamp[:32]!r}")
    current = int(time.time()) if now is None else now
    skew = int(raw_timestamp) - current
    if skew < -tolerance_s:
        raise WebhookVerificationError(
            f"{HEADER_TIMESTAMP} is {-skew} s old (tolerance {tolerance_s} s): a replay, or a clock out of sync"
        )
    if skew > tolerance_s:
        raise WebhookVerificationError(
            f"{HEADER_TIMESTAMP} is {skew} s in the future (tolerance {tolerance_s} s): check the clocks"
        )

    # Recompute over the timestamp text exactly as received: that is what the sender signed.
    expected = _signature(key, msg_id, raw_timestamp, body).encode("ascii")
    for entry in signatures.split():
        version, _, candidate = entry.partition(",")
        # Non-ASCII text would make compare_digest raise TypeError; as bytes it simply fails to match.
        if version == SIGNATURE_VERSION and hmac.compare_digest(candidate.encode("utf-8", "replace"), expected):
            return
    raise WebhookVerificationError(
        f"no {SIGNATURE_VERSION} signature in {HEADER_SIGNATURE} matches: wrong secret, or the body, id or "
        "timestamp was changed (verify the raw bytes, before any JSON parsing)"
    )


def msg_id_for(job_id: str, event: str | Enum, seq: int) -> str:
    """The ``webhook-id`` of one event of one job: ``msg_`` + 32 hex characters.

    Deterministic, so every retry of the event carries the same id and a receiver can drop duplicates; distinct
    for distinct (job, event, sequence number). Hashed rather than spelled out so that any job id gives a short,
    header-safe value.

    Args:
        job_id: the job's id.
        event: the event type (an ``EventType`` or its value, e.g. ``"succeeded"``).
        seq: the event's sequence number within the job (0, 1, ...).

    Raises:
        ValueError: ``seq`` is negative.
    """
    if seq < 0:
        raise ValueError(f"event sequence number must be >= 0, got {seq}")
    event_name = event.value if isinstance(event, Enum) else event
    digest = hashlib.sha256(f"{job_id}\x00{event_name}\x00{seq}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def _signature(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
