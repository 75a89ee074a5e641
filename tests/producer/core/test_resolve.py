"""Resolving a request against the catalogue and limits: every refusal names its field."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from producer.contract import GenerateRequest, ModelEntry, ModelVersionInfo
from producer.core.resolve import resolve_request
from producer.core.settings import Limits
from producer.errors import InvalidJob

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
INFO = ModelVersionInfo(arch="cgan", class_names=CLASSES, resolution=28, channels=1)
CATALOG = {
    "fmnist-cgan": ModelEntry(
        name="fmnist-cgan", versions={"1": INFO, "2": INFO}, aliases={"latest": "2", "production": "1"}
    )
}
NOW = datetime(2026, 11, 29, tzinfo=UTC)


def resolve(limits: Limits | None = None, **fields: object):  # type: ignore[no-untyped-def]
    request = GenerateRequest.model_validate(fields)
    return resolve_request(request, CATALOG, limits or Limits(), job_id="job-12345678", now=NOW)


def test_label_name_resolves_to_index_and_latest_version() -> None:
    job = resolve(model="fmnist-cgan", label="sneaker", count=8, seed=42)
    assert job.model_version == "2"
    assert [(i.index, i.name, i.count) for i in job.items] == [(7, "sneaker", 8)]
    assert job.seed == 42
    assert job.total_images == 8


@pytest.mark.parametrize(("ref", "version"), [("fmnist-cgan@1", "1"), ("fmnist-cgan:production", "1")])
def test_version_and_alias_are_pinned(ref: str, version: str) -> None:
    assert resolve(model=ref, label=0).model_version == version


def test_counts_map_mixes_names_and_indices_in_order() -> None:
    job = resolve(model="fmnist-cgan", counts={"bag": 2, "0": 1})
    assert [(i.index, i.count) for i in job.items] == [(8, 2), (0, 1)]
    assert [label.index for label in job.image_labels()] == [8, 8, 0]


def test_missing_seed_is_chosen_and_recorded() -> None:
    seeds = {resolve(model="fmnist-cgan", label=1).seed for _ in range(5)}
    assert len(seeds) > 1


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"model": "shoes-cgan", "label": 1}, "model", "unknown model 'shoes-cgan' (known: fmnist-cgan)"),
        ({"model": "fmnist-cgan@9", "label": 1}, "model", "no version '9'"),
        ({"model": "fmnist-cgan:staging", "label": 1}, "model", "no alias 'staging'"),
        ({"model": "fmnist-cgan", "label": "hat"}, "label", "unknown label 'hat'"),
        ({"model": "fmnist-cgan", "label": 10}, "label", "out of range 0..9"),
        ({"model": "fmnist-cgan", "counts": {"bag": 1, "hat": 2}}, "counts.hat", "unknown label 'hat'"),
    ],
)
def test_unknown_model_or_label_names_the_field(fields: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(InvalidJob) as info:
        resolve(**fields)
    assert info.value.field == field
    assert words in str(info.value)


def test_over_the_image_limit_names_count_and_the_setting() -> None:
    with pytest.raises(InvalidJob) as info:
        resolve(Limits(max_images_per_job=10), model="fmnist-cgan", label="bag", count=11)
    assert info.value.field == "count"
    assert "GENQ_LIMITS__MAX_IMAGES_PER_JOB" in str(info.value)
    resolve(Limits(max_images_per_job=10), model="fmnist-cgan", label="bag", count=10)  # at the limit: fine


def test_oversized_metadata_names_metadata() -> None:
    with pytest.raises(InvalidJob) as info:
        resolve(Limits(max_metadata_bytes=32), model="fmnist-cgan", label=1, metadata={"note": "x" * 40})
    assert info.value.field == "metadata"


def test_per_class_asks_for_every_class_of_the_model_in_label_order() -> None:
    job = resolve(model="fmnist-cgan", per_class=3, seed=1)
    assert [(i.index, i.name, i.count) for i in job.items] == [(k, name, 3) for k, name in enumerate(CLASSES)]
    assert job.total_images == 30


def test_per_class_is_checked_against_the_limit_once_the_class_count_is_known() -> None:
    with pytest.raises(InvalidJob) as exc:
        resolve(Limits(max_images_per_job=25), model="fmnist-cgan", per_class=3)
    assert exc.value.field == "per_class" and "3 for each of 10 classes" in str(exc.value)


@pytest.mark.parametrize(
    "fields", [{"per_class": 2, "label": "bag"}, {"per_class": 2, "counts": {"bag": 1}}, {"per_class": 0}]
)
def test_per_class_is_the_only_way_asked(fields: dict[str, object]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        GenerateRequest.model_validate({"model": "fmnist-cgan", **fields})
