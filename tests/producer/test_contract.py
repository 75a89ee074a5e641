"""The wire contract refuses bad requests with errors that name the field."""

from __future__ import annotations

import math

import pytest
from pydantic import BaseModel, JsonValue, ValidationError

from producer.contract import (
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    MAX_URL_CHARS,
    MODEL_REF_PATTERN,
    FineTuneRequest,
    GenerateJob,
    GenerateRequest,
    JobStatus,
    ModelEntry,
    ModelRef,
)


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


# -- free-form JSON, patterns and callback URLs: nothing is accepted that genq could not store and read back --------

_GENERATE = {"model": "fmnist-cgan", "label": "sneaker"}
_FINETUNE = {"base": "fmnist-cgan", "dataset": "3f2a9c0e1b/", "name": "brand-x"}
_REQUESTS = pytest.mark.parametrize(
    ("request_type", "fields"),
    [(GenerateRequest, _GENERATE), (FineTuneRequest, _FINETUNE)],
    ids=["generate", "finetune"],
)


def nested(depth: int, leaf: JsonValue = None) -> dict[str, JsonValue]:
    """A JSON object nesting ``depth`` objects and arrays, itself the first: {"a": [{"a": [... leaf ...]}]}."""
    value: JsonValue = [leaf] if depth % 2 == 0 else {"a": leaf}
    for level in range(depth - 1, 1, -1):
        value = [value] if level % 2 == 0 else {"a": value}
    return {"a": value} if depth > 1 else {"a": leaf}


def _refusal(request_type: type[BaseModel], fields: dict[str, object]) -> tuple[list[str], str]:
    """Where and why pydantic refused ``fields`` (without the input: printing a value of 2**30 shared parts takes
    pydantic minutes)."""
    with pytest.raises(ValidationError) as info:
        request_type.model_validate(fields)
    errors = info.value.errors(include_input=False)
    return _error_locs(info.value), " ".join(e["msg"] for e in errors)


@_REQUESTS
def test_metadata_nested_32_deep_is_accepted_and_reads_back(
    request_type: type[GenerateRequest | FineTuneRequest], fields: dict[str, object]
) -> None:
    metadata = nested(MAX_JSON_DEPTH, leaf="deepest")
    request = request_type.model_validate({**fields, "metadata": metadata})
    assert request_type.model_validate_json(request.model_dump_json()).metadata == metadata == request.metadata


@_REQUESTS
@pytest.mark.parametrize(
    ("metadata", "why"),
    [
        (nested(MAX_JSON_DEPTH + 1), "more than 32 levels deep"),
        (nested(450), "more than 32 levels deep"),  # the review's request: stored, then unreadable by every reader
        (nested(100_000), "more than 32 levels deep"),  # refused before pydantic recurses into it
        ({"x": math.nan}, "holds NaN"),  # json.loads reads NaN; pydantic would have stored null
        ({"x": [1.0, math.inf]}, "holds Infinity"),
        ({"x": {"y": -math.inf}}, "holds -Infinity"),
        ({"x": "\ud800"}, "not valid Unicode"),  # "\ud800" in JSON text: stored, then no serializer writes it
        ({"\udc00": 1}, "not valid Unicode"),
        ({"x": 10**4300}, "more than 4300 digits"),  # written, then refused by the JSON parser as out of range
        ({"x": "y" * MAX_JSON_BYTES}, f"is {MAX_JSON_BYTES + 8} bytes as JSON, the limit is {MAX_JSON_BYTES}"),
        ({"x": list(range(MAX_JSON_BYTES))}, f"is larger than {MAX_JSON_BYTES} bytes"),
    ],
    ids=[
        "depth-33",
        "depth-450",
        "depth-100000",
        "nan",
        "inf",
        "minus-inf",
        "lone-surrogate",
        "lone-surrogate-key",
        "huge-int",
        "too-large",
        "too-many-values",
    ],
)
def test_metadata_genq_could_not_read_back_is_refused_naming_the_field(
    request_type: type[BaseModel], fields: dict[str, object], metadata: dict[str, JsonValue], why: str
) -> None:
    locs, message = _refusal(request_type, {**fields, "metadata": metadata})
    assert locs == ["metadata"]
    assert message.startswith("Value error, metadata ") and why in message


def test_metadata_that_refers_to_itself_or_shares_values_is_refused_without_walking_forever() -> None:
    cycle: dict[str, JsonValue] = {}
    cycle["a"] = cycle
    shared: JsonValue = []
    for _ in range(30):  # 2**30 values as JSON, 30 levels deep
        shared = [shared, shared]
    assert "more than 32 levels deep" in _refusal(GenerateRequest, {**_GENERATE, "metadata": cycle})[1]
    assert (
        f"larger than {MAX_JSON_BYTES} bytes" in _refusal(GenerateRequest, {**_GENERATE, "metadata": {"a": shared}})[1]
    )


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_in_json_text_are_refused(literal: str) -> None:
    with pytest.raises(ValidationError, match="metadata holds -?(NaN|Infinity)"):
        GenerateRequest.model_validate_json(f'{{"model": "fmnist-cgan", "label": 1, "metadata": {{"x": {literal}}}}}')


@pytest.mark.parametrize(
    ("request_type", "fields", "loc"),
    [
        (GenerateRequest, {**_GENERATE, "model": "fmnist-cgan\n"}, "model"),  # `$` matched before the newline
        (GenerateRequest, {**_GENERATE, "model": "fmnist-cgan@1\n"}, "model"),
        (GenerateRequest, {**_GENERATE, "model": "fmnist-cgan:production\n"}, "model"),
        (FineTuneRequest, {**_FINETUNE, "base": "fmnist-cgan\n"}, "base"),
        (FineTuneRequest, {**_FINETUNE, "name": "brand-x\n"}, "name"),
        (FineTuneRequest, {**_FINETUNE, "dataset": "3f2a9c0e1b\n"}, "dataset"),
        (FineTuneRequest, {**_FINETUNE, "dataset": "3f2a9c0e1b/data.zip\n"}, "dataset"),
        (FineTuneRequest, {**_FINETUNE, "classes": ["bag\n"]}, "classes.0"),
        (FineTuneRequest, {**_FINETUNE, "gate": {"max_fid": 50, "alias": "production\n"}}, "gate.alias"),
        (ModelEntry, {"name": "brand-x", "owner": "acme\n", "versions": {}}, "owner"),
    ],
)
def test_a_trailing_newline_is_refused_by_every_pattern(
    request_type: type[BaseModel], fields: dict[str, object], loc: str
) -> None:
    assert loc in _refusal(request_type, fields)[0]


@pytest.mark.parametrize("ref", ["fmnist-cgan\n", "fmnist-cgan@1\n", "brand-x:production\n"])
def test_model_ref_refuses_a_trailing_newline(ref: str) -> None:
    with pytest.raises(ValueError, match="invalid model reference"):
        ModelRef.parse(ref)
    assert MODEL_REF_PATTERN.match(ref) is None  # safe with .match too: the pattern ends with \Z


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://hooks.example/" + "x" * (MAX_URL_CHARS + 1 - len("https://hooks.example/")), "at most 2048"),
        ("https://hooks.example/" + "x" * 60_000, "at most 2048"),
        ("https://hooks.example:0/x", "port must be 1-65535"),
        ("http://hooks.example:0", "port must be 1-65535"),
    ],
    ids=["2049-chars", "60kb", "port-0", "port-0-no-path"],
)
def test_callback_urls_too_long_or_to_port_0_are_refused(url: str, why: str) -> None:
    locs, message = _refusal(GenerateRequest, {**_GENERATE, "callback": {"url": url}})
    assert locs == ["callback.url"] and why in message


@pytest.mark.parametrize(
    "url",
    ["https://hooks.example/" + "x" * (MAX_URL_CHARS - len("https://hooks.example/")), "https://hooks.example:1/"],
)
def test_callback_urls_at_the_limits_are_accepted(url: str) -> None:
    assert len(str(GenerateRequest.model_validate({**_GENERATE, "callback": {"url": url}}).callback.url)) <= 2048  # type: ignore[union-attr]


def test_provenance_defaults_to_xmp_and_refuses_an_unknown_value_naming_the_field() -> None:
    assert GenerateRequest(model="fmnist-cgan", label="bag").provenance == "xmp"
    assert GenerateRequest(model="fmnist-cgan", label="bag", provenance="c2pa").provenance == "c2pa"
    with pytest.raises(ValidationError) as refused:
        GenerateRequest.model_validate({"model": "fmnist-cgan", "label": "bag", "provenance": "signed"})
    [error] = refused.value.errors()
    assert error["loc"] == ("provenance",) and "'xmp' or 'c2pa'" in error["msg"]


def test_a_job_payload_without_provenance_runs_as_xmp() -> None:
    # A message queued by a producer from before the field: workers run it as it was asked, unsigned.
    payload = {
        "job_id": "job-01234567",
        "model": "fmnist-cgan",
        "model_name": "fmnist-cgan",
        "model_version": "1",
        "items": [{"index": 8, "name": "bag", "count": 1}],
        "seed": 1,
        "created_at": "2026-12-07T00:00:00Z",
    }
    assert GenerateJob.model_validate(payload).provenance == "xmp"
