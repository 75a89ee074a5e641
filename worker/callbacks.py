"""Delivering callback events: one signed POST per attempt, and the filter that decides which events go out.

Retries, backoff and the checks on where a callback URL may point come later; ``deliver`` makes exactly one attempt
and reports what happened without raising, so the caller decides what to do next.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from producer.contract import WebhookEvent
from producer.webhooks import signed_headers

USER_AGENT = "genq-webhooks/1"


@dataclass(frozen=True)
class DeliveryResult:
    """The outcome of one POST: ``ok`` only for a 2xx answer; ``status_code`` is None when none came back."""

    ok: bool
    status_code: int | None
    error: str | None
    duration_ms: float

    @property
    def gone(self) -> bool:
        """The receiver answered 410 Gone: Standard Webhooks says stop sending to this URL."""
        return self.status_code == 410


def deliver(
    url: str,
    event: WebhookEvent,
    *,
    secret: str,
    msg_id: str,
    timeout_s: float,
    client: httpx.Client | None = None,
) -> DeliveryResult:
    """POST one event to ``url``, signed with Standard Webhooks v1 headers; make a single attempt.

    The body is ``event.model_dump_json()`` and is sent byte for byte as signed. Redirects are not followed
    (a 3xx is a failed delivery), and the response body is never read.

    Args:
        url: the callback URL.
        event: the event to send.
        secret: the ``whsec_`` signing secret.
        msg_id: the ``webhook-id``; the same on every retry of this event.
        timeout_s: limit for each phase of the request (connect, write, read), in seconds.
        client: an ``httpx.Client`` to reuse connections; by default a new one is made and closed.

    Returns:
        A ``DeliveryResult``. Network errors and timeouts come back as ``ok=False`` with the error text; they are
        never raised.

    Raises:
        ValueError: the secret is malformed (a configuration error, raised before anything is sent).
    """
    body = event.model_dump_json().encode()
    headers = signed_headers(secret, msg_id, body)
    headers["user-agent"] = USER_AGENT
    started = time.perf_counter()
    try:
        if client is None:
            with httpx.Client(follow_redirects=False) as own_client:
                status = _post(own_client, url, body, headers, timeout_s)
        else:
            status = _post(client, url, body, headers, timeout_s)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return DeliveryResult(ok=False, status_code=None, error=_describe(exc), duration_ms=_elapsed_ms(started))
    ok = 200 <= status < 300
    return DeliveryResult(
        ok=ok,
        status_code=status,
        error=None if ok else f"HTTP {status}",
        duration_ms=_elapsed_ms(started),
    )


def _post(client: httpx.Client, url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    # Stream and close without reading: a receiver's answer body is of no use and could be arbitrarily large.
    with client.stream(
        "POST", url, content=body, headers=headers, timeout=httpx.Timeout(timeout_s), follow_redirects=False
    ) as response:
        return response.status_code


def _describe(exc: Exception) -> str:
    # httpx timeouts often carry an empty message; the class name (ReadTimeout, ConnectError) says what happened.
    detail = str(exc)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
