"""Real Celery worker subprocesses for integration tests, always stopped by the fixture that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class WorkerProcess:
    """``genq worker`` in its own process group, logging to a file the test can read on failure."""

    def __init__(self, env: dict[str, str], log_path: Path, *, queues: str, pool: str, concurrency: int) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        argv = [sys.executable, "-m", "producer.cli", "worker", "-Q", queues, "--pool", pool, "-c", str(concurrency)]
        argv += ["--hostname", f"test-{os.getpid()}-{time.monotonic_ns()}@%h"]
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> WorkerProcess:
        """Block until Celery logs that the worker is ready (models loaded, queues consumed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "worker ready:" in self.log():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log()[-4000:]}")

    def children(self) -> list[int]:
        """PIDs of the pool's child processes (prefork)."""
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill(self) -> None:
        """SIGKILL the whole worker (parent and pool) at once: nothing gets to clean up."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it takes too long."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
