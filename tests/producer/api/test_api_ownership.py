"""Model ownership over HTTP, as another tenant would probe it (real uvicorn, real Redis): listing, generating and
fine-tuning see the system's models and the caller's own only; system models are read-only; gates must measure."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import redis

from producer.contract import ModelEntry, ModelVersionInfo
from producer.core import constants


@pytest.fixture
def owned(catalog: redis.Redis) -> redis.Redis:
    """The catalogue with acme's "brand-x" and globex's "secret-x" beside the system's fmnist-cgan."""
    for name, owner, classes in (("brand-x", "acme", ["logo", "sneaker"]), ("secret-x", "globex", ["prototype"])):
        info = ModelVersionInfo(arch="cgan", class_names=classes, resolution=28, channels=1, metrics={"fid": 3.0})
        entry = ModelEntry(name=name, owner=owner, versions={"1": info}, aliases={"latest": "1"})
        catalog.hset(constants.CATALOG_KEY, entry.key, entry.model_dump_json())
    return catalog


def job_keys(client: redis.Redis) -> list[bytes]:
    return list(client.keys("genq:job:*"))


def test_models_lists_the_systems_and_the_callers_own_never_another_tenants(
    acme: httpx.Client, globex: httpx.Client, owned: redis.Redis
) -> None:
    listed = {m["name"]: m for m in acme.get("/v1/models").json()}
    assert set(listed) == {"fmnist-cgan", "brand-x"}
    assert listed["fmnist-cgan"]["owner"] is None and listed["brand-x"]["owner"] == "acme"
    theirs = globex.get("/v1/models").json()
    assert [(m["name"], m["owner"]) for m in theirs] == [("fmnist-cgan", None), ("secret-x", "globex")]
    assert "brand-x" not in globex.get("/v1/models").text and "logo" not in globex.get("/v1/models").text


def test_generating_with_another_tenants_model_answers_like_an_unknown_model(
    acme: httpx.Client, globex: httpx.Client, owned: redis.Redis
) -> None:
    theirs = globex.post("/v1/jobs", json={"model": "brand-x", "label": "logo"})
    unknown = globex.post("/v1/jobs", json={"model": "zzzzz-x", "label": "logo"})
    assert theirs.status_code == unknown.status_code == 422
    assert theirs.text.replace("brand-x", "?") == unknown.text.replace("zzzzz-x", "?")
    across = globex.post("/v1/jobs", json={"model": "acme/brand-x", "label": "logo"})
    assert across.status_code == 422 and across.json()["detail"][0]["loc"] == ["body", "model"]
    assert job_keys(owned) == [] and owned.llen(constants.GENERATE_QUEUE) == 0

    mine = acme.post("/v1/jobs", json={"model": "brand-x", "label": "logo"})
    assert mine.status_code == 202, mine.text
    assert mine.json()["model_version"] == "acme/brand-x@1"
    spec = owned.hget(f"genq:job:{mine.json()['id']}", "spec")
    assert spec is not None and b'"model_name":"acme/brand-x"' in spec


FINETUNE: dict[str, Any] = {"base": "fmnist-cgan", "dataset": "abc123/data.zip", "steps": 2}


def test_a_tenant_cannot_fine_tune_over_a_system_model_and_nothing_is_queued(
    globex: httpx.Client, owned: redis.Redis
) -> None:
    before = owned.hget(constants.CATALOG_KEY, "fmnist-cgan")
    # the request of the incident, with a gate that measures something (an empty gate is refused on its own)
    body = {**FINETUNE, "name": "fmnist-cgan", "gate": {"alias": "production", "max_fid": 1000}}
    response = globex.post("/v1/finetunes", json=body)
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["loc"] == ["body", "name"] and "system model, read-only" in detail["msg"]
    assert owned.llen(constants.TRAIN_QUEUE) == 0 and job_keys(owned) == []
    assert owned.hget(constants.CATALOG_KEY, "fmnist-cgan") == before


def test_a_tenants_fine_tune_takes_its_own_name_whatever_another_tenant_named(
    acme: httpx.Client, globex: httpx.Client, owned: redis.Redis
) -> None:
    response = acme.post("/v1/finetunes", json={**FINETUNE, "name": "secret-x"})  # globex's secret-x: not acme's
    assert response.status_code == 202, response.text
    spec = owned.hget(f"genq:job:{response.json()['id']}", "spec")
    assert spec is not None and b'"name":"secret-x"' in spec and b'"tenant":"acme"' in spec
    # another tenant's model cannot be a base either: it answers like an unknown one
    base = globex.post("/v1/finetunes", json={**FINETUNE, "base": "brand-x", "name": "mine"})
    assert base.status_code == 422 and base.json()["detail"][0]["loc"] == ["body", "base"]
    assert "unknown base model 'brand-x' (known: fmnist-cgan, secret-x)" in base.json()["detail"][0]["msg"]


def test_an_empty_gate_is_refused_and_says_so(acme: httpx.Client, owned: redis.Redis) -> None:
    response = acme.post("/v1/finetunes", json={**FINETUNE, "name": "mine", "gate": {"alias": "production"}})
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["loc"][:2] == ["body", "gate"] and "sets no threshold" in detail["msg"]
    assert owned.llen(constants.TRAIN_QUEUE) == 0
