"""Per-key quotas and rate limits in the real Redis (over a limit -> 429 + Retry-After naming it); the commands."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis
from api_server import ServeApi, make_key, session_for

from producer.api.auth import KeyQuotas, KeyStore
from producer.api.quotas import Quotas
from producer.contract import FineTuneJob, JobError
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
    granted = ["--max-queued", "7", "--max-priority", "high", "--train-images-per-day", "5000", "--max-finetunes", "3"]
    granted += ["--dataset-bytes", "1000000"]
    result = subprocess.run([*argv, *granted], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    principal = KeyStore(catalog).authenticate(key)
    assert principal.tenant == "acme" and principal.key.name == "shop backend"
    assert principal.key.quotas == KeyQuotas(
        max_queued=7, max_priority="high", train_images_per_day=5000, max_finetunes=3, dataset_bytes=1_000_000
    )
    urgent = subprocess.run([*argv, "--max-priority", "urgent"], env=env, capture_output=True, text=True, timeout=60)
    assert urgent.returncode == 2 and "max_priority" in urgent.stderr

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


FINETUNE: dict[str, Any] = {"base": "fmnist-cgan", "dataset": "abc123/data.zip", "name": "brand-x", "steps": 50}


def test_training_is_metered_by_steps_times_batch_and_refusals_take_nothing(
    serve_api: ServeApi, catalog: redis.Redis
) -> None:
    # The attack: a key limited to 50 images a day was accepted for a fine-tune of 200,000 steps x batch 512.
    server = serve_api()
    with session_for(server, make_key(catalog, "acme", images_per_day=50, train_images_per_day=10_000)) as acme:
        huge = acme.post("/v1/finetunes", json={**FINETUNE, "steps": 200_000, "batch_size": 512})
        assert huge.status_code == 429, huge.text
        detail = huge.json()["detail"][0]
        assert detail["loc"] == ["quota", "train_images_per_day"]
        assert "102,400,000 training images" in detail["msg"] and "10,000" in detail["msg"]
        assert catalog.llen(constants.TRAIN_QUEUE) == 0 and not catalog.keys("genq:job:*")

        fits = acme.post("/v1/finetunes", json={**FINETUNE, "steps": 100, "batch_size": 64})  # 6,400
        assert fits.status_code == 202, fits.text
        over = acme.post("/v1/finetunes", json={**FINETUNE, "steps": 100, "batch_size": 64})  # 12,800 > 10,000
        assert over.status_code == 429 and over.json()["detail"][0]["loc"] == ["quota", "train_images_per_day"]
        assert catalog.llen(constants.TRAIN_QUEUE) == 1


def test_fine_tunes_at_once_are_limited_per_key(serve_api: ServeApi, catalog: redis.Redis) -> None:
    server = serve_api()
    with session_for(server, make_key(catalog, "acme", max_finetunes=1)) as acme:
        assert acme.post("/v1/finetunes", json=FINETUNE).status_code == 202
        second = acme.post("/v1/finetunes", json=FINETUNE)
        assert second.status_code == 429 and second.json()["detail"][0]["loc"] == ["quota", "max_finetunes"]
        with session_for(server, make_key(catalog, "globex", max_finetunes=1)) as globex:  # per key
            assert globex.post("/v1/finetunes", json=FINETUNE).status_code == 202
        assert acme.post("/v1/jobs", json={"model": "fmnist-cgan", "label": 7, "count": 1}).status_code == 202


def test_a_refused_fine_tune_gives_every_quota_back(catalog: redis.Redis) -> None:
    principal = KeyStore(catalog).authenticate(make_key(catalog, "acme", max_queued=1, max_finetunes=2))
    quotas = Quotas(catalog, ApiSettings(), job_ttl_s=3600)
    job = FineTuneJob.model_validate(
        {
            "job_id": "job-ft-0000001",
            "base": "fmnist-cgan",
            "base_name": "fmnist-cgan",
            "base_version": "1",
            "dataset_key": "tenants/acme/datasets/x/",
            "name": "brand-x",
            "steps": 10,
            "batch_size": 8,
            "lr_g": 2e-4,
            "lr_d": 2e-4,
            "augment": {},
            "freeze_d": 0,
            "sample_every": 5,
            "checkpoint_every": 5,
            "seed": 1,
            "tenant": "acme",
            "created_at": "2026-12-07T00:00:00Z",
        }
    )
    first = quotas.admit(principal, job)
    with pytest.raises(QuotaExceeded) as info:  # the queued slot is taken: the fine-tune slot goes back too
        quotas.admit(principal, job.model_copy(update={"job_id": "job-ft-0000002"}))
    assert info.value.limit == "max_queued"
    assert catalog.zcard(constants.API_KEY_FINETUNES_KEY.format(key_id=principal.key_id)) == 1
    quotas.refund(first)
    assert catalog.zcard(constants.API_KEY_FINETUNES_KEY.format(key_id=principal.key_id)) == 0
    day = first.day
    assert int(catalog.get(constants.API_KEY_TRAIN_IMAGES_KEY.format(key_id=principal.key_id, day=day)) or 0) == 0
