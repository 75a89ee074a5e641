"""The wire contract refuses bad requests with errors that name the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from producer.contract import GenerateRequest, JobStatus, ModelRef


@pytest.mark.parametrize(
    ("ref", "name", "version", "alias"),
    [
        ("fmnist-cgan", "fmnist-cgan", None, None),
        ("fmnist-cgan@3", "fmnist-cgan", "3", None),
        ("brand-x:production", "brand-x", None, "production"),
        ("a.b_c-1@2024-01-01.1", "a.b_c-1", "2024-01-01.1", None),
    ],
)
def test_model_ref_parses_name_version_and_alias(ref: str, name: str, version: str | None, alias: str | None) -> None:
    parsed = ModelRef.parse(ref)
    assert (parsed.name, parsed.version, parsed.alias) == (name, version, alias)
    assert str(parsed) == ref


@pytest.mark.parametrize("ref", ["", "Upper", "a@", "a:", "a@1:b", "../x", "a b", "a" * 70])
def test_model_ref_rejects_malformed(ref: str) -> None:
    with pytest.raises(ValueError, match="invalid model reference"):
        ModelRef.parse(ref)


def _error_locs(exc: ValidationError) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in exc.errors()]


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"model": "fmnist-cgan", "label": "sneaker", "count": 0}, "count"),
        ({"model": "fmnist-cgan", "label": "sneaker", "count": -3}, "count"),
        ({"model": "Not A Model", "label": "sneaker"}, "model"),
        ({"model": "fmnist-cgan", "label": "sneaker", "seed": -1}, "seed"),
        ({"model": "fmnist-cgan", "label": "sneaker", "format": "gif"}, "format"),
        ({"model": "fmnist-cgan", "label": "sneaker", "callback": {"url": "not a url"}}, "callback.url"),
        ({"model": "fmnist-cgan", "label": "sneaker", "callback": {"url": "ftp://x.example/h"}}, "callback.url"),
        (
            {"model": "fmnist-cgan", "label": "sneaker", "callback": {"url": "https://x.example", "events": ["x"]}},
            "callback.events.0",
        ),
        ({"model": "fmnist-cgan", "label": "sneaker", "colour": "red"}, "colour"),
        ({"model": "fmnist-cgan", "counts": {"sneaker": 0}}, "counts.sneaker"),
        # JSON's true/false are not numbers, though pydantic's lax mode would read them as 1/0
        ({"model": "fmnist-cgan", "label": "sneaker", "seed": False}, "seed"),
        ({"model": "fmnist-cgan", "label": "sneaker", "count": True}, "count"),
        ({"model": "fmnist-cgan", "label": True}, "label"),
        ({"model": "fmnist-cgan", "counts": {"bag": True}}, "counts.bag"),
        ({"model": "fmnist-cgan", "per_class": True}, "per_class"),
    ],
)
def test_bad_field_is_named_in_the_error(fields: dict[str, object], loc: str) -> None:
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate(fields)
    assert loc in _error_locs(info.value)


@pytest.mark.parametrize(
    "fields",
    [
        {"model": "fmnist-cgan"},
        {"model": "fmnist-cgan", "label": "bag", "counts": {"bag": 1}},
        {"model": "fmnist-cgan", "counts": {}},
    ],
)
def test_exactly_one_way_to_ask_for_labels(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="label|counts"):
        GenerateRequest.model_validate(fields)


def test_label_counts_accepts_names_and_indices() -> None:
    request = GenerateRequest(model="m", counts={"sneaker": 2, 7: 3})  # type: ignore[dict-item]
    assert request.label_counts() == [("sneaker", 2), (7, 3)]
    assert request.total_images == 5
    assert GenerateRequest(model="m", label="3").label_counts() == [(3, 1)]


def test_request_round_trips_through_json() -> None:
    request = GenerateRequest(
        model="fmnist-cgan@1",
        label="sneaker",
        count=8,
        seed=42,
        callback={"url": "https://hooks.example/x"},
        metadata={"sku": "A-1", "tags": ["x"]},
        idempotency_key="k1",
    )  # type: ignore[arg-type]
    assert GenerateRequest.model_validate_json(request.model_dump_json()) == request


def test_terminal_statuses() -> None:
    assert {s for s in JobStatus if s.is_terminal()} == {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}
    assert JobStatus("queued") == "queued"
