"""The API never stores what it cannot read back, and survives a record it cannot read, on real uvicorn and Redis.

The attack (hostile-tenant review, issue 16): a ~450-byte body with metadata nested a few hundred deep passed
validation and was stored; `POST /v1/jobs` then answered 500 after writing the record, and the tenant's
`GET /v1/jobs` answered 500 for the record's TTL (7 days). Sent here as raw JSON text, as an attacker's script would.
"""

from __future__ import annotations

import json

import httpx
import pytest
import redis

from producer.core import constants

SNEAKERS = {"model": "fmnist-cgan", "label": "sneaker", "count": 1, "seed": 42}
FINETUNE = {"base": "fmnist-cgan", "dataset": "3f2a9c0e1b/", "name": "brand-x", "steps": 10}
# The review's body: metadata nested 200 deep in arrays, two bytes a level (the spec around it makes 201 levels).
REVIEW_BODY = '{"model":"fmnist-cgan","label":"bag","metadata":{"a":' + "[" * 199 + "]" * 199 + "}}"


def _nothing_written(db: redis.Redis) -> tuple[bool, set[str]]:
    """Whether a refused request left nothing behind (no job record, index, message or event), and what it left."""
    keys = {k.decode() for k in db.keys("*")}
    left = {k for k in keys if not k.startswith(("genq:apikey", "genq:catalog"))}  # the key, its rate bucket
    return not left, left


def _post(session: httpx.Client, path: str, text: str) -> httpx.Response:
    return session.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


def _with_metadata(fields: dict[str, object], metadata_json: str) -> str:
    return json.dumps(fields)[:-1] + f', "metadata": {metadata_json}}}'


def _arrays(depth: int) -> str:
    """A JSON object nesting ``depth`` objects and arrays, itself the first, as text."""
    return '{"a":' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def test_the_reviews_450_byte_body_is_refused_naming_metadata_and_nothing_is_written(
    acme: httpx.Client, catalog: redis.Redis
) -> None:
    assert 440 <= len(REVIEW_BODY) <= 460
    response = _post(acme, "/v1/jobs", REVIEW_BODY)
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", "metadata"]
    assert "metadata nests objects and arrays more than 32 levels deep" in detail["msg"]
    empty, left = _nothing_written(catalog)
    assert empty, left
    assert acme.get("/v1/jobs").json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize(
    ("path", "fields", "metadata", "why"),
    [
        ("/v1/jobs", SNEAKERS, _arrays(33), "more than 32 levels deep"),
        ("/v1/jobs", SNEAKERS, _arrays(450), "more than 32 levels deep"),
        ("/v1/jobs", SNEAKERS, _arrays(900), "more than 32 levels deep"),
        ("/v1/jobs", SNEAKERS, '{"price": NaN}', "holds NaN"),  # json.loads reads it; it used to be stored as null
        ("/v1/jobs", SNEAKERS, '{"price": -Infinity}', "holds -Infinity"),
        ("/v1/jobs", SNEAKERS, '{"price": 1e400}', "holds Infinity"),
        ("/v1/jobs", SNEAKERS, '{"name": "\\ud800"}', "not valid Unicode"),
        ("/v1/finetunes", FINETUNE, _arrays(33), "more than 32 levels deep"),
        ("/v1/finetunes", FINETUNE, '{"price": NaN}', "holds NaN"),
    ],
)
def test_metadata_genq_could_not_read_back_is_refused_422_and_nothing_is_written(
    acme: httpx.Client, catalog: redis.Redis, path: str, fields: dict[str, object], metadata: str, why: str
) -> None:
    response = _post(acme, path, _with_metadata(fields, metadata))
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", "metadata"] and why in detail["msg"]
    empty, left = _nothing_written(catalog)
    assert empty, left


def test_json_nested_past_what_the_body_parser_reads_is_refused_400_and_nothing_is_written(
    acme: httpx.Client, catalog: redis.Redis
) -> None:
    response = _post(acme, "/v1/jobs", _with_metadata(SNEAKERS, _arrays(20_000)))  # json.loads: RecursionError
    assert response.status_code == 400 and response.json()["detail"][0]["loc"] == ["body"]
    empty, left = _nothing_written(catalog)
    assert empty, left


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({**SNEAKERS, "model": "fmnist-cgan\n"}, ["body", "model"]),
        ({**SNEAKERS, "callback": {"url": "https://hooks.example:0/x"}}, ["body", "callback", "url"]),
        ({**SNEAKERS, "callback": {"url": "https://hooks.example/" + "x" * 2027}}, ["body", "callback", "url"]),
        ({**SNEAKERS, "callback": {"url": "https://hooks.example/" + "x" * 60_000}}, ["body", "callback", "url"]),
    ],
    ids=["model-newline", "port-0", "url-2049", "url-60kb"],
)
def test_a_trailing_newline_a_long_url_and_port_0_are_refused_naming_the_field(
    acme: httpx.Client, catalog: redis.Redis, fields: dict[str, object], loc: list[str]
) -> None:
    response = acme.post("/v1/jobs", json=fields)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == loc
    empty, left = _nothing_written(catalog)
    assert empty, left


def test_metadata_32_deep_is_accepted_and_read_back(acme: httpx.Client, catalog: redis.Redis) -> None:
    created = _post(acme, "/v1/jobs", _with_metadata(SNEAKERS, _arrays(32)))
    assert created.status_code == 202, created.text
    metadata = json.loads(_arrays(32))
    assert created.json()["metadata"] == metadata
    assert acme.get(f"/v1/jobs/{created.json()['id']}").json()["metadata"] == metadata
    assert acme.get("/v1/jobs").json()["items"][0]["metadata"] == metadata


def test_a_record_that_cannot_be_read_leaves_the_list_answering_and_get_says_why(
    acme: httpx.Client, globex: httpx.Client, catalog: redis.Redis
) -> None:
    older = acme.post("/v1/jobs", json=SNEAKERS).json()["id"]
    poisoned = acme.post("/v1/jobs", json={**SNEAKERS, "seed": 1}).json()["id"]
    newer = acme.post("/v1/jobs", json={**SNEAKERS, "seed": 2}).json()["id"]
    # What an older version stored for the review's body: the spec, with metadata 300 deep.
    key = constants.JOB_KEY.format(job_id=poisoned)
    spec = json.loads(catalog.hget(key, "spec") or b"")
    catalog.hset(key, "spec", json.dumps(spec)[:-1] + ', "metadata": ' + _arrays(300) + "}")

    for _ in range(2):
        listed = acme.get("/v1/jobs")
        assert listed.status_code == 200, listed.text
        assert [job["id"] for job in listed.json()["items"]] == [newer, older]

        got = acme.get(f"/v1/jobs/{poisoned}")
        assert got.status_code == 500 and "retry-after" not in got.headers
        (detail,) = got.json()["detail"]
        assert detail["loc"] == ["path", "job_id"] and detail["type"] == "record_unreadable"
        assert f"job {poisoned!r} has a record genq cannot read" in detail["msg"]

        # Another tenant learns nothing: the same 404 as an id that never existed.
        foreign, unknown = globex.get(f"/v1/jobs/{poisoned}"), globex.get(f"/v1/jobs/{'0' * 32}")
        assert foreign.status_code == unknown.status_code == 404
        assert foreign.json() == json.loads(unknown.text.replace("0" * 32, poisoned))

        assert acme.get(f"/v1/jobs/{older}").status_code == 200

    dead = [json.loads(raw) for raw in catalog.lrange(constants.DEADLETTER_KEY, 0, -1)]
    assert [(d["stage"], d["job_id"]) for d in dead] == [("record", poisoned)]


@pytest.mark.parametrize(
    ("method", "route"),
    [("GET", ""), ("POST", "/cancel"), ("GET", "/events"), ("GET", "/deliveries")],
    ids=["get", "cancel", "events", "deliveries"],
)
def test_every_job_route_answers_another_tenants_unreadable_record_like_an_unknown_id(
    acme: httpx.Client, globex: httpx.Client, catalog: redis.Redis, method: str, route: str
) -> None:
    poisoned = acme.post("/v1/jobs", json=SNEAKERS).json()["id"]
    catalog.hset(constants.JOB_KEY.format(job_id=poisoned), "spec", '{"kind": "generate", "job_id": ')  # cut short

    foreign = globex.request(method, f"/v1/jobs/{poisoned}{route}")
    unknown = globex.request(method, f"/v1/jobs/{'0' * 32}{route}")
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json() == json.loads(unknown.text.replace("0" * 32, poisoned))
    assert "read" not in foreign.text  # nothing says a record is there

    own = acme.request(method, f"/v1/jobs/{poisoned}{route}")  # its tenant learns what is wrong
    assert own.status_code == 500, own.text
    (detail,) = own.json()["detail"]
    assert detail["type"] == "record_unreadable" and f"job {poisoned!r} has a record genq cannot read" in detail["msg"]


def test_metrics_answer_with_a_job_counter_that_is_not_a_number(acme: httpx.Client, catalog: redis.Redis) -> None:
    assert acme.post("/v1/jobs", json=SNEAKERS).status_code == 202
    catalog.hset(constants.JOBS_BY_STATUS_KEY, mapping={"queued": "lots", "failed": "2"})
    metrics = acme.get("/metrics")
    assert metrics.status_code == 200
    assert 'genq_jobs{status="failed"} 2.0' in metrics.text and 'genq_jobs{status="queued"} 0.0' in metrics.text
