"""Delivering callback events: one signed POST per attempt, and the retry policy, as pure functions.

``deliver`` makes exactly one attempt and reports what happened without raising; ``next_delay`` and
``hop_countdown`` decide when the next attempt is due and how long a message may wait on the broker;
``producer.core.callbacks.delivery`` puts them together with the records kept in Redis.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from producer.contract import WebhookEvent
from producer.core.callbacks.signing import signed_headers

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
    connect_to: Sequence[str] = (),
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
        connect_to: the addresses to connect to, in order, instead of looking the host up again (the ones the SSRF
            guard vetted, so DNS cannot answer differently in between); ``Host`` and TLS SNI stay the URL's host.
            The next address is tried only when connecting fails, before anything is sent.

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
                status = _post_to_first(own_client, url, connect_to, body, headers, timeout_s)
        else:
            status = _post_to_first(client, url, connect_to, body, headers, timeout_s)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return DeliveryResult(ok=False, status_code=None, error=_describe(exc), duration_ms=_elapsed_ms(started))
    ok = 200 <= status < 300
    return DeliveryResult(
        ok=ok,
        status_code=status,
        error=None if ok else f"HTTP {status}",
        duration_ms=_elapsed_ms(started),
    )


def _post_to_first(
    client: httpx.Client,
    url: str,
    addresses: Sequence[str],
    body: bytes,
    headers: dict[str, str],
    timeout_s: float,
) -> int:
    if not addresses:
        return _post(client, httpx.URL(url), body, headers, timeout_s, {})
    target = httpx.URL(url)
    # The request goes to the address; the receiver still sees its own name in Host, and TLS checks the
    # certificate against that name (SNI), not against the address.
    pinned_headers = {**headers, "host": target.netloc.decode("ascii")}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    for address in addresses[:-1]:
        try:
            return _post(client, target.copy_with(host=address), body, pinned_headers, timeout_s, extensions)
        except httpx.ConnectError:
            continue  # nothing was sent: try the next address
    return _post(client, target.copy_with(host=addresses[-1]), body, pinned_headers, timeout_s, extensions)


def _post(
    client: httpx.Client,
    url: httpx.URL,
    body: bytes,
    headers: dict[str, str],
    timeout_s: float,
    extensions: dict[str, str],
) -> int:
    # Stream and close without reading: a receiver's answer body is of no use and could be arbitrarily large.
    request = client.build_request(
        "POST", url, content=body, headers=headers, timeout=httpx.Timeout(timeout_s), extensions=extensions
    )
    response = client.send(request, stream=True, follow_redirects=False)
    try:
        return response.status_code
    finally:
        response.close()


def _describe(exc: Exception) -> str:
    # httpx timeouts often carry an empty message; the class name (ReadTimeout, ConnectError) says what happened.
    detail = str(exc)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def next_delay(attempt: int, schedule: Sequence[float], jitter: float, rng: random.Random) -> float | None:
    """Seconds to wait before the attempt after ``attempt``, or None once the schedule is used up.

    Args:
        attempt: the attempt that just failed, counted from 1.
        schedule: the delay before each attempt after the previous one (``GENQ_WEBHOOK__RETRY_SCHEDULE_S``);
            ``schedule[0]`` is the first attempt's (0: at once), so ``len(schedule)`` attempts are made in all.
        jitter: a fraction in [0, 1]: the delay is scaled by a factor drawn uniformly from ``1 ± jitter``, so the
            retries of many events that failed together (a receiver outage) do not all arrive together again.
        rng: the source of the factor.

    Raises:
        ValueError: ``attempt`` < 1 or ``jitter`` outside [0, 1].
    """
    if attempt < 1:
        raise ValueError(f"attempts are counted from 1, got {attempt}")
    if not 0 <= jitter <= 1:
        raise ValueError(f"jitter is a fraction in [0, 1], got {jitter}")
    if attempt >= len(schedule):
        return None
    return max(0.0, schedule[attempt] * rng.uniform(1 - jitter, 1 + jitter))


def hop_countdown(remaining_s: float, max_hop_s: float) -> float:
    """How long to hold a message on the broker before it runs (or is put back to wait again): at most ``max_hop_s``.

    A Redis broker hands a ``countdown`` message to a worker at once, which keeps it unacknowledged in memory until
    it is due; once the visibility timeout passes, Redis gives it to another worker as well, and again after each
    timeout. Waits longer than that (the schedule's 2 h ... 24 h) are therefore made of hops of at most
    ``max_hop_s``, well inside the visibility timeout: a message that arrives early is sent on with a new countdown.
    """
    if max_hop_s <= 0:
        raise ValueError(f"max_hop_s must be > 0, got {max_hop_s}")
    return min(max(0.0, remaining_s), max_hop_s)
