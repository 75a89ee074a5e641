"""Verifying genq's callbacks in a receiver (Standard Webhooks v1): the public names the README documents.

>>> from producer.webhooks import WebhookVerificationError, verify
>>> verify(secret, request.headers, raw_body)  # raises WebhookVerificationError if forged or stale

Signing and verifying live in :mod:`producer.core.callbacks.signing`, with the rest of callbacks; this module only
names them for receivers. It imports neither torch, Celery, httpx nor pydantic.
"""

from producer.core.callbacks.signing import WebhookVerificationError, generate_secret, verify

__all__ = ["WebhookVerificationError", "generate_secret", "verify"]
