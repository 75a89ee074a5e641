"""A real HTTP webhook receiver for tests: a loopback server that records, verifies and answers as scripted::

    with WebhookReceiver(secret=DEV_WEBHOOK_SECRET, statuses=[500, 500], reject_unverified=True) as receiver:
        ...  # deliver to receiver.url: the first two POSTs get 500, the rest 200 if they verify (else 401)
        [first, second, third] = receiver.wait_for(3, timeout=5)
        assert third.verified

The ``webhook_receiver`` fixture in ``conftest.py`` gives a started one for the dev secret.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from producer.core.callbacks.signing import DEFAULT_TOLERANCE_S, WebhookVerificationError, verify


@dataclass(frozen=True)
class Received:
    """One request as the receiver saw it, and what it answered."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float  # time.time() when the request had been read
    verified: bool  # producer.core.callbacks.signing.verify accepted it
    verify_error: str | None  # why it did not
    status: int  # the status code answered

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    """An ``http.server`` on 127.0.0.1 (a free port) in a background thread.

    Args:
        secret: the ``whsec_`` secret every request is verified against.
        statuses: status codes to answer, one per request in order; ``default_status`` once they run out.
        default_status: the answer after the script (200).
        delay_s: how long to wait before answering each request (to make a client time out).
        tolerance_s: timestamp tolerance for verification.
        reject_unverified: answer 401, as a real receiver would, to a request that fails verification once the
            scripted statuses are used up (by default every request is recorded and answered as scripted).

    A 3xx answer carries ``location: <url>/redirected``, so a client that follows redirects shows up as a second
    request.
    """

    def __init__(
        self,
        secret: str,
        *,
        statuses: Iterable[int] = (),
        default_status: int = 200,
        delay_s: float = 0.0,
        tolerance_s: int = DEFAULT_TOLERANCE_S,
        reject_unverified: bool = False,
    ) -> None:
        self.secret = secret
        self.default_status = default_status
        self.delay_s = delay_s
        self.tolerance_s = tolerance_s
        self.reject_unverified = reject_unverified
        self._script: deque[int] = deque(statuses)
        self._received: list[Received] = []
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> WebhookReceiver:
        if self._server is not None:
            raise RuntimeError("receiver already started")
        self._stopping.clear()
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True  # a handler still waiting out delay_s must not block stop()
        self._server = server
        # A short poll interval: shutdown() waits for the next poll, and the default 0.5 s adds up over many tests.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="webhook-receiver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()  # wakes handlers sleeping in delay_s
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- configuration and results -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("receiver not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    def script(
        self,
        statuses: Iterable[int],
        *,
        delay_s: float | None = None,
        default_status: int | None = None,
        reject_unverified: bool | None = None,
    ) -> None:
        """Answer the next requests with ``statuses`` (then ``default_status``); optionally change the other options."""
        with self._cond:
            self._script = deque(statuses)
            if delay_s is not None:
                self.delay_s = delay_s
            if default_status is not None:
                self.default_status = default_status
            if reject_unverified is not None:
                self.reject_unverified = reject_unverified

    @property
    def received(self) -> list[Received]:
        with self._cond:
            return list(self._received)

    def clear(self) -> None:
        with self._cond:
            self._received.clear()

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Received]:
        """Every request so far, once at least ``n`` have arrived; TimeoutError after ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._received) >= n, timeout=timeout):
                raise TimeoutError(f"webhook receiver got {len(self._received)} request(s) in {timeout} s, wanted {n}")
            return list(self._received)

    # -- called from handler threads ---------------------------------------------------------------------------

    def _record(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, float]:
        try:
            verify(self.secret, headers, body, tolerance_s=self.tolerance_s)
            verified, error = True, None
        except (WebhookVerificationError, ValueError) as exc:
            verified, error = False, str(exc)
        with self._cond:
            if self._script:
                status = self._script.popleft()
            else:
                status = 401 if self.reject_unverified and not verified else self.default_status
            delay = self.delay_s
            self._received.append(Received(method, path, headers, body, time.time(), verified, error, status))
            self._cond.notify_all()
        return status, delay


def _handler_for(receiver: WebhookReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {name.lower(): value for name, value in self.headers.items()}
            status, delay = receiver._record(self.command, self.path, headers, body)
            if delay and receiver._stopping.wait(delay):
                return  # stopping: drop the connection unanswered
            try:
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("location", receiver.url + "/redirected")
                self.send_header("content-length", "0")
                self.end_headers()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (a timeout test): nothing to answer

        do_PUT = do_PATCH = do_DELETE = do_POST  # recorded too, so a wrong method shows up in assertions

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

    return Handler
