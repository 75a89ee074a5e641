"""A redis-server of a test's own, with AOF on, that the test can shut down, kill and start again on the same port and
data folder: Redis restarting under a running worker."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """``redis-server`` on a free loopback port, its AOF (``appendfsync everysec``, as production runs it) and log in
    ``folder``. :meth:`start` again after :meth:`shutdown` or :meth:`kill` reloads what the AOF kept."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> RedisServer:
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder)]
        argv += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no"]
        argv += ["--logfile", str(self.folder / "redis.log")]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:  # not listening yet, or still loading its AOF
                    time.sleep(0.05)
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log()[-2000:]}")
        finally:
            client.close()
        raise TimeoutError(f"redis-server on port {self.port} did not answer within {timeout} s")

    def shutdown(self) -> None:
        """A clean stop: ``SHUTDOWN`` writes and fsyncs the AOF first, so nothing is lost."""
        if self.proc is None:
            return
        client = redis.Redis.from_url(self.url)
        try:
            client.shutdown()
        except redis.ConnectionError:  # the server closes the connection as it exits
            pass
        finally:
            client.close()
        self.proc.wait(20)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: what the last second of writes had not fsynced yet (``everysec``) is lost."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(20)
        self.proc = None

    def log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""
