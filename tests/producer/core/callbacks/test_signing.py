"""Standard Webhooks v1 signing and verification: pure, no services."""

from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess
import sys

import pytest

from producer.contract import EventType
from producer.core.callbacks.signing import (
    WebhookVerificationError,
    decode_secret,
    generate_secret,
    msg_id_for,
    sign,
    signed_headers,
    verify,
)
from producer.core.settings import DEV_WEBHOOK_SECRET
from producer.errors import GenqError

# The reference vector of the Standard Webhooks test suite (libraries/python/tests/test_webhooks.py,
# test_sign_function, in github.com/standard-webhooks/standard-webhooks).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

NOW = 1_700_000_000
BODY = b'{"type":"succeeded","data":{"id":"job_12345678"}}'
MSG_ID = "msg_test_1"


def _independent_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The signature computed here from the spec's definition, without producer.core.callbacks.signing."""
    mac = hmac.new(key, msg_id.encode() + b"." + str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def _headers(secret: str = DEV_WEBHOOK_SECRET, msg_id: str = MSG_ID, body: bytes = BODY, at: int = NOW) -> dict:
    return signed_headers(secret, msg_id, body, now=at)


def test_sign_matches_the_standard_webhooks_reference_vector() -> None:
    assert sign(SPEC_SECRET, SPEC_MSG_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


def test_sign_matches_an_hmac_computed_independently() -> None:
    key = b"dev-only-secret-do-not-use"  # what DEV_WEBHOOK_SECRET encodes
    assert sign(DEV_WEBHOOK_SECRET, MSG_ID, NOW, BODY) == _independent_signature(key, MSG_ID, NOW, BODY)


def test_reference_vector_verifies_at_its_timestamp() -> None:
    headers = {"webhook-id": SPEC_MSG_ID, "webhook-timestamp": str(SPEC_TIMESTAMP), "webhook-signature": SPEC_SIGNATURE}
    verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TIMESTAMP)


def test_signed_headers_carry_id_timestamp_signature_and_json_type() -> None:
    headers = _headers()
    assert headers == {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(NOW),
        "webhook-signature": _independent_signature(b"dev-only-secret-do-not-use", MSG_ID, NOW, BODY),
        "content-type": "application/json",
    }


def test_signed_headers_default_to_the_current_time() -> None:
    headers = signed_headers(DEV_WEBHOOK_SECRET, MSG_ID, BODY)
    verify(DEV_WEBHOOK_SECRET, headers, BODY)  # default now, default tolerance


def test_signed_headers_verify() -> None:
    verify(DEV_WEBHOOK_SECRET, _headers(), BODY, now=NOW)


def test_header_names_are_matched_case_insensitively() -> None:
    headers = {name.title(): value for name, value in _headers().items()}
    assert "Webhook-Signature" in headers
    verify(DEV_WEBHOOK_SECRET, headers, BODY, now=NOW)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("body", BODY.replace(b"succeeded", b"failed")),
        ("body", BODY + b" "),
        ("webhook-id", "msg_test_2"),
        ("webhook-timestamp", str(NOW + 1)),
        ("webhook-signature", "v1," + base64.b64encode(b"\0" * 32).decode()),
    ],
)
def test_tampered_body_id_timestamp_or_signature_is_rejected(field: str, value: str | bytes) -> None:
    headers, body = _headers(), BODY
    if field == "body":
        assert isinstance(value, bytes)
        body = value
    else:
        assert isinstance(value, str)
        headers[field] = value
    with pytest.raises(WebhookVerificationError, match="no v1 signature"):
        verify(DEV_WEBHOOK_SECRET, headers, body, now=NOW)


def test_signature_made_with_another_secret_is_rejected() -> None:
    headers = _headers(secret=generate_secret())
    with pytest.raises(WebhookVerificationError, match="no v1 signature"):
        verify(DEV_WEBHOOK_SECRET, headers, BODY, now=NOW)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_is_rejected_and_named(missing: str) -> None:
    headers = _headers()
    del headers[missing]
    with pytest.raises(WebhookVerificationError, match=f"missing webhook header.*{missing}"):
        verify(DEV_WEBHOOK_SECRET, headers, BODY, now=NOW)


@pytest.mark.parametrize("timestamp", ["hello", "-5", "1.5", "", " 1700000000"])
def test_timestamp_that_is_not_unix_seconds_is_rejected(timestamp: str) -> None:
    headers = _headers()
    headers["webhook-timestamp"] = timestamp
    with pytest.raises(WebhookVerificationError):
        verify(DEV_WEBHOOK_SECRET, headers, BODY, now=NOW)


@pytest.mark.parametrize(
    ("signed_at", "accepted"),
    [
        (NOW, True),
        (NOW - 300, True),  # exactly at the tolerance, both ways
        (NOW + 300, True),
        (NOW - 301, False),
        (NOW + 301, False),
        (NOW - 86_400, False),
    ],
)
def test_timestamp_must_be_within_tolerance_either_way(signed_at: int, accepted: bool) -> None:
    headers = _headers(at=signed_at)
    if accepted:
        verify(DEV_WEBHOOK_SECRET, headers, BODY, now=NOW)
    else:
        with pytest.raises(WebhookVerificationError, match="old|future"):
            verify(DEV_WEBHOOK_SECRET, headers, BODY, now=NOW)


def test_tolerance_is_configurable() -> None:
    headers = _headers(at=NOW - 30)
    verify(DEV_WEBHOOK_SECRET, headers, BODY, now=NOW, tolerance_s=30)
    with pytest.raises(WebhookVerificationError, match="30 s old"):
        verify(DEV_WEBHOOK_SECRET, headers, BODY, now=NOW, tolerance_s=29)


def test_any_matching_v1_entry_among_several_signatures_verifies() -> None:
    valid = _headers()["webhook-signature"]
    junk = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="
    headers = _headers()
    headers["webhook-signature"] = f"{junk} v2,{valid[3:]} {valid} {junk}"
    verify(DEV_WEBHOOK_SECRET, headers, BODY, now=NOW)


def test_signatures_for_old_and_new_secret_both_verify_during_rotation() -> None:
    old, new = DEV_WEBHOOK_SECRET, generate_secret()
    headers = _headers(secret=old)
    headers["webhook-signature"] = f"{sign(old, MSG_ID, NOW, BODY)} {sign(new, MSG_ID, NOW, BODY)}"
    verify(old, headers, BODY, now=NOW)
    verify(new, headers, BODY, now=NOW)


@pytest.mark.parametrize(
    "signature_header",
    [
        "v2," + "A" * 44,  # only unknown versions
        "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",  # no version prefix
        "v1,é",  # non-ASCII must fail to match, not crash compare_digest
        "   ",
    ],
)
def test_signature_header_without_a_valid_v1_entry_is_rejected(signature_header: str) -> None:
    headers = _headers()
    headers["webhook-signature"] = signature_header
    with pytest.raises(WebhookVerificationError):
        verify(DEV_WEBHOOK_SECRET, headers, BODY, now=NOW)


def test_verification_error_is_a_genq_error() -> None:
    assert issubclass(WebhookVerificationError, GenqError)


def test_generated_secret_is_whsec_and_32_random_bytes() -> None:
    first, second = generate_secret(), generate_secret()
    assert first.startswith("whsec_")
    assert len(decode_secret(first)) == 32
    assert first != second


def test_decode_secret_accepts_prefixed_bare_and_padded_with_whitespace() -> None:
    key = b"dev-only-secret-do-not-use"
    assert decode_secret(DEV_WEBHOOK_SECRET) == key
    assert decode_secret(DEV_WEBHOOK_SECRET.removeprefix("whsec_")) == key
    assert decode_secret(DEV_WEBHOOK_SECRET + "\n") == key


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "whsec_",
        "whsec_not base64!",
        "whsec_ZGV2LW9ubHk",  # missing padding
        "whsec_ZGV2LW9ubHktc2VjcmV0_-",  # URL-safe alphabet, not standard base64
    ],
)
def test_malformed_secret_raises_a_clear_value_error_without_echoing_it(secret: str) -> None:
    with pytest.raises(ValueError, match="webhook secret") as caught:
        decode_secret(secret)
    if len(secret) > len("whsec_"):
        assert secret.removeprefix("whsec_") not in str(caught.value)
    with pytest.raises(ValueError, match="webhook secret"):
        sign(secret, MSG_ID, NOW, BODY)


def test_msg_id_is_stable_for_one_event_and_distinct_across_events() -> None:
    first = msg_id_for("job_12345678", "succeeded", 3)
    assert first == msg_id_for("job_12345678", "succeeded", 3)  # every retry of the event
    assert first == msg_id_for("job_12345678", EventType.SUCCEEDED, 3)  # enum or value
    assert first.startswith("msg_") and len(first) == len("msg_") + 32
    others = {
        msg_id_for("job_12345678", "succeeded", 4),
        msg_id_for("job_12345678", "failed", 3),
        msg_id_for("job_87654321", "succeeded", 3),
        msg_id_for("job_1234567", "8succeeded", 3),  # no ambiguity from plain concatenation
    }
    assert first not in others and len(others) == 4


def test_msg_id_rejects_a_negative_sequence_number() -> None:
    with pytest.raises(ValueError, match="sequence"):
        msg_id_for("job_12345678", "queued", -1)


def test_webhooks_module_imports_neither_torch_celery_httpx_nor_pydantic() -> None:
    code = (
        "import sys, producer.webhooks; "
        "print(','.join(m for m in ('torch', 'celery', 'httpx', 'pydantic') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""
