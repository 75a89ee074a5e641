"""Per-key quotas and rate limits in the real Redis (over a limit -> 429 + Retry-After naming it); the commands."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from datetime import UTC, datetime

import httpx
import pytest
import redis
from api_server import ServeApi, make_key, session_for

from producer.api.auth import KeyQuotas, KeyStore
from producer.api.quotas import Quotas
from producer.contract import JobError
from producer.core import constants
from producer.core.store import JobStore
from producer.errors import QuotaExceeded
from producer.settings import ApiSettings

SNEAKERS = {"model": "fmnist-cgan", "label": "sneaker", "count": 2}


def test_max_queued_jobs_is_429_until_one_ends(serve_api: ServeApi, catalog: redis.Redis) -> None:
    server = serve_api()
    with session_for(server, make_key(catalog, "acme", max_queued=2)) as session:
        first, _ = (session.post("/v1/jobs", json=SNEAKERS).json() for _ in range(2))
        refused = session.post("/v1/jobs", json=SNEAKERS)
        assert refused.status_code == 429 and refused.headers["retry-after"].isdigit()
        detail = refused.json()["detail"][0]
        assert detail["loc"] == ["quota", "max_queued"] and "limit is 2" in detail["msg"]
        assert catalog.llen(constants.GENERATE_QUEUE) == 2

        JobStore(catalog, 3600).mark_failed(first["id"], JobError(type="Test", message="ended"))
        assert session.post("/v1/jobs", json=SNEAKERS).status_code == 202  # its slot is free again


def test_images_per_day_is_429_until_midnight_and_refused_submits_take_nothing(
    serve_api: ServeApi, catalog: redis.Redis
) -> None:
    server = serve_api()
    with session_for(server, make_key(catalog, "acme", images_per_day=10)) as session:
        assert session.post("/v1/jobs", json={**SNEAKERS, "count": 8}).status_code == 202
        assert session.post("/v1/jobs", json={**SNEAKERS, "label": "hat", "count": 2}).status_code == 422
        refused = session.post("/v1/jobs", json={**SNEAKERS, "count": 3})
        assert refused.status_code == 429
        detail = refused.json()["detail"][0]
        assert detail["loc"] == ["quota", "images_per_day"] and "2 of the key's 10 are left" in detail["msg"]
        now = datetime.now(UTC)
        to_midnight = 86400 - (now.hour * 3600 + now.minute * 60 + now.second)
        assert abs(int(refused.headers["retry-after"]) - to_midnight) <= 5
        assert session.post("/v1/jobs", json={**SNEAKERS, "count": 2}).status_code == 202  # exactly the rest
        assert catalog.llen(constants.GENERATE_QUEUE) == 2


def test_request_rate_limit_is_429_with_retry_after_then_refills(serve_api: ServeApi, catalog: redis.Redis) -> None:
    server = serve_api(rate_per_s=2.0, burst=3)
    with session_for(server, make_key(catalog, "acme")) as session:
        assert [session.get("/v1/models").status_code for _ in range(3)] == [200, 200, 200]
        refused = session.get("/v1/models")
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["detail"][0]["loc"] == ["quota", "rate"]
        with session_for(server, make_key(catalog, "globex")) as other:  # buckets are per key
            assert other.get("/v1/models").status_code == 200
        time.sleep(0.6)
        assert session.get("/v1/models").status_code == 200


def test_a_reservation_is_refunded_when_the_submit_fails(catalog: redis.Redis) -> None:
    principal = KeyStore(catalog).authenticate(make_key(catalog, "acme", max_queued=1, images_per_day=5))
    quotas = Quotas(catalog, ApiSettings(), job_ttl_s=3600)
    reservation = quotas.reserve(principal, "job-0000000001", 5)
    with pytest.raises(QuotaExceeded) as info:
        quotas.reserve(principal, "job-0000000002", 1)
    assert info.value.limit == "images_per_day"
    quotas.refund(reservation)
    assert quotas.reserve(principal, "job-0000000003", 5).images == 5  # both the images and the slot came back


def test_keys_create_prints_a_key_once_that_authenticates(redis_url: str, catalog: redis.Redis) -> None:
    env = {"GENQ_REDIS__URL": redis_url, "PATH": "/usr/bin:/bin"}
    argv = [sys.executable, "-m", "producer.cli", "keys", "create", "--tenant", "acme", "--name", "shop backend"]
    result = subprocess.run([*argv, "--max-queued", "7"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    principal = KeyStore(catalog).authenticate(key)
    assert principal.tenant == "acme" and principal.key.name == "shop backend"
    assert principal.key.quotas == KeyQuotas(max_queued=7)

    bad = subprocess.run([*argv[:-4], "--tenant", "../etc"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "tenant" in bad.stderr


def test_genq_api_command_serves_the_app_on_the_given_port(redis_url: str, catalog: redis.Redis) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"GENQ_REDIS__URL": redis_url, "PATH": "/usr/bin:/bin"}
    argv = [sys.executable, "-m", "producer.cli", "api", "--port", str(port), "--loglevel", "warning"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
                time.sleep(0.2)
        key = make_key(catalog, "acme")
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert [m["name"] for m in models.json()] == ["fmnist-cgan"]
    finally:
        proc.terminate()
        proc.wait(10)
