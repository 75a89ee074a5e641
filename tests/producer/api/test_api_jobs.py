"""The /v1 job routes on real uvicorn and Redis: create, get, list, tenants, keys, idempotency, bad input."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis
from api_server import ApiServer, ServeApi, make_key, session_for
from shipped import CGAN_LATEST, CGAN_LATEST_REF

from producer.core import constants

SNEAKERS = {"model": "fmnist-cgan", "label": "sneaker", "count": 2, "seed": 42}


def _nothing_enqueued(db: redis.Redis) -> bool:
    queued = sum(db.llen(queue) for queue in constants.GENERATE_QUEUES.values())
    return queued == 0 and not db.keys("genq:job:*")


def test_create_answers_202_with_the_queued_job_and_get_returns_it(acme: httpx.Client, catalog: redis.Redis) -> None:
    created = acme.post("/v1/jobs", json={**SNEAKERS, "metadata": {"sku": "SNK-1"}})
    assert created.status_code == 202, created.text
    view = created.json()
    assert view["status"] == "queued" and view["tenant"] == "acme" and view["model_version"] == CGAN_LATEST_REF
    assert view["progress"] == {"done": 0, "total": 2} and view["metadata"] == {"sku": "SNK-1"}
    assert created.headers["location"] == f"/v1/jobs/{view['id']}"
    assert catalog.llen(constants.GENERATE_QUEUE) == 1

    got = acme.get(f"/v1/jobs/{view['id']}")
    assert got.status_code == 200 and got.json() == view


def test_list_pages_newest_first_with_an_opaque_cursor_and_filters(acme: httpx.Client, catalog: redis.Redis) -> None:
    ids = [acme.post("/v1/jobs", json={**SNEAKERS, "seed": i}).json()["id"] for i in range(5)]
    pages, cursor = [], None
    while True:
        page = acme.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        pages.append([job["id"] for job in page.json()["items"]])
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert pages == [ids[4:2:-1], ids[2:0:-1], ids[:1]]

    assert len(acme.get("/v1/jobs", params={"status": "queued"}).json()["items"]) == 5
    assert acme.get("/v1/jobs", params={"status": "succeeded"}).json() == {"items": [], "next_cursor": None}
    assert len(acme.get("/v1/jobs", params={"model": CGAN_LATEST_REF}).json()["items"]) == 5
    assert acme.get("/v1/jobs", params={"model": "other-gan"}).json()["items"] == []


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"limit": 101}, ["query", "limit"]),
        ({"limit": 0}, ["query", "limit"]),
        ({"status": "done"}, ["query", "status"]),
        ({"cursor": "not-a-cursor!"}, ["query", "cursor"]),
        ({"cursor": "bmFuOng="}, ["query", "cursor"]),  # "nan:x": a float, but no score Redis takes (was a 503)
        ({"cursor": "aW5mOng="}, ["query", "cursor"]),  # "inf:x"
        ({"cursor": "MTIzOg=="}, ["query", "cursor"]),  # "123:" with no job id
    ],
)
def test_list_refuses_bad_parameters_naming_them(acme: httpx.Client, params: dict[str, Any], loc: list[str]) -> None:
    response = acme.get("/v1/jobs", params=params)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == loc


def test_a_tenant_never_sees_another_tenants_jobs(
    acme: httpx.Client, globex: httpx.Client, catalog: redis.Redis
) -> None:
    job_id = acme.post("/v1/jobs", json=SNEAKERS).json()["id"]
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}/deliveries"):
        foreign, unknown = globex.get(path), globex.get(path.replace(job_id, "0" * 32))
        assert foreign.status_code == unknown.status_code == 404  # not 403: a foreign id looks like no id at all
        assert foreign.json()["detail"][0]["loc"] == ["path", "job_id"]
    assert globex.get("/v1/jobs").json()["items"] == []
    assert [j["id"] for j in acme.get("/v1/jobs").json()["items"]] == [job_id]


def test_a_job_submitted_without_a_tenant_is_invisible_to_the_api(acme: httpx.Client, catalog: redis.Redis) -> None:
    from producer.client import Client
    from producer.contract import GenerateRequest
    from producer.core.settings import RedisSettings
    from producer.settings import ClientSettings

    url = catalog.connection_pool.connection_kwargs
    client = Client(ClientSettings(redis=RedisSettings(url=f"redis://{url['host']}:{url['port']}/{url['db']}")))
    job = client.submit(GenerateRequest.model_validate(SNEAKERS))
    assert job.tenant is None
    assert acme.get(f"/v1/jobs/{job.id}").status_code == 404


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer genq_unknown", "Bearer not-a-genq-key", "Basic YWNtZTpzZWNyZXQ=", "Bearer"],
    ids=["missing", "unknown", "foreign-format", "basic", "empty"],
)
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/0123456789abcdef", "/v1/models"])
def test_missing_or_unknown_key_is_401_with_a_bearer_challenge(
    api: ApiServer, catalog: redis.Redis, authorization: str | None, path: str
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.get(f"{api.url}{path}", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["detail"][0]["loc"] == ["header", "Authorization"]
    post = httpx.post(f"{api.url}/v1/jobs", json=SNEAKERS, headers=headers)
    assert post.status_code == 401 and _nothing_enqueued(catalog)


def test_idempotency_key_replays_the_job_and_refuses_another_body(
    acme: httpx.Client, globex: httpx.Client, catalog: redis.Redis
) -> None:
    first = acme.post("/v1/jobs", json=SNEAKERS, headers={"Idempotency-Key": "order-77"})
    again = acme.post("/v1/jobs", json=SNEAKERS, headers={"Idempotency-Key": "order-77"})
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]

    conflict = acme.post("/v1/jobs", json={**SNEAKERS, "count": 3}, headers={"Idempotency-Key": "order-77"})
    assert conflict.status_code == 409
    assert conflict.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert first.json()["id"] in conflict.json()["detail"][0]["msg"]

    in_body = acme.post("/v1/jobs", json={**SNEAKERS, "idempotency_key": "order-77"})  # the body field is the same key
    assert in_body.status_code == 200 and in_body.json()["id"] == first.json()["id"]
    body_conflict = acme.post("/v1/jobs", json={**SNEAKERS, "count": 3, "idempotency_key": "order-77"})
    assert body_conflict.status_code == 409 and body_conflict.json()["detail"][0]["loc"] == ["body", "idempotency_key"]

    other_tenant = globex.post("/v1/jobs", json={**SNEAKERS, "count": 3}, headers={"Idempotency-Key": "order-77"})
    assert other_tenant.status_code == 202 and other_tenant.json()["id"] != first.json()["id"]
    assert catalog.llen(constants.GENERATE_QUEUE) == 2


def test_idempotency_header_and_body_field_must_agree(acme: httpx.Client, catalog: redis.Redis) -> None:
    response = acme.post("/v1/jobs", json={**SNEAKERS, "idempotency_key": "a"}, headers={"Idempotency-Key": "b"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert _nothing_enqueued(catalog)


def test_oversized_body_is_refused_with_413_before_it_is_parsed(acme: httpx.Client, catalog: redis.Redis) -> None:
    huge = {**SNEAKERS, "metadata": {"blob": "x" * 70_000}}
    response = acme.post("/v1/jobs", json=huge)
    assert response.status_code == 413
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body"] and "GENQ_API__MAX_BODY_BYTES" in detail["msg"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "fmnist-cgan", "label": 1, "metadata": {"blob": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}}'

    chunked = acme.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413
    small = acme.post(
        "/v1/jobs",
        content=iter([b'{"model": "fmnist-cgan", ', b'"label": 1}']),
        headers={"Content-Type": "application/json"},
    )
    assert small.status_code == 202, small.text  # a small chunked body still gets through
    catalog.delete(constants.GENERATE_QUEUE, *catalog.keys("genq:job:*"))
    assert _nothing_enqueued(catalog)


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({**SNEAKERS, "colour": "red"}, ["body", "colour"]),
        ({**SNEAKERS, "count": "eight"}, ["body", "count"]),
        ({**SNEAKERS, "count": 0}, ["body", "count"]),
        ({**SNEAKERS, "count": 10**7}, ["body", "count"]),
        ({"model": "fmnist-cgan", "counts": {"bag": 10**9}}, ["body", "counts"]),
        ({**SNEAKERS, "seed": -1}, ["body", "seed"]),
        ({**SNEAKERS, "label": "hat"}, ["body", "label"]),
        ({"model": "fmnist-cgan", "counts": {"hat": 1}}, ["body", "counts", "hat"]),
        ({**SNEAKERS, "model": "shoe-gan"}, ["body", "model"]),
        ({**SNEAKERS, "model": "Not A Model!"}, ["body", "model"]),
        ({**SNEAKERS, "format": "gif"}, ["body", "format"]),
        ({**SNEAKERS, "callback": {"url": "ftp://shop.example/hook"}}, ["body", "callback", "url"]),
        ({**SNEAKERS, "callback": {"url": "not a url"}}, ["body", "callback", "url"]),
        ({**SNEAKERS, "callback": {"url": "https://shop.example/h", "events": ["exploded"]}}, ["body", "callback"]),
        ({**SNEAKERS, "metadata": {"blob": "x" * 5000}}, ["body", "metadata"]),
        ({"label": "sneaker"}, ["body", "model"]),
        ([1, 2, 3], ["body"]),
    ],
)
def test_bad_requests_name_the_field_and_enqueue_nothing(
    acme: httpx.Client, catalog: redis.Redis, body: Any, loc: list[str]
) -> None:
    response = acme.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    locs = [d["loc"] for d in response.json()["detail"]]
    assert any(found[: len(loc)] == loc for found in locs), locs
    assert all(d["msg"] for d in response.json()["detail"])
    assert _nothing_enqueued(catalog)


def test_body_that_is_not_json_is_422_at_the_body(acme: httpx.Client, catalog: redis.Redis) -> None:
    response = acme.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"][0] == "body"
    assert _nothing_enqueued(catalog)


def test_malformed_job_id_is_422_and_unknown_is_404(acme: httpx.Client) -> None:
    assert acme.get("/v1/jobs/../../etc").status_code == 404  # no route
    bad = acme.get("/v1/jobs/a b")
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["path", "job_id"]
    assert acme.get("/v1/jobs/0123456789abcdef").status_code == 404


def test_models_lists_the_catalogue(acme: httpx.Client) -> None:
    models = acme.get("/v1/models").json()
    assert [m["name"] for m in models] == ["fmnist-cgan"]
    assert (
        models[0]["aliases"] == {"latest": CGAN_LATEST}
        and "sneaker" in models[0]["versions"][CGAN_LATEST]["class_names"]
    )


def test_healthz_needs_nothing_and_readyz_checks_redis_and_s3(
    serve_api: ServeApi, catalog: redis.Redis, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert httpx.get(f"{serve_api().url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{serve_api(bucket=s3_bucket).url}/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "checks": {"redis": "ok", "s3": "ok"}}

    missing_bucket = httpx.get(f"{serve_api(bucket='no-such-bucket').url}/readyz")
    assert missing_bucket.status_code == 503 and missing_bucket.json()["checks"]["s3"].startswith("unreachable")

    no_redis = httpx.get(f"{serve_api(bucket=s3_bucket, redis_url_='redis://127.0.0.1:1/0').url}/readyz")
    assert no_redis.status_code == 503
    assert no_redis.json()["checks"]["redis"].startswith("unreachable") and no_redis.json()["checks"]["s3"] == "ok"


def test_readyz_is_503_naming_s3_when_s3_is_unreachable(
    serve_api: ServeApi, catalog: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens on port 1
    response = httpx.get(f"{serve_api(ready_timeout_s=1.0).url}/readyz", timeout=20)
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable" and body["checks"]["redis"] == "ok"
    assert body["checks"]["s3"].startswith("unreachable: EndpointConnectionError")


def test_metrics_count_submissions_requests_latency_and_queue_depth(
    api: ApiServer, acme: httpx.Client, catalog: redis.Redis
) -> None:
    acme.post("/v1/jobs", json=SNEAKERS)
    acme.get("/v1/jobs/0123456789abcdef")
    text = httpx.get(f"{api.url}/metrics").text
    assert 'genq_jobs_submitted_total{model="fmnist-cgan"} 1.0' in text
    assert 'genq_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in text
    assert 'genq_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0' in text
    assert 'genq_http_request_duration_seconds_bucket{le="+Inf",method="POST",route="/v1/jobs"} 1.0' in text
    assert 'genq_queue_depth{queue="generate"} 1.0' in text


def test_keys_are_stored_only_as_their_sha256(api: ApiServer, catalog: redis.Redis) -> None:
    key = make_key(catalog, "initech", max_queued=3)
    assert key.startswith("genq_")
    with session_for(api, key) as session:
        assert session.get("/v1/jobs").status_code == 200
    record = catalog.get(f"genq:apikey:{hashlib.sha256(key.encode()).hexdigest()}")
    assert record is not None and key.encode() not in record
    assert json.loads(record)["tenant"] == "initech" and json.loads(record)["quotas"]["max_queued"] == 3
    assert not any(key in k.decode() for k in catalog.keys("*"))


def test_identical_idempotent_requests_sent_at_once_all_answer_the_one_job(
    api: ApiServer, catalog: redis.Redis
) -> None:
    # The attack (or a retrying client): 20 identical requests at once made one job, but up to 9 callers got 404.
    key = make_key(catalog, "acme", max_queued=50)
    barrier = threading.Barrier(20)

    def submit(_: int) -> httpx.Response:
        with session_for(api, key) as session:
            barrier.wait(10)
            return session.post("/v1/jobs", json=SNEAKERS, headers={"Idempotency-Key": "burst-1"})

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(submit, range(20)))

    assert sorted(r.status_code for r in responses) == [200] * 19 + [202], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(catalog.keys("genq:job:*")) == 1 and catalog.llen(constants.GENERATE_QUEUE) == 1


def test_a_key_holds_at_most_max_streams_event_streams(serve_api: ServeApi, catalog: redis.Redis) -> None:
    # The attack: 300 open streams of one key took the API's latency from 11 to 75 ms for everyone.
    server = serve_api(max_streams=2)
    key = make_key(catalog, "acme")
    with session_for(server, key) as acme:
        job_id = acme.post("/v1/jobs", json=SNEAKERS).json()["id"]  # stays queued: no worker here
        path = f"/v1/jobs/{job_id}/events"
        with acme.stream("GET", path) as first, acme.stream("GET", path) as second:
            assert first.status_code == second.status_code == 200
            third = acme.get(path)
            assert third.status_code == 429 and third.json()["detail"][0]["loc"] == ["quota", "max_streams"]
            with session_for(server, make_key(catalog, "globex")) as globex:  # per key: another's are its own
                assert globex.get(path).status_code == 404
        deadline = time.monotonic() + 10  # closing a stream gives its slot back
        while catalog.zcard(constants.API_KEY_STREAMS_KEY.format(key_id=_key_id(key))) and time.monotonic() < deadline:
            time.sleep(0.1)
        with acme.stream("GET", path) as again:
            assert again.status_code == 200


def _key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
