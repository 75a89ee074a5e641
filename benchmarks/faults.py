"""Faults a benchmark injects into a real stack: a redis-server of its own restarted under load, an S3 outage through
a loopback TCP proxy, and `genq worker` processes killed whole (parent, pool and callbacks worker at once).

The integration tests have their own (tests/redis_server.py, tests/tcp_proxy.py, tests/worker_process.py); a
benchmark does not import from tests/.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

from benchmarks.throughput import process_cpu_s
from benchmarks.uploads import free_port, proc_status_mib


class RedisServer:
    """``redis-server`` on a free loopback port, with its AOF (``appendfsync everysec``, as production runs it) and
    log in ``folder``. :meth:`start` again after :meth:`shutdown` or :meth:`kill` reloads what the AOF kept."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.cpu_s = 0.0  # CPU of the server processes already stopped

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 60.0) -> RedisServer:
        """Start it and wait until it answers (its AOF loaded). Raises TimeoutError, or RuntimeError if it exits."""
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
                except (redis.ConnectionError, redis.BusyLoadingError):  # not listening yet, or loading its AOF
                    time.sleep(0.05)
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.folder}/redis.log")
        finally:
            client.close()
        raise TimeoutError(f"redis-server on port {self.port} did not answer within {timeout} s")

    def cpu(self) -> float:
        """CPU seconds of every server process so far, this one's included."""
        return self.cpu_s + (process_cpu_s(self.proc.pid) if self.proc is not None else 0.0)

    def shutdown(self) -> None:
        """A clean stop: ``SHUTDOWN`` writes and fsyncs the AOF first, so nothing is lost."""
        if self.proc is None:
            return
        self.cpu_s = self.cpu()
        client = redis.Redis.from_url(self.url)
        try:
            client.shutdown()
        except redis.ConnectionError:  # the server closes the connection as it exits
            pass
        finally:
            client.close()
        self.proc.wait(30)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: what the last second of writes had not fsynced yet (``everysec``) may be lost."""
        if self.proc is None:
            return
        self.cpu_s = self.cpu()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target``. :meth:`down` closes the listener (connection refused) and drops the
    open connections; :meth:`up` listens again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            _close(listener)  # shutdown() first: a bare close() does not wake a thread blocked in accept()
        for conn in conns:
            _close(conn)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns = [c for c in self._conns if c.fileno() != -1] + [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class WorkerProcess:
    """`genq worker` (its defaults: threads pool, ``-c 16``, a callbacks worker beside it) in a process group of its
    own, logging to ``log``: :meth:`kill` takes the whole group at once, as a lost machine would."""

    def __init__(self, env: dict[str, str], log: Path, name: str) -> None:
        self.log = log
        self.name = name
        argv = [sys.executable, "-m", "producer.cli", "worker", "--hostname", f"{name}@%h"]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.cpu_s = 0.0  # the group's CPU when it was killed or stopped

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 180.0) -> WorkerProcess:
        """Block until the worker logs that its models are loaded and its queues consumed."""
        deadline = time.monotonic() + timeout
        while "worker ready: models" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} did not start; see {self.log}")
            time.sleep(0.2)
        return self

    def rss_mib(self) -> float:
        """The generation worker's resident set (VmRSS of the parent, whose threads run the jobs), in MiB."""
        return proc_status_mib(self.pid, "VmRSS")

    def cpu(self) -> float:
        """CPU seconds of every process of the group (the worker and its callbacks worker) so far."""
        if self.proc.poll() is not None:
            return self.cpu_s
        total = 0.0
        for pid in _group(self.pid):
            try:
                total += process_cpu_s(pid)
            except FileNotFoundError:  # it exited between the two reads
                pass
        return total

    def kill(self) -> None:
        """SIGKILL the whole group at once: nothing gets to clean up or hand anything back."""
        if self.proc.poll() is None:
            self.cpu_s = self.cpu()
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> None:
        """Warm shutdown (SIGTERM to the group), then SIGKILL if it takes longer than ``timeout``."""
        if self.proc.poll() is None:
            self.cpu_s = self.cpu()
            os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(30)


def _group(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid:  # after the name: state, ppid, pgrp
            pids.append(int(entry.name))
    return pids
