"""Shared fixtures: real Redis (a dedicated DB, flushed per test) and a real S3 server (moto) on loopback."""

from __future__ import annotations

import os

# Two cores run the test process and worker subprocesses at once: torch's default of one thread per core in each
# oversubscribes them and OpenMP spin-waits make everything several times slower. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import threading  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import boto3  # noqa: E402
import pytest  # noqa: E402
import redis  # noqa: E402
from webhook_receiver import WebhookReceiver  # noqa: E402

from producer.core.settings import DEV_WEBHOOK_SECRET

if TYPE_CHECKING:
    from c2pa_chain import SigningChain

# A test run flushes its Redis database before and after every test: two runs on one machine (a developer's and CI's,
# or two branches) must never share one. Each run claims a free database of the local Redis, by a key in database 0
# that it renews while it runs and deletes at the end (one left by a killed run lapses within CLAIM_TTL_S).
# GENQ_TEST_REDIS_URL names a database to use instead.
REDIS_BASE_URL = "redis://127.0.0.1:6379"
CLAIM_KEY = "genq-tests:claim:{db}"
CLAIM_TTL_S = 120
CLAIM_ORDER = (13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 14, 15)


class _DatabaseClaim:
    """One run's claim on a Redis database, renewed by a daemon thread until :meth:`release`."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.token = f"{os.getpid()}-{uuid.uuid4().hex}"
        self.db: int | None = None
        self._stop = threading.Event()

    def take(self) -> int:
        for db in CLAIM_ORDER:
            if self.client.set(CLAIM_KEY.format(db=db), self.token, nx=True, ex=CLAIM_TTL_S):
                self.db = db
                threading.Thread(target=self._renew, name="genq-test-db-claim", daemon=True).start()
                return db
        raise RuntimeError(f"every Redis database {CLAIM_ORDER} is claimed by another test run")

    def _renew(self) -> None:
        while not self._stop.wait(CLAIM_TTL_S / 4):
            self.client.expire(CLAIM_KEY.format(db=self.db), CLAIM_TTL_S)

    def release(self) -> None:
        self._stop.set()
        key = CLAIM_KEY.format(db=self.db)
        if self.client.get(key) == self.token.encode():
            self.client.delete(key)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database of this test run's own."""
    fixed = os.environ.get("GENQ_TEST_REDIS_URL")
    client = redis.Redis.from_url(fixed or f"{REDIS_BASE_URL}/0")
    try:
        client.ping()
    except redis.ConnectionError as exc:  # pragma: no cover - CI starts Redis; say so when it is missing
        pytest.fail(f"Redis is not reachable ({exc}); start redis-server on 6379 or set GENQ_TEST_REDIS_URL")
    if fixed:
        yield fixed
        return
    claim = _DatabaseClaim(client)
    try:
        db = claim.take()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield f"{REDIS_BASE_URL}/{db}"
    finally:
        claim.release()
        client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free 127.0.0.1 port, reached over HTTP by real boto3."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point boto3 (in this process and in child processes) at the moto server with dummy credentials."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_endpoint


@pytest.fixture
def s3_bucket(aws_env: str) -> str:
    """A fresh, empty bucket per test."""
    name = f"genq-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=aws_env).create_bucket(Bucket=name)
    return name


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """A started receiver that verifies against the dev secret and answers 200; ``script()`` changes that."""
    receiver = WebhookReceiver(secret=DEV_WEBHOOK_SECRET)
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def c2pa_chain(tmp_path_factory: pytest.TempPathFactory) -> SigningChain:
    """A throwaway CA + ES256 leaf chain for Content Credentials, in a temporary folder (never in the repository)."""
    from c2pa_chain import make_chain

    return make_chain(tmp_path_factory.mktemp("c2pa"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every collected test a node id of its own. schemathesis gives each API operation's case of one test the
    same node id (the operation is only in the item's name): pytest-xdist schedules by node id, so the README's
    parallel run would run one operation of the API fuzz test and silently drop the others."""
    seen: dict[str, int] = {}
    for item in items:
        seen[item.nodeid] = seen.get(item.nodeid, 0) + 1
    for item in items:
        if seen[item.nodeid] > 1 and item.parent is not None:
            item._id = item.parent.id.child(item.name)  # what pytest gives an item it names itself
    ids = [item.nodeid for item in items]
    assert len(set(ids)) == len(ids), sorted({i for i in ids if ids.count(i) > 1})
