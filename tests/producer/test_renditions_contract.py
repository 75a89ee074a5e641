"""Renditions in the request: every bad operation or parameter refused naming the field, the pixel limit at the edge."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from producer.contract import GenerateJob, GenerateRequest, ModelEntry, ModelVersionInfo, Rendition, output_size
from producer.core.resolve import resolve_request
from producer.core.settings import Limits
from producer.errors import InvalidJob

INFO = ModelVersionInfo(arch="cgan", class_names=["tshirt", "sneaker"], resolution=28, channels=1)
CATALOG = {"fmnist-cgan": ModelEntry(name="fmnist-cgan", versions={"1": INFO}, aliases={"latest": "1"})}


def _request(*renditions: dict[str, Any], **fields: Any) -> GenerateRequest:
    body = {"model": "fmnist-cgan", "label": "sneaker", "count": 2, "renditions": list(renditions)} | fields
    return GenerateRequest.model_validate(body)


def _refusal(*renditions: dict[str, Any]) -> list[tuple[str, str, str]]:
    with pytest.raises(ValidationError) as info:
        _request(*renditions)
    return [(".".join(str(p) for p in e["loc"]), e["type"], e["msg"]) for e in info.value.errors()]


SQUARE = {"name": "square", "size": 1080}


@pytest.mark.parametrize(
    ("rendition", "loc"),
    [
        ({"name": "a", "size": 64, "ops": [{"op": "autocontrast"}, {"op": "unsharp_mask", "radius": 0}]}, "ops.1"),
        ({"name": "a", "size": 64, "ops": [{"op": "autocontrast"}, {"op": "unsharp_mask", "radius": 51}]}, "ops.1"),
        ({"name": "a", "size": 64, "ops": [{"op": "unsharp_mask", "percent": 501}]}, "ops.0"),
        ({"name": "a", "size": 64, "ops": [{"op": "unsharp_mask", "threshold": -1}]}, "ops.0"),
        ({"name": "a", "size": 64, "ops": [{"op": "autocontrast", "cutoff": 50}]}, "ops.0"),
        ({"name": "a", "size": 64, "ops": [{"op": "contrast", "factor": 4.5}]}, "ops.0"),
        ({"name": "a", "size": 64, "ops": [{"op": "sharpness", "factor": -1}]}, "ops.0"),
        ({"name": "a", "size": 64, "ops": [{"op": "contrast", "factor": True}]}, "ops.0"),
        ({"name": "a", "size": 64, "ops": [{"op": "autocontrast", "radius": 2}]}, "ops.0"),  # not its parameter
    ],
)
def test_an_out_of_range_or_unknown_parameter_is_refused_naming_it(rendition: dict[str, Any], loc: str) -> None:
    errors = _refusal(SQUARE, rendition)
    op = rendition["ops"][int(loc[-1])]
    param = next(k for k in op if k != "op")
    assert [where for where, _, _ in errors] == [f"renditions.1.{loc}.{op['op']}.{param}"]


@pytest.mark.parametrize("op", [{"op": "blur"}, {"op": "Autocontrast"}, {"radius": 2}, {}])
def test_an_unknown_or_missing_operation_is_refused_listing_the_known_ones(op: dict[str, Any]) -> None:
    errors = _refusal({"name": "a", "size": 64, "ops": [{"op": "autocontrast"}, op]})
    assert [(where, kind) for where, kind, _ in errors] == [("renditions.0.ops.1", "unknown_operation")]
    assert "autocontrast, unsharp_mask, contrast, sharpness" in errors[0][2]


@pytest.mark.parametrize(
    ("rendition", "loc", "words"),
    [
        ({"name": "a"}, "renditions.0", "give a target size"),
        ({"name": "a", "size": 10, "width": 10}, "renditions.0", "not both"),
        ({"name": "a", "width": 10, "fit": "cover"}, "renditions.0", "give both width and height"),
        ({"name": "a", "height": 10, "fit": "pad"}, "renditions.0", "give both width and height"),
        ({"name": "a", "size": 0}, "renditions.0.size", "greater than or equal to 1"),
        ({"name": "a", "size": 4097}, "renditions.0.size", "less than or equal to 4096"),
        ({"name": "a", "width": 10, "height": 99999}, "renditions.0.height", "less than or equal to 4096"),
        ({"name": "a", "size": 10, "fit": "stretch"}, "renditions.0.fit", "'contain', 'cover' or 'pad'"),
        ({"name": "a", "size": 10, "resample": "box"}, "renditions.0.resample", "'lanczos'"),
        ({"name": "a", "size": 10, "background": "white"}, "renditions.0.background", "#rrggbb"),
        ({"name": "a", "size": 10, "background": "#12345"}, "renditions.0.background", "#rrggbb"),
        ({"name": "A-b", "size": 10}, "renditions.0.name", "pattern"),
        ({"name": "../x", "size": 10}, "renditions.0.name", "pattern"),
        ({"name": "a", "size": 10, "crop": True}, "renditions.0.crop", "Extra inputs"),
    ],
)
def test_a_bad_rendition_is_refused_naming_the_field(rendition: dict[str, Any], loc: str, words: str) -> None:
    errors = _refusal(rendition)
    assert [where for where, _, _ in errors] == [loc]
    assert words in errors[0][2]


def test_repeated_names_too_many_renditions_or_none_are_refused() -> None:
    assert "square repeated" in _refusal(SQUARE, SQUARE)[0][2]
    assert _refusal(*({"name": f"r{i}", "size": 8} for i in range(9)))[0][:2] == ("renditions", "too_long")
    assert "at least one rendition" in _refusal()[0][2]
    too_many_ops = {"name": "a", "size": 8, "ops": [{"op": "autocontrast"}] * 9}
    assert _refusal(too_many_ops)[0][:2] == ("renditions.0.ops", "too_long")


def test_background_is_normalised_and_a_request_round_trips_through_json() -> None:
    request = _request(
        {"name": "tile", "width": 800, "height": 1000, "fit": "pad", "background": "#FfF"},
        {"name": "feed", "width": 1080, "height": 1350, "fit": "cover", "ops": [{"op": "unsharp_mask"}]},
    )
    assert request.renditions is not None and request.renditions[0].background == "#ffffff"
    assert request.renditions[0].rgb() == (255, 255, 255)
    assert request.renditions[1].ops[0].model_dump() == {
        "op": "unsharp_mask",
        "radius": 2.0,
        "percent": 150,
        "threshold": 3,
    }
    assert GenerateRequest.model_validate_json(request.model_dump_json()) == request


def _resolve(request: GenerateRequest, limits: Limits | None = None) -> GenerateJob:
    now = datetime(2026, 12, 7, tzinfo=UTC)
    return resolve_request(request, CATALOG, limits or Limits(), job_id="job-12345678", now=now)


def test_the_job_carries_the_renditions_it_was_asked_for() -> None:
    request = _request(SQUARE, {"name": "feed", "width": 1080, "height": 1350, "fit": "cover"})
    job = _resolve(request)
    assert job.renditions == request.renditions
    assert GenerateJob.model_validate_json(job.model_dump_json()) == job


def test_a_job_over_the_output_pixel_limit_is_refused_with_its_figure_and_the_limit() -> None:
    # 2 images x (1080 x 1080 + 1080 x 1350) = 5,248,800 pixels
    request = _request(SQUARE, {"name": "feed", "width": 1080, "height": 1350, "fit": "pad"})
    assert _resolve(request, Limits(max_output_pixels_per_job=5_248_800)).renditions
    with pytest.raises(InvalidJob) as info:
        _resolve(request, Limits(max_output_pixels_per_job=5_248_799))
    assert info.value.field == "renditions"
    message = str(info.value)
    assert "5,248,800 output pixels" in message and "5,248,799" in message
    assert "GENQ_LIMITS__MAX_OUTPUT_PIXELS_PER_JOB" in message and "1080x1080 + 1080x1350" in message


def test_contain_counts_its_exact_size_not_the_box() -> None:
    # a 28 x 28 sample contained in 1080 x 1350 is 1080 x 1080: 2 images = 2,332,800 pixels
    request = _request({"name": "feed", "width": 1080, "height": 1350})
    assert _resolve(request, Limits(max_output_pixels_per_job=2_332_800)).renditions
    with pytest.raises(InvalidJob):
        _resolve(request, Limits(max_output_pixels_per_job=2_332_799))


def test_a_job_without_renditions_counts_the_models_own_size() -> None:
    request = GenerateRequest(model="fmnist-cgan", label="sneaker", count=10)  # 10 x 784 = 7,840
    assert _resolve(request, Limits(max_output_pixels_per_job=7_840)).items
    with pytest.raises(InvalidJob) as info:
        _resolve(request, Limits(max_output_pixels_per_job=7_839))
    assert info.value.field == "count" and "10 images of 28x28" in str(info.value)


@pytest.mark.parametrize(
    ("fields", "size"),
    [
        ({"size": 1080, "fit": "cover"}, (1080, 1080)),
        ({"width": 1080, "height": 1350}, (1080, 1080)),
        ({"width": 1080, "height": 1350, "fit": "pad"}, (1080, 1350)),
        ({"height": 99}, (99, 99)),
    ],
)
def test_output_size_of_a_square_sample(fields: dict[str, Any], size: tuple[int, int]) -> None:
    assert output_size(28, 28, Rendition.model_validate({"name": "r", **fields})) == size
