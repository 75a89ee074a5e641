"""The HTTP API's memory under hostile data set uploads, measured on `genq api` as a real subprocess.

    python -m benchmarks.uploads [--redis redis://127.0.0.1:6379/14] [--uploads 4] [--mb 250]

Three fresh API processes (VmHWM is the peak since a process started, so each scenario gets its own), each warmed up
by one /healthz and one small authenticated upload (boto3 loaded, routes compiled), then:

(idle)   nothing more: the warmed-up process's RSS;
(unauth) ``--uploads`` parallel unauthenticated chunked uploads of ``--mb`` MB each to ``POST /v1/datasets``
         (answered 401);
(over)   ``--uploads`` parallel authenticated chunked uploads past ``GENQ_API__MAX_DATASET_BYTES`` (the 256 MiB
         default; ``--mb`` or the limit + 16 MiB, whichever is larger), answered 413 when they pass it; the route
         spools past 8 MiB to disk.

Reads VmRSS (idle) and VmHWM (peak) from /proc/<pid>/status of the API process and prints one table and one
`name=value` line per figure. Starts a moto S3 server in this process; claims the Redis DB against concurrent test
runs (tests/conftest.py's claim key) and flushes it. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from benchmarks.throughput import AWS, start_s3
from producer.api.auth import KeyStore
from producer.settings import ApiSettings

_MB = 1000 * 1000
_MIB = 1024 * 1024
_CHUNK = b"\0" * (256 * 1024)
_CLAIM_KEY = "genq-tests:claim:{db}"  # tests/conftest.py: a test run never takes a DB claimed here
_CLAIM_TTL_S = 600


@contextmanager
def claimed_db(redis_url: str) -> Iterator[redis.Redis]:
    """The benchmark's Redis DB, flushed, claimed for the run so a concurrent test run does not take (and flush) it.

    Raises:
        RuntimeError: a test run holds that DB; pass another with --redis.
    """
    client = redis.Redis.from_url(redis_url)
    db = int(client.connection_pool.connection_kwargs.get("db", 0))
    admin = redis.Redis.from_url(redis_url, db=0)
    token = f"bench-{os.getpid()}"
    if not admin.set(_CLAIM_KEY.format(db=db), token, nx=True, ex=_CLAIM_TTL_S):
        raise RuntimeError(f"Redis DB {db} is claimed by a test run; pass another with --redis")
    try:
        client.flushdb()
        yield client
    finally:
        client.flushdb()
        if admin.get(_CLAIM_KEY.format(db=db)) == token.encode():
            admin.delete(_CLAIM_KEY.format(db=db))


def proc_status_mib(pid: int, field: str) -> float:
    """A memory field of /proc/<pid>/status (``VmRSS``, ``VmHWM``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def api_process(redis_url: str, endpoint: str, bucket: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`python -m producer.cli api` on a free loopback port, ready (``/healthz`` answers) when entered."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "AWS_"))}
    env.update(AWS, AWS_ENDPOINT_URL=endpoint, GENQ_REDIS__URL=redis_url, GENQ_S3__BUCKET=bucket)
    log = Path(tempfile.mkstemp(prefix="genq-bench-api-", suffix=".log")[1])
    with log.open("wb") as out:
        argv = [sys.executable, "-m", "producer.cli", "api", "--port", str(port), "--loglevel", "warning"]
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start; see {log}")
            time.sleep(0.1)
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(30)


@dataclass(frozen=True)
class Sent:
    status: int
    sent_bytes: int
    seconds: float


def chunked_upload(port: int, total: int, key: str | None) -> Sent:
    """POST ``total`` bytes as a chunked body over a raw socket, as an attacker's script would: everything, unless
    the server closes the connection first."""
    started = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (
        "POST /v1/datasets?filename=data.zip HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/octet-stream\r\n{auth}Transfer-Encoding: chunked\r\n\r\n"
    )
    sock.sendall(head.encode())
    sent = 0
    try:
        while sent < total:
            sock.sendall(b"%x\r\n" % len(_CHUNK) + _CHUNK + b"\r\n")
            sent += len(_CHUNK)
        sock.sendall(b"0\r\n\r\n")
    except OSError:  # the server answered and closed while we were still sending
        pass
    answer = b""
    try:
        while b"\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    except OSError:
        pass
    finally:
        sock.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1") else 0
    return Sent(status, sent, time.perf_counter() - started)


def run_scenario(
    redis_url: str, endpoint: str, bucket: str, key: str, uploads: int, size: int, authenticated: bool | None
) -> tuple[float, float, list[Sent]]:
    """(idle RSS MiB, peak RSS MiB, what each upload got) of a fresh API process; ``authenticated`` None: idle."""
    with api_process(redis_url, endpoint, bucket) as (proc, url):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as session:
            warm = session.post("/v1/datasets", params={"filename": "warm.zip"}, content=b"PK" * 512)
            if warm.status_code != 201:
                raise RuntimeError(f"warm-up upload answered {warm.status_code}: {warm.text}")
        time.sleep(0.5)
        idle = proc_status_mib(proc.pid, "VmRSS")
        results: list[Sent] = []
        if authenticated is not None:
            port = int(url.rsplit(":", 1)[1])
            sender = key if authenticated else None
            with ThreadPoolExecutor(uploads) as pool:
                results = list(pool.map(lambda _: chunked_upload(port, size, sender), range(uploads)))
        peak = proc_status_mib(proc.pid, "VmHWM")
    return idle, peak, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14", help="a Redis DB this benchmark may flush")
    parser.add_argument("--uploads", type=int, default=4, help="uploads sent at once")
    parser.add_argument("--mb", type=int, default=250, help="size of each unauthenticated upload, MB")
    args = parser.parse_args()
    limit = ApiSettings().max_dataset_bytes
    unauth_size = args.mb * _MB
    over_size = max(unauth_size, limit + 16 * _MIB)

    bucket = "bench-uploads"
    server, endpoint = start_s3(bucket)
    try:
        with claimed_db(args.redis):
            key, _ = KeyStore(redis.Redis.from_url(args.redis)).create("bench", name="uploads benchmark")
            scenarios = {
                "idle": run_scenario(args.redis, endpoint, bucket, key, args.uploads, 0, None),
                "unauth": run_scenario(args.redis, endpoint, bucket, key, args.uploads, unauth_size, False),
                "over": run_scenario(args.redis, endpoint, bucket, key, args.uploads, over_size, True),
            }
    finally:
        server.stop()

    print(f"machine: {os.cpu_count()} cores; API: `python -m producer.cli api` (uvicorn, one process)")
    print(f"GENQ_API__MAX_DATASET_BYTES={limit} (default); {args.uploads} uploads at once, 256 KiB chunks\n")
    idle_rss = scenarios["idle"][0]
    print(f"{'scenario':<62}{'idle MiB':>10}{'peak MiB':>10}{'peak/idle':>10}")
    names = {
        "idle": "idle (warmed up)",
        "unauth": f"{args.uploads} x {args.mb} MB unauthenticated chunked uploads",
        "over": f"{args.uploads} x {over_size / _MB:.0f} MB authenticated uploads past the limit",
    }
    for name, (idle, peak, _results) in scenarios.items():
        print(f"{names[name]:<62}{idle:>10.1f}{peak:>10.1f}{peak / idle:>10.2f}")
    print()
    for name in ("unauth", "over"):
        results = scenarios[name][2]
        statuses = ",".join(str(s.status) for s in results)
        taken = max(s.sent_bytes for s in results) / _MIB
        slowest = max(s.seconds for s in results)
        print(f"{name}: answers {statuses}; sent up to {taken:.0f} MiB; slowest {slowest:.1f} s")
    print()
    unauth_idle, unauth_peak, _ = scenarios["unauth"]
    over_idle, over_peak, _ = scenarios["over"]
    for figure, value in [
        ("api_idle_rss_mib", idle_rss),
        ("api_idle_peak_rss_mib", scenarios["idle"][1]),
        ("api_peak_rss_mib_unauth_uploads", unauth_peak),
        ("api_peak_over_idle_unauth", unauth_peak / unauth_idle),
        ("api_peak_rss_mib_oversized_uploads", over_peak),
        ("api_peak_over_idle_oversized", over_peak / over_idle),
    ]:
        print(f"{figure}={value:.3f}")


if __name__ == "__main__":
    main()
