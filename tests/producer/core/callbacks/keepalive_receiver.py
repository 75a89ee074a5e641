"""An HTTP/1.1 receiver that keeps connections alive and says which connection and address carried each request,
or one that trickles its answer a byte at a time (a tarpit)::

    with KeepAliveReceiver() as receiver:                  # 200 to every POST, on kept-alive connections
        ...
        [first, second] = receiver.requests
        assert first.peer == second.peer                   # the same client socket: the connection was reused

    with KeepAliveReceiver(trickle_s=0.3) as tarpit:       # one byte of "HTTP/1.1 200 OK..." every 0.3 s
        ...

``hosts`` binds the same port on several loopback addresses (127.0.0.1 and 127.0.0.2: both reach this machine),
so a test can tell which address a client connected to.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@dataclass(frozen=True)
class Request:
    """One request: the client's (address, port), the local address it connected to, and its Host header."""

    peer: tuple[str, int]
    local_address: str
    host: str


class KeepAliveReceiver:
    def __init__(self, *, hosts: tuple[str, ...] = ("127.0.0.1",), trickle_s: float | None = None) -> None:
        self.trickle_s = trickle_s
        self._hosts = hosts
        self._servers: list[ThreadingHTTPServer] = []
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self.stopping = threading.Event()

    @property
    def port(self) -> int:
        return int(self._servers[0].server_address[1])

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/hook"

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def start(self) -> KeepAliveReceiver:
        port = 0
        for host in self._hosts:
            server = ThreadingHTTPServer((host, port), _handler_for(self))
            server.daemon_threads = True
            port = int(server.server_address[1])
            self._servers.append(server)
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> KeepAliveReceiver:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)


def _handler_for(receiver: KeepAliveReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep the connection open after each answer

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            local = self.connection.getsockname()[0]
            receiver._record(Request(self.client_address[:2], local, self.headers.get("host", "")))
            try:
                if receiver.trickle_s is None:
                    self.wfile.write(ANSWER)
                    return
                for byte in ANSWER:  # never a whole status line in time for a deadline
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    if receiver.stopping.wait(receiver.trickle_s):
                        break
                self.close_connection = True
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def wait_for(receiver: KeepAliveReceiver, n: int, timeout: float = 5.0) -> list[Request]:
    deadline = time.monotonic() + timeout
    while len(receiver.requests) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(receiver.requests)} request(s) in {timeout} s, wanted {n}")
        time.sleep(0.01)
    return receiver.requests
