"""``provenance`` through the HTTP API (real uvicorn and Redis): chosen per request, or required by the API key."""

from __future__ import annotations

import httpx
import pytest
import redis
from api_server import ApiServer, make_key, session_for

from producer.core import constants

SNEAKERS = {"model": "fmnist-cgan", "label": "sneaker", "count": 2, "seed": 42}


def _queued(db: redis.Redis) -> int:
    return sum(db.llen(queue) for queue in constants.GENERATE_QUEUES.values())


@pytest.mark.parametrize(
    ("body", "expected"), [({}, "xmp"), ({"provenance": "xmp"}, "xmp"), ({"provenance": "c2pa"}, "c2pa")]
)
def test_a_request_chooses_its_provenance_and_the_job_keeps_it(
    acme: httpx.Client, catalog: redis.Redis, body: dict[str, str], expected: str
) -> None:
    created = acme.post("/v1/jobs", json={**SNEAKERS, **body})

    assert created.status_code == 202, created.text
    assert created.json()["provenance"] == expected
    assert acme.get(f"/v1/jobs/{created.json()['id']}").json()["provenance"] == expected


@pytest.mark.parametrize("value", ["C2PA", "c2pa-signed", "", None, 1])
def test_an_unknown_provenance_is_refused_naming_the_field(
    acme: httpx.Client, catalog: redis.Redis, value: object
) -> None:
    response = acme.post("/v1/jobs", json={**SNEAKERS, "provenance": value})

    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["loc"] == ["body", "provenance"] and "xmp" in detail["msg"] and "c2pa" in detail["msg"]
    assert _queued(catalog) == 0


def test_a_key_that_requires_c2pa_signs_every_job_and_refuses_xmp(api: ApiServer, catalog: redis.Redis) -> None:
    with session_for(api, make_key(catalog, "newsroom", provenance="c2pa")) as newsroom:
        omitted = newsroom.post("/v1/jobs", json=SNEAKERS)
        asked = newsroom.post("/v1/jobs", json={**SNEAKERS, "seed": 7, "provenance": "c2pa"})
        refused = newsroom.post("/v1/jobs", json={**SNEAKERS, "seed": 8, "provenance": "xmp"})

    assert omitted.status_code == asked.status_code == 202, (omitted.text, asked.text)
    assert omitted.json()["provenance"] == asked.json()["provenance"] == "c2pa"
    assert refused.status_code == 422
    [detail] = refused.json()["detail"]
    assert detail["loc"] == ["body", "provenance"] and "requires provenance 'c2pa'" in detail["msg"]
    assert _queued(catalog) == 2


def test_a_replayed_request_of_a_c2pa_key_answers_the_same_job(api: ApiServer, catalog: redis.Redis) -> None:
    with session_for(api, make_key(catalog, "newsroom", provenance="c2pa")) as newsroom:
        first = newsroom.post("/v1/jobs", json=SNEAKERS, headers={"Idempotency-Key": "batch-1"})
        again = newsroom.post("/v1/jobs", json=SNEAKERS, headers={"Idempotency-Key": "batch-1"})

    assert (first.status_code, again.status_code) == (202, 200), (first.text, again.text)
    assert again.json()["id"] == first.json()["id"] and again.json()["provenance"] == "c2pa"


def test_genq_keys_create_stores_the_required_provenance(redis_url: str, catalog: redis.Redis) -> None:
    import subprocess
    import sys

    from producer.api.auth import KeyStore

    env = {"GENQ_REDIS__URL": redis_url, "PATH": "/usr/bin:/bin"}
    argv = [sys.executable, "-m", "producer.cli", "keys", "create", "--tenant", "newsroom", "--provenance"]
    made = subprocess.run([*argv, "c2pa"], env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert KeyStore(catalog).authenticate(made.stdout.strip()).key.quotas.provenance == "c2pa"

    bad = subprocess.run([*argv, "signed"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "provenance" in bad.stderr
