"""Model ownership through the real stack, as tenants attacking each other would try it: the HTTP API on uvicorn,
real Redis, a moto S3 server, a generation worker and a training worker (`genq worker` subprocesses) that really
fine-tune and publish the tiny base model, and the operator's `genq model publish`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from api_server import ApiServer, api_settings, make_key, session_for
from PIL import Image
from shipped import CGAN_LATEST_REF
from stack import Stack, worker_env
from stack_fixtures import WORKER_QUEUES
from tiny_model import make_tiny_base, make_tiny_model
from worker_process import WorkerProcess

from producer.api import create_app
from producer.contract import JobStatus, JobView
from producer.core import constants

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base(stack: Stack) -> str:
    make_tiny_base(stack.model_root)  # a system model, before any worker starts, so workers publish it
    return "tiny-base"


@pytest.fixture(scope="module")
def workers(stack: Stack, base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A generation worker and a training worker, shared by this module's tests; both stopped at the end."""
    logs = tmp_path_factory.mktemp("workers")
    started: list[WorkerProcess] = []
    try:
        for name, queues in (("generate", WORKER_QUEUES), ("train", constants.TRAIN_QUEUE)):
            started.append(WorkerProcess(worker_env(stack), logs / f"{name}.log", queues=queues, pool="threads",
                                         concurrency=2 if name == "generate" else 1))  # fmt: skip
        for worker in started:
            worker.wait_ready()
        yield
    finally:
        for worker in started:
            worker.stop()


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[ApiServer]:
    with ApiServer(create_app(api_settings(stack.redis_url, stack.bucket))) as server:
        yield server


@pytest.fixture(scope="module")
def acme(stack: Stack, api: ApiServer) -> Iterator[httpx.Client]:
    with session_for(api, make_key(stack.redis, "acme")) as session:
        yield session


@pytest.fixture(scope="module")
def globex(stack: Stack, api: ApiServer) -> Iterator[httpx.Client]:
    with session_for(api, make_key(stack.redis, "globex")) as session:
        yield session


def upload(session: httpx.Client, classes: tuple[str, ...]) -> str:
    """A zip of 8 small PNGs per class, uploaded through the API under the caller's tenant; its reference."""
    rng = np.random.default_rng(len(classes))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in classes:
            for i in range(8):
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L").save(png, "PNG")
                archive.writestr(f"{name}/{i}.png", png.getvalue())
    response = session.post("/v1/datasets", params={"filename": "data.zip"}, content=buffer.getvalue())
    assert response.status_code == 201, response.text
    return str(response.json()["dataset"])


def finetune(session: httpx.Client, stack: Stack, dataset: str, name: str) -> JobView:
    """Fine-tune the system's tiny base as ``name`` through the API and wait for the job to end."""
    body = {"base": "tiny-base", "dataset": dataset, "name": name, "steps": 2, "batch_size": 4}
    created = session.post("/v1/finetunes", json={**body, "sample_every": 2, "gate": {"max_fid": 1e9}})
    assert created.status_code == 202, created.text
    return stack.client.wait(created.json()["id"], timeout=180)


def generate(session: httpx.Client, stack: Stack, **body: Any) -> JobView:
    created = session.post("/v1/jobs", json={"count": 2, "seed": 1, **body})
    assert created.status_code == 202, created.text
    view = stack.client.wait(created.json()["id"], timeout=120)
    assert view.status is JobStatus.SUCCEEDED, view.error
    return view


def names(session: httpx.Client) -> dict[str, str | None]:
    return {m["name"]: m["owner"] for m in session.get("/v1/models").json()}


def test_a_tenant_cannot_replace_a_system_model_for_everyone(
    stack: Stack, workers: None, acme: httpx.Client, globex: httpx.Client
) -> None:
    catalog_before = stack.redis.hget(constants.CATALOG_KEY, "fmnist-cgan")
    dataset = upload(globex, ("tshirt", "logo"))
    incident = {"base": "fmnist-cgan", "dataset": dataset, "name": "fmnist-cgan", "steps": 2}

    empty_gate = globex.post("/v1/finetunes", json={**incident, "gate": {"alias": "production"}})
    assert empty_gate.status_code == 422, empty_gate.text
    assert [d["loc"][:2] for d in empty_gate.json()["detail"]] == [["body", "gate"]]
    assert "sets no threshold" in empty_gate.text
    over = globex.post("/v1/finetunes", json={**incident, "gate": {"alias": "production", "max_fid": 1e9}})
    assert over.status_code == 422, over.text
    assert over.json()["detail"][0]["loc"] == ["body", "name"] and "system model, read-only" in over.text
    plain = globex.post("/v1/finetunes", json=incident)
    assert plain.status_code == 422 and plain.json()["detail"][0]["loc"] == ["body", "name"]

    assert stack.redis.llen(constants.TRAIN_QUEUE) == 0
    assert stack.keys("models/fmnist-cgan/") == [] and stack.keys(constants.TENANT_MODELS_PREFIX + "globex/") == []
    assert stack.redis.hget(constants.CATALOG_KEY, "fmnist-cgan") == catalog_before
    view = generate(acme, stack, model="fmnist-cgan", label="tshirt")  # the next tenant's request
    assert view.model_version == CGAN_LATEST_REF and {o.label for o in view.outputs} == {"tshirt"}


def test_a_tenants_fine_tuned_model_is_its_own_and_another_tenant_can_neither_see_use_nor_replace_it(
    stack: Stack, workers: None, acme: httpx.Client, globex: httpx.Client
) -> None:
    done = finetune(acme, stack, upload(acme, ("logo", "sneaker")), "brand-x")
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert done.training is not None and done.training.model == "brand-x@1"
    assert set(done.training.aliases) == {"latest", "production"}
    prefix = constants.TENANT_MODELS_PREFIX + "acme/brand-x/"
    assert f"{prefix}1/weights.safetensors" in stack.keys(prefix) and stack.keys("models/brand-x/") == []
    acme_aliases = stack.get(prefix + "aliases.json")
    listed = names(acme)
    assert listed["brand-x"] == "acme" and {owner for name, owner in listed.items() if name != "brand-x"} == {None}
    mine = generate(acme, stack, model="brand-x:production", label="logo")
    assert mine.model_version == "acme/brand-x@1"
    assert all(o.key.startswith(f"tenants/acme/jobs/{mine.id}/") for o in mine.outputs)

    # globex: not listed, not usable, not a base; answered exactly like a model that does not exist
    assert "brand-x" not in names(globex) and "brand-x" not in globex.get("/v1/models").text
    theirs = globex.post("/v1/jobs", json={"model": "brand-x:production", "label": "logo"})
    unknown = globex.post("/v1/jobs", json={"model": "zzzzz-x:production", "label": "logo"})
    assert theirs.status_code == unknown.status_code == 422
    assert theirs.text.replace("brand-x", "?") == unknown.text.replace("zzzzz-x", "?")
    base = globex.post("/v1/finetunes", json={"base": "brand-x", "dataset": "x/", "name": "mine", "steps": 2})
    assert base.status_code == 422 and base.json()["detail"][0]["loc"] == ["body", "base"]

    # globex's "brand-x" is a model of its own: publishing it moves nothing of acme's
    own = finetune(globex, stack, upload(globex, ("cap", "mug")), "brand-x")
    assert own.status is JobStatus.SUCCEEDED, own.error
    assert own.training is not None and own.training.model == "brand-x@1"
    assert stack.keys(constants.TENANT_MODELS_PREFIX + "globex/brand-x/1/")
    assert stack.get(prefix + "aliases.json") == acme_aliases and not stack.keys(f"{prefix}2/")
    assert generate(globex, stack, model="brand-x", label="mug").model_version == "globex/brand-x@1"
    assert generate(acme, stack, model="brand-x", label="logo").model_version == "acme/brand-x@1"
    no_logo = globex.post("/v1/jobs", json={"model": "brand-x", "label": "logo"})  # acme's class: not globex's
    assert no_logo.status_code == 422 and no_logo.json()["detail"][0]["loc"] == ["body", "label"]


def test_an_operator_publish_of_a_system_model_still_works_for_every_tenant(
    stack: Stack, workers: None, acme: httpx.Client, globex: httpx.Client, tmp_path: Path
) -> None:
    export = make_tiny_model(tmp_path / "run", name="export", seed=7)
    argv = [sys.executable, "-m", "producer.cli", "model", "publish", str(export), "--name", "tiny-sys"]
    result = subprocess.run([*argv, "--alias", "production"], env=worker_env(stack), capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tiny-sys@1" and "published" in result.stderr
    assert json.loads(stack.get("models/tiny-sys/aliases.json")) == {"latest": "1", "production": "1"}
    for session in (acme, globex):
        assert names(session)["tiny-sys"] is None
        assert generate(session, stack, model="tiny-sys:production", label="bag").model_version == "tiny-sys@1"
    # and a tenant still cannot publish over it
    over = acme.post("/v1/finetunes", json={"base": "tiny-sys", "dataset": "x/", "name": "tiny-sys", "steps": 2})
    assert over.status_code == 422 and over.json()["detail"][0]["loc"] == ["body", "name"]
