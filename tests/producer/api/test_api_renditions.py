"""Renditions over the HTTP API (real uvicorn and Redis): bad operations and parameters refused naming the field,
the output-pixel limit, and a good request accepted with its renditions."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import redis

from producer.core import constants

SQUARE = {"name": "square", "size": 1080, "fit": "cover"}


def _body(*renditions: dict[str, Any], count: int = 2) -> dict[str, Any]:
    return {"model": "fmnist-cgan", "label": "sneaker", "count": count, "seed": 1, "renditions": list(renditions)}


def _nothing_enqueued(db: redis.Redis) -> bool:
    return sum(db.llen(q) for q in constants.GENERATE_QUEUES.values()) == 0 and not db.keys("genq:job:*")


@pytest.mark.parametrize(
    ("rendition", "loc", "kind"),
    [
        (
            {"name": "feed", "size": 64, "ops": [{"op": "autocontrast"}, {"op": "unsharp_mask", "radius": 80}]},
            ["body", "renditions", 1, "ops", 1, "unsharp_mask", "radius"],
            "less_than_equal",
        ),
        (
            {"name": "feed", "size": 64, "ops": [{"op": "autocontrast"}, {"op": "blur", "radius": 2}]},
            ["body", "renditions", 1, "ops", 1],
            "unknown_operation",
        ),
        (
            {"name": "feed", "size": 64, "ops": [{"op": "contrast", "amount": 2}]},
            ["body", "renditions", 1, "ops", 0, "contrast", "amount"],
            "extra_forbidden",
        ),
        ({"name": "feed", "size": 64, "fit": "stretch"}, ["body", "renditions", 1, "fit"], "literal_error"),
        ({"name": "feed", "width": 0, "height": 10}, ["body", "renditions", 1, "width"], "greater_than_equal"),
        ({"name": "feed", "size": 10, "background": "red"}, ["body", "renditions", 1, "background"], "value_error"),
    ],
)
def test_a_bad_operation_or_parameter_is_422_naming_the_field(
    acme: httpx.Client, catalog: redis.Redis, rendition: dict[str, Any], loc: list[Any], kind: str
) -> None:
    response = acme.post("/v1/jobs", json=_body(SQUARE, rendition))
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert [(d["loc"], d["type"]) for d in detail] == [(loc, kind)]
    if kind == "unknown_operation":
        assert "autocontrast, unsharp_mask, contrast, sharpness" in detail[0]["msg"]
    assert _nothing_enqueued(catalog)


def test_a_job_over_the_output_pixel_limit_is_422_with_its_figure_and_the_limit(
    acme: httpx.Client, catalog: redis.Redis
) -> None:
    # 100 images x 4096 x 4096 = 1,677,721,600 pixels, over the default 1,000,000,000
    response = acme.post("/v1/jobs", json=_body({"name": "huge", "size": 4096}, count=100))
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["loc"] == ["body", "renditions"] and detail["type"] == "invalid_job"
    assert "1,677,721,600 output pixels" in detail["msg"] and "1,000,000,000" in detail["msg"]
    assert "GENQ_LIMITS__MAX_OUTPUT_PIXELS_PER_JOB" in detail["msg"]
    assert _nothing_enqueued(catalog)


def test_a_job_with_renditions_is_accepted_and_has_no_sheet_until_it_succeeds(
    acme: httpx.Client, catalog: redis.Redis
) -> None:
    created = acme.post("/v1/jobs", json=_body(SQUARE, {"name": "feed", "width": 1080, "height": 1350, "fit": "pad"}))
    assert created.status_code == 202, created.text
    assert created.json()["sheet_key"] is None
    sheet = acme.get(f"/v1/jobs/{created.json()['id']}/sheet")
    assert sheet.status_code == 409 and sheet.json()["detail"][0]["type"] == "sheet_not_written"
