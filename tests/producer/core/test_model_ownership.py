"""Model ownership at submit, as an attacker probes it: a tenant resolves the system's models and its own only,
another tenant's answer like unknown ones, system models are read-only, jobs pin the owner-qualified key."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from producer.contract import (
    FineTuneJob,
    FineTuneRequest,
    GenerateJob,
    GenerateRequest,
    ModelEntry,
    ModelVersionInfo,
)
from producer.core.resolve import resolve_finetune, resolve_request, visible_models
from producer.core.settings import Limits
from producer.errors import InvalidJob

FMNIST = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
NOW = datetime(2026, 11, 29, tzinfo=UTC)


def entry(name: str, owner: str | None, classes: list[str], **aliases: str) -> ModelEntry:
    info = ModelVersionInfo(arch="cgan", class_names=classes, resolution=28, channels=1)
    return ModelEntry(name=name, owner=owner, versions={"1": info}, aliases={"latest": "1", **aliases})


# What workers publish: a system model, acme's and globex's models of one name, and a model only globex has.
CATALOG = {
    e.key: e
    for e in (
        entry("fmnist-cgan", None, FMNIST),
        entry("brand-x", "acme", ["logo", "sneaker"], production="1"),
        entry("brand-x", "globex", ["cap", "mug", "pen"]),
        entry("secret-x", "globex", ["prototype"]),
    )
}


def generate(tenant: str | None, catalog: dict[str, ModelEntry] | None = None, **fields: Any) -> GenerateJob:
    request = GenerateRequest.model_validate(fields)
    return resolve_request(request, catalog or CATALOG, Limits(), job_id="job-12345678", now=NOW, tenant=tenant)


def finetune(tenant: str | None, catalog: dict[str, ModelEntry] | None = None, **fields: Any) -> FineTuneJob:
    request = FineTuneRequest.model_validate({"base": "fmnist-cgan", "dataset": "u1/", "steps": 2, **fields})
    return resolve_finetune(request, catalog or CATALOG, Limits(), job_id="job-12345678", now=NOW, tenant=tenant)


def refusal(call: Any, *args: Any, **kwargs: Any) -> InvalidJob:
    with pytest.raises(InvalidJob) as info:
        call(*args, **kwargs)
    return info.value


def test_each_tenant_sees_the_systems_models_and_its_own_and_no_tenant_sees_the_systems_only() -> None:
    assert {n: e.key for n, e in visible_models(CATALOG, "acme").items()} == {
        "brand-x": "acme/brand-x",
        "fmnist-cgan": "fmnist-cgan",
    }
    assert {n: e.key for n, e in visible_models(CATALOG, "globex").items()} == {
        "brand-x": "globex/brand-x",
        "fmnist-cgan": "fmnist-cgan",
        "secret-x": "globex/secret-x",
    }
    assert list(visible_models(CATALOG, "initech")) == ["fmnist-cgan"]
    assert list(visible_models(CATALOG, None)) == ["fmnist-cgan"]


def test_one_name_resolves_to_the_callers_own_model_and_the_job_pins_its_owner() -> None:
    acme = generate("acme", model="brand-x:production", label="logo")
    globex = generate("globex", model="brand-x", label="mug")
    assert (acme.model_name, acme.model_version, acme.items[0].index) == ("acme/brand-x", "1", 0)
    assert (globex.model_name, globex.items[0].index) == ("globex/brand-x", 1)
    # acme's labels are not globex's: a label only acme's model knows is unknown to globex's
    assert refusal(generate, "globex", model="brand-x", label="logo").field == "label"


def test_another_tenants_model_answers_exactly_like_a_model_that_does_not_exist() -> None:
    theirs = refusal(generate, "acme", model="secret-x", label=0)
    nothing = refusal(generate, "acme", model="nobody-x", label=0)
    assert theirs.field == nothing.field == "model"
    assert str(theirs).replace("secret-x", "?") == str(nothing).replace("nobody-x", "?")
    assert "globex" not in str(theirs) and "known: brand-x, fmnist-cgan" in str(theirs)
    # the same for a fine-tune's base
    base = refusal(finetune, "acme", base="secret-x", name="mine")
    none = refusal(finetune, "acme", base="nobody-x", name="mine")
    assert base.field == "base" and str(base).replace("secret-x", "?") == str(none).replace("nobody-x", "?")


def test_without_a_tenant_only_system_models_resolve() -> None:
    assert generate(None, model="fmnist-cgan", label="tshirt").model_name == "fmnist-cgan"
    assert refusal(generate, None, model="brand-x", label=0).field == "model"


def test_a_reference_cannot_name_an_owner() -> None:
    with pytest.raises(ValidationError, match="invalid model reference"):
        GenerateRequest(model="globex/secret-x", label=0)
    with pytest.raises(ValidationError, match="invalid model reference"):
        FineTuneRequest.model_validate({"base": "acme/brand-x", "dataset": "u1/", "name": "mine"})


def test_a_tenant_naming_a_system_model_as_fine_tune_target_is_refused_as_read_only() -> None:
    refused = refusal(finetune, "globex", name="fmnist-cgan", gate={"max_fid": 100})
    assert refused.field == "name" and "system model, read-only" in str(refused)


def test_a_tenants_fine_tune_publishes_into_its_own_namespace_whatever_other_tenants_named() -> None:
    job = finetune("acme", name="secret-x")  # globex's secret-x is another model
    assert (job.target, job.base_name) == ("acme/secret-x", "fmnist-cgan")
    again = finetune("acme", base="brand-x", name="brand-x")  # its own model, from its own model
    assert (again.target, again.base_name) == ("acme/brand-x", "acme/brand-x")


def test_the_operator_still_publishes_system_models_without_a_tenant() -> None:
    job = finetune(None, name="fmnist-cgan")
    assert job.target == "fmnist-cgan" and job.tenant is None


def test_a_tenants_own_model_shadows_a_system_model_of_the_same_name_published_later() -> None:
    catalog = {**CATALOG, "brand-x": entry("brand-x", None, ["hat"])}
    assert generate("acme", catalog, model="brand-x", label="logo").model_name == "acme/brand-x"
    assert generate("initech", catalog, model="brand-x", label="hat").model_name == "brand-x"
    assert finetune("acme", catalog, name="brand-x").target == "acme/brand-x"  # still its own
    assert refusal(finetune, "initech", catalog, name="brand-x").field == "name"  # the system's: read-only


SPEC: dict[str, Any] = {
    "job_id": "job-12345678",
    "model": "brand-x",
    "model_version": "1",
    "items": [{"index": 0, "name": "logo", "count": 1}],
    "seed": 1,
    "created_at": NOW,
}


@pytest.mark.parametrize(
    ("tenant", "model_name"), [("globex", "acme/brand-x"), (None, "acme/brand-x"), ("acme", "acmex/brand-x")]
)
def test_a_forged_job_naming_another_owners_model_is_refused_where_a_worker_decodes_it(
    tenant: str | None, model_name: str
) -> None:
    with pytest.raises(ValidationError, match="not the system's nor the job's tenant's"):
        GenerateJob.model_validate({**SPEC, "tenant": tenant, "model_name": model_name})
    finetune_spec = finetune("acme", name="mine").model_dump()
    with pytest.raises(ValidationError, match="not the system's nor the job's tenant's"):
        FineTuneJob.model_validate({**finetune_spec, "tenant": tenant, "base_name": model_name})


def test_a_job_of_the_models_owner_or_of_a_system_model_decodes() -> None:
    assert GenerateJob.model_validate({**SPEC, "tenant": "acme", "model_name": "acme/brand-x"}).tenant == "acme"
    assert GenerateJob.model_validate({**SPEC, "tenant": "globex", "model_name": "fmnist-cgan"}).tenant == "globex"


@pytest.mark.parametrize("gate", [{}, {"alias": "production"}, {"min_label_consistency": None, "max_fid": None}])
def test_a_gate_without_a_threshold_is_refused_at_submit_and_says_why(gate: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as info:
        FineTuneRequest.model_validate({"base": "fmnist-cgan", "dataset": "u1/", "name": "mine", "gate": gate})
    [error] = info.value.errors()
    assert error["loc"] == ("gate",) and "sets no threshold" in error["msg"]


def test_a_gate_with_one_threshold_is_accepted() -> None:
    request = FineTuneRequest.model_validate(
        {"base": "fmnist-cgan", "dataset": "u1/", "name": "mine", "gate": {"max_fid": 50}}
    )
    assert request.gate is not None and request.gate.alias == "production"
