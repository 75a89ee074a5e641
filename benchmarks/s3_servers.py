"""The S3 servers the benchmarks measure against: moto's (in this process) and s3rver's (npm, a process of its own).

moto's server answers every request with ``Connection: close`` (werkzeug's development server), so each PUT opens a
TCP connection and a server thread; s3rver keeps connections alive, as AWS S3 and MinIO do. Figures taken against
both tell a cost of moto's apart from genq's own. s3rver installs from the npm registry::

    npm ci --prefix benchmarks/s3rver     # s3rver 3.7.1, pinned by benchmarks/s3rver/package-lock.json

Both accept any signature from the benchmark's credentials (:data:`AWS`: s3rver's built-in key pair).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

AWS = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER", "AWS_DEFAULT_REGION": "us-east-1"}
S3RVER_BIN = Path(__file__).parent / "s3rver" / "node_modules" / ".bin" / "s3rver"
S3RVER_INSTALL = "npm ci --prefix benchmarks/s3rver"


@dataclass(frozen=True)
class S3rver:
    """A running s3rver: its endpoint and the pid whose CPU is the server's."""

    endpoint: str
    pid: int


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def s3rver(bucket: str, timeout_s: float = 30) -> Iterator[S3rver]:
    """s3rver on a free loopback port with ``bucket``, its objects in a temporary folder removed afterwards.

    Raises:
        FileNotFoundError: s3rver is not installed (the message says how to install it).
    """
    if not S3RVER_BIN.exists():
        raise FileNotFoundError(f"s3rver is not installed: run `{S3RVER_INSTALL}` (Node.js 18 or newer)")
    port, data = free_port(), tempfile.mkdtemp(prefix="genq-bench-s3rver-")
    argv = [str(S3RVER_BIN), "-d", data, "-a", "127.0.0.1", "-p", str(port), "--silent", "--configure-bucket", bucket]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # the shebang runs node itself
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    raise RuntimeError(f"s3rver did not start on port {port}: {err[-2000:]}") from None
                time.sleep(0.1)
        yield S3rver(f"http://127.0.0.1:{port}", proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(data, ignore_errors=True)


def use_endpoint(endpoint: str) -> None:
    """boto3 clients made in this process from now on (genq's client among them) talk to ``endpoint``."""
    os.environ.update(AWS, AWS_ENDPOINT_URL=endpoint)
