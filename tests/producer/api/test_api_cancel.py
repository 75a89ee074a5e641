"""Cancel and priorities through the HTTP API on real uvicorn and Redis (no worker: jobs stay where they are put)."""

from __future__ import annotations

import re

import httpx
import redis
from api_server import ApiServer, make_key, session_for

from producer.core import constants
from producer.core.store import JobStore

SNEAKERS = {"model": "fmnist-cgan", "label": "sneaker", "count": 2, "seed": 42}


def test_cancel_answers_the_canceled_job_then_409_naming_its_status(acme: httpx.Client, catalog: redis.Redis) -> None:
    job_id = acme.post("/v1/jobs", json=SNEAKERS).json()["id"]
    canceled = acme.post(f"/v1/jobs/{job_id}/cancel")
    assert canceled.status_code == 200, canceled.text
    view = canceled.json()
    assert view["status"] == "canceled" and view["finished_at"] and view["outputs"] == []
    assert acme.get(f"/v1/jobs/{job_id}").json() == view

    again = acme.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409
    (detail,) = again.json()["detail"]
    assert detail["loc"] == ["path", "job_id"] and detail["type"] == "job_ended" and "already canceled" in detail["msg"]


def test_cancel_of_a_finished_job_is_409_and_changes_nothing(acme: httpx.Client, catalog: redis.Redis) -> None:
    job_id = acme.post("/v1/jobs", json=SNEAKERS).json()["id"]
    catalog.hset(f"genq:job:{job_id}", "status", "succeeded")  # as a worker would leave it
    response = acme.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 409 and "already succeeded" in response.json()["detail"][0]["msg"]
    assert acme.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"


def test_a_tenant_cannot_cancel_another_tenants_job(
    acme: httpx.Client, globex: httpx.Client, catalog: redis.Redis
) -> None:
    job_id = acme.post("/v1/jobs", json=SNEAKERS).json()["id"]
    refused = globex.post(f"/v1/jobs/{job_id}/cancel")
    assert refused.status_code == 404 and refused.json()["detail"][0]["loc"] == ["path", "job_id"]
    assert globex.post("/v1/jobs/unknown-job-1234/cancel").status_code == 404
    assert acme.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"


def test_a_canceled_job_frees_its_queued_slot(api: ApiServer, catalog: redis.Redis) -> None:
    with session_for(api, make_key(catalog, "acme", max_queued=1)) as acme:
        first = acme.post("/v1/jobs", json=SNEAKERS).json()["id"]
        assert acme.post("/v1/jobs", json=SNEAKERS).status_code == 429
        assert acme.post(f"/v1/jobs/{first}/cancel").status_code == 200
        assert acme.post("/v1/jobs", json=SNEAKERS).status_code == 202


def test_priority_picks_the_queue_and_shows_in_the_view(api: ApiServer, catalog: redis.Redis) -> None:
    with session_for(api, make_key(catalog, "acme", max_priority="high")) as acme:
        for priority in ("high", "low", "normal"):
            view = acme.post("/v1/jobs", json={**SNEAKERS, "priority": priority}).json()
            assert view["priority"] == priority
        assert acme.post("/v1/jobs", json=SNEAKERS).json()["priority"] == "normal"
        depths = {queue: catalog.llen(queue) for queue in constants.GENERATE_QUEUES.values()}
        assert depths == {"generate.high": 1, "generate": 2, "generate.low": 1}

        refused = acme.post("/v1/jobs", json={**SNEAKERS, "priority": "urgent"})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "priority"]
        assert sum(catalog.llen(queue) for queue in constants.GENERATE_QUEUES.values()) == 4


def test_a_key_cannot_ask_for_a_priority_above_its_own(api: ApiServer, catalog: redis.Redis) -> None:
    # The attack: a tenant's bulk jobs at "high" delayed another tenant's 1-image job from 0.5 s to 16.9 s.
    with session_for(api, make_key(catalog, "acme")) as acme:  # the default: normal at most
        refused = acme.post("/v1/jobs", json={**SNEAKERS, "priority": "high"})
        assert refused.status_code == 422, refused.text
        detail = refused.json()["detail"][0]
        assert detail["loc"] == ["body", "priority"] and "'normal' at most" in detail["msg"]
        assert sum(catalog.llen(queue) for queue in constants.GENERATE_QUEUES.values()) == 0
        assert acme.get("/v1/jobs").json()["items"] == []  # nothing recorded either
        assert acme.post("/v1/jobs", json={**SNEAKERS, "priority": "low"}).status_code == 202


def _jobs_gauge(metrics_text: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r'^genq_jobs\{status="(\w+)"\} (\S+)$', metrics_text, re.M)}


def test_metrics_count_jobs_by_status_through_submit_start_and_cancel(
    api: ApiServer, acme: httpx.Client, catalog: redis.Redis
) -> None:
    before = httpx.get(f"{api.url}/metrics").text
    assert "# TYPE genq_jobs gauge" in before
    assert _jobs_gauge(before) == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "canceled": 0}

    first, second, _ = (acme.post("/v1/jobs", json=SNEAKERS).json()["id"] for _ in range(3))
    assert acme.post(f"/v1/jobs/{first}/cancel").status_code == 200
    assert acme.post(f"/v1/jobs/{first}/cancel").status_code == 409  # refused: counts nothing
    JobStore(catalog, 3600).start(second)  # as a worker would
    after = _jobs_gauge(httpx.get(f"{api.url}/metrics").text)
    assert after == {"queued": 1, "running": 1, "succeeded": 0, "failed": 0, "canceled": 1}
