"""Delivering callback events: one signed POST per attempt over connections kept alive per receiver host, and the
retry policy, as pure functions.

``deliver`` makes exactly one attempt and reports what happened without raising; a :class:`WebhookClient` carries
the attempts of one delivery thread (a connection pool per receiver host, pinned to the addresses the SSRF guard
vetted, every attempt held to a wall-clock deadline); ``next_delay`` and ``hop_countdown`` decide when the next
attempt is due and how long a message may wait on the broker; ``producer.core.callbacks.delivery`` puts them
together with the records kept in Redis.
"""

from __future__ import annotations

import functools
import random
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpcore
import httpx

from producer.contract import WebhookEvent
from producer.core.callbacks.signing import signed_headers
from producer.core.callbacks.ssrf import redact_url

USER_AGENT = "genq-webhooks/1"
# An idle connection is dropped after this long, before the receiver's own idle timeout is likely to close it under
# a request (Node's default is 5 s, nginx's 75 s).
KEEPALIVE_S = 4.0
MAX_HOSTS = 16  # receiver hosts one client keeps connections to; the least recently used host's pool is closed
MAX_ANSWER_BYTES = 64 * 1024  # an answer body is read (for the connection to carry the next event) up to this much

# What a failed POST raises: the network, the protocol, a timeout (ours or the receiver's), a URL it cannot use.
_HTTP_ERRORS = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    httpx.InvalidURL,
)


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


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """The TLS context (CA bundle, verification on) every :class:`WebhookClient` of this process shares.

    Loading the CA bundle costs about 20 ms of CPU; a context made per attempt cost more than the POST itself
    (23 ms against 1.4 ms, issue 17). An ``SSLContext`` is safe to share between threads.
    """
    return httpx.create_ssl_context()


class WebhookClient:
    """The HTTP connections of one delivery thread: a pool per receiver host, reused from attempt to attempt.

    A pool is keyed by the URL's scheme, host name and port, and connects only to the addresses an attempt passes
    (the ones the SSRF guard vetted for it), so a connection is reused only by the same host at an address vetted
    again for this attempt, and a TLS connection verified for one name never carries another host's events. Every
    read, write, connect and TLS handshake of an attempt is cut to what is left of the attempt's deadline, so a
    receiver that trickles its answer a byte at a time cannot hold the thread past it (a per-read timeout alone
    would never fire). A host's pool is closed once unused for ``keepalive_s`` (at the next attempt) and the least
    recently used beyond ``max_hosts``: a thread holds at most ``max_hosts`` idle connections.

    Not for several threads at once: give each delivery thread its own (:class:`.delivery.Deliverer` does).
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_s: float = KEEPALIVE_S,
        max_hosts: int = MAX_HOSTS,
    ) -> None:
        self._ssl_context = ssl_context or shared_ssl_context()
        self._keepalive_s = keepalive_s
        self._max_hosts = max_hosts
        self._backend = _DeadlineBackend()
        # Least recently used first: (scheme, host, port) -> (the pool, when it was last used: time.monotonic()).
        self._pools: OrderedDict[tuple[bytes, bytes, int | None], tuple[httpcore.ConnectionPool, float]] = OrderedDict()
        self._closed = False

    @property
    def is_closed(self) -> bool:
        return self._closed

    def connections(self) -> int:
        """Connections open now, over every host (idle ones included)."""
        return sum(len(pool.connections) for pool, _ in self._pools.values())

    def post(
        self,
        url: httpx.URL,
        addresses: Sequence[str],
        body: bytes,
        headers: dict[str, str],
        *,
        timeout_s: float,
        deadline_at: float | None,
    ) -> int:
        """POST ``body`` to ``url`` at the first of ``addresses`` that accepts a connection; return the status code.

        ``addresses`` empty: connect to the URL's host by name. ``deadline_at`` (``time.monotonic()``): nothing of
        the attempt runs past it. Raises httpcore's errors (:data:`_HTTP_ERRORS`).
        """
        if self._closed:
            raise RuntimeError("this WebhookClient is closed")
        if url.scheme not in ("http", "https"):
            raise httpcore.UnsupportedProtocol(f"callbacks are sent over http or https, not {url.scheme!r}")
        if not url.host:
            raise httpx.InvalidURL(f"callback URL {redact_url(str(url))!r} has no host")  # logged: no secret
        pool = self._pool(url)
        # The request goes to the address; the receiver still sees its own name in Host, and TLS checks the
        # certificate against that name (SNI), not against the address.
        request_headers = [("host", url.netloc.decode("ascii")), *headers.items()]
        extensions: dict[str, Any] = {"timeout": dict.fromkeys(("connect", "read", "write", "pool"), timeout_s)}
        if url.scheme == "https":
            extensions["sni_hostname"] = url.host
        targets = [_origin(url, address) for address in addresses] or [_origin(url, None)]
        with self._backend.deadline(deadline_at):
            for target in targets[:-1]:
                try:
                    return _send(pool, target, body, request_headers, extensions)
                except (httpcore.ConnectError, httpcore.ConnectTimeout):
                    continue  # nothing was sent: try the next address
            return _send(pool, targets[-1], body, request_headers, extensions)

    def close(self) -> None:
        """Close every connection; the client cannot be used afterwards."""
        self._closed = True
        while self._pools:
            _, (pool, _used) = self._pools.popitem()
            pool.close()

    def __enter__(self) -> WebhookClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _pool(self, url: httpx.URL) -> httpcore.ConnectionPool:
        key = (url.raw_scheme, url.raw_host.lower(), url.port)
        now = time.monotonic()
        found = self._pools.pop(key, None)
        pool = found[0] if found is not None else None
        # The others, oldest first: close those idle past the keep-alive (their connections would be stale anyway)
        # and those beyond the host cap, so an idle thread does not sit on sockets the receivers closed.
        while self._pools:
            oldest, (idle, used) = next(iter(self._pools.items()))
            if now - used < self._keepalive_s and len(self._pools) < self._max_hosts:
                break
            del self._pools[oldest]
            idle.close()
        if pool is None:
            pool = httpcore.ConnectionPool(
                ssl_context=self._ssl_context,
                max_connections=4,  # one attempt at a time per thread; a few addresses of one host
                max_keepalive_connections=2,  # a host whose name answers with two addresses in turn
                keepalive_expiry=self._keepalive_s,
                network_backend=self._backend,
            )
        self._pools[key] = (pool, now)
        return pool


def _origin(url: httpx.URL, address: str | None) -> httpcore.URL:
    host = url.raw_host if address is None else address.encode("ascii")
    return httpcore.URL(scheme=url.raw_scheme, host=host, port=url.port, target=url.raw_path)


def _send(
    pool: httpcore.ConnectionPool,
    target: httpcore.URL,
    body: bytes,
    headers: list[tuple[str, str]],
    extensions: dict[str, Any],
) -> int:
    with pool.stream("POST", target, headers=headers, content=body, extensions=extensions) as response:
        status = response.status
        # Read a short answer to its end, so the connection can carry the next event; a long one is cut off (the
        # connection is closed instead). The answer is in already: a receiver that stalls here loses nothing.
        try:
            read = 0
            for chunk in response.iter_stream():
                read += len(chunk)
                if read > MAX_ANSWER_BYTES:
                    break
        except _HTTP_ERRORS:
            pass
        return status


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's socket backend, with every operation's timeout cut to what is left of the calling thread's
    attempt deadline (``socket.settimeout`` per operation; CPython's TLS handshake and reads honour it as a whole)."""

    def __init__(self) -> None:
        self._sockets = httpcore.SyncBackend()
        self._local = threading.local()

    @contextmanager
    def deadline(self, at: float | None) -> Iterator[None]:
        self._local.at = at
        try:
            yield
        finally:
            self._local.at = None

    def timeout(self, timeout: float | None, expired: type[Exception]) -> float | None:
        at: float | None = getattr(self._local, "at", None)
        if at is None:
            return timeout
        left = at - time.monotonic()
        if left <= 0:
            raise expired("the attempt's deadline has passed")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._sockets.connect_tcp(
            host, port, self.timeout(timeout, httpcore.ConnectTimeout), local_address, socket_options
        )
        return _DeadlineStream(stream, self)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.UnsupportedProtocol("callbacks are sent over TCP only")


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, backend: _DeadlineBackend) -> None:
        self._stream = stream
        self._backend = backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._backend.timeout(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._backend.timeout(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        tls = self._stream.start_tls(
            ssl_context, server_hostname, self._backend.timeout(timeout, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(tls, self._backend)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def deliver(
    url: str,
    event: WebhookEvent,
    *,
    secret: str | Sequence[str],
    msg_id: str,
    timeout_s: float,
    deadline_s: float | None = None,
    client: WebhookClient | None = None,
    connect_to: Sequence[str] = (),
) -> DeliveryResult:
    """POST one event to ``url``, signed with Standard Webhooks v1 headers; make a single attempt.

    The body is ``event.model_dump_json()`` and is sent byte for byte as signed. Redirects are not followed
    (a 3xx is a failed delivery), and at most :data:`MAX_ANSWER_BYTES` of the answer body are read (and dropped).

    Args:
        url: the callback URL.
        event: the event to send.
        secret: the ``whsec_`` signing secret, or several (a rotation's overlap: one signature each).
        msg_id: the ``webhook-id``; the same on every retry of this event.
        timeout_s: limit for each phase of the request (connect, each write, each read), in seconds.
        deadline_s: wall-clock limit for the whole attempt (connect, TLS, send, the answer's headers and body), in
            seconds; None: only ``timeout_s`` applies, which a receiver sending a byte now and then never reaches.
        client: the delivery thread's :class:`WebhookClient`, whose connections are reused; by default a new one is
            made and closed.
        connect_to: the addresses to connect to, in order, instead of looking the host up again (the ones the SSRF
            guard vetted, so DNS cannot answer differently in between); ``Host`` and TLS SNI stay the URL's host.
            The next address is tried only when connecting fails, before anything is sent.

    Returns:
        A ``DeliveryResult``. Network errors, timeouts and a passed deadline come back as ``ok=False`` with the
        error text; they are never raised.

    Raises:
        ValueError: the secret is malformed (a configuration error, raised before anything is sent).
    """
    body = event.model_dump_json().encode()
    headers = signed_headers(secret, msg_id, body)
    headers["user-agent"] = USER_AGENT
    started = time.perf_counter()
    deadline_at = None if deadline_s is None else time.monotonic() + deadline_s
    own = client is None
    http = WebhookClient() if client is None else client
    try:
        status = http.post(httpx.URL(url), connect_to, body, headers, timeout_s=timeout_s, deadline_at=deadline_at)
    except _HTTP_ERRORS as exc:
        error = _describe(exc)
        if deadline_at is not None and isinstance(exc, httpcore.TimeoutException) and time.monotonic() >= deadline_at:
            error = f"no answer within the attempt deadline of {deadline_s:g} s ({error})"
        return DeliveryResult(ok=False, status_code=None, error=error, duration_ms=_elapsed_ms(started))
    finally:
        if own:
            http.close()
    ok = 200 <= status < 300
    return DeliveryResult(
        ok=ok,
        status_code=status,
        error=None if ok else f"HTTP {status}",
        duration_ms=_elapsed_ms(started),
    )


def _describe(exc: Exception) -> str:
    # Timeouts often carry an empty message; the class name (ReadTimeout, ConnectError) says what happened.
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
