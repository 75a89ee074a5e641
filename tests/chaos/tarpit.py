"""A callback receiver that never answers in time: it reads each request, then sends one byte of a status line every
``interval_s`` (``HTTP/1.1 200 OK...``), which no per-read timeout longer than that interval ever notices::

    with Tarpit(interval_s=0.5) as tarpit:
        ...  # callbacks to tarpit.url
        assert tarpit.peak_open <= 2  # the most connections it held at once
"""

from __future__ import annotations

import select
import socket
import threading
import time
from types import TracebackType

TRICKLE = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


class Tarpit:
    def __init__(self, interval_s: float = 0.5, host: str = "127.0.0.1") -> None:
        self.interval_s = interval_s
        self._server = socket.create_server((host, 0))
        self._server.settimeout(0.05)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.accepted = 0  # connections accepted in all
        self.open = 0  # connections held now
        self.peak_open = 0  # the most held at once
        self._thread = threading.Thread(target=self._serve, name="tarpit", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.getsockname()[:2]
        return f"http://{host}:{port}/hook"

    def __enter__(self) -> Tarpit:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._server.close()

    def wait_open(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.open < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the tarpit holds {self.open} connection(s) after {timeout} s, wanted {n}")
            time.sleep(0.05)

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with self._lock:
                self.accepted += 1
                self.open += 1
                self.peak_open = max(self.peak_open, self.open)
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        try:
            with conn:
                _read_request(conn)
                for byte in TRICKLE:
                    conn.sendall(bytes([byte]))
                    readable, _, _ = select.select([conn], [], [], self.interval_s)
                    if self._stopping.is_set() or (readable and not conn.recv(1)):
                        return  # stopping, or the client closed its end (it gave up)
        except OSError:
            pass  # the client gave up on it: what a deadline is for
        finally:
            with self._lock:
                self.open -= 1


def _read_request(conn: socket.socket) -> None:
    """Read one request whole (headers, then a ``content-length`` body): what is left unread would make closing the
    socket a reset, and would read as the client going away."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        body += chunk
