"""Fine-tune requests: validation at the edge, resolution against the catalogue, data set references, uploads."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from producer.contract import FineTuneRequest, ModelEntry, ModelVersionInfo
from producer.core.records import JOB_SPEC
from producer.core.resolve import resolve_finetune
from producer.core.settings import Limits
from producer.errors import InvalidJob
from producer.uploads import archive_reference, dataset_files, upload_dataset

CLASSES = ["tshirt", "trouser", "sandal"]
CATALOG = {
    "fmnist-cgan": ModelEntry(
        name="fmnist-cgan",
        versions={"1": ModelVersionInfo(arch="cgan", class_names=CLASSES, resolution=28, channels=1)},
        aliases={"latest": "1"},
    ),
    "fmnist-cvae": ModelEntry(
        name="fmnist-cvae",
        versions={"1": ModelVersionInfo(arch="cvae", class_names=CLASSES, resolution=28, channels=1)},
        aliases={"latest": "1"},
    ),
}
NOW = datetime(2026, 11, 30, tzinfo=UTC)
LIMITS = Limits()  # GENQ_LIMITS__*'s defaults


def request(**fields: object) -> FineTuneRequest:
    return FineTuneRequest.model_validate({"base": "fmnist-cgan", "dataset": "abc123/", "name": "brand-x", **fields})


def field_of(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return ".".join(str(p) for p in exc.value.errors()[0]["loc"])


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"dataset": "../other-tenant/"}, "dataset"),
        ({"dataset": "/etc/passwd"}, "dataset"),
        ({"dataset": "abc123/data.rar"}, "dataset"),
        ({"name": "Brand X"}, "name"),
        ({"steps": 0}, "steps"),
        ({"seed": False}, "seed"),  # found by the API fuzz test: lax mode read false as seed 0
        ({"steps": True}, "steps"),
        ({"lr_d": True}, "lr_d"),
        ({"batch_size": 1}, "batch_size"),
        ({"lr_g": 0.5}, "lr_g"),
        ({"augment": {"policy": ["rotate"]}}, "augment.policy.0"),
        ({"augment": {"ada_target": 1.5}}, "augment.ada_target"),
        ({"augment": {"policy": [], "ada_target": 0.6}}, "augment"),
        ({"augment": {"policy": ["cutout", "cutout"]}}, "augment"),
        ({"classes": ["bag", "bag"]}, "classes"),
        ({"freeze_d": 99}, "freeze_d"),
        ({"gate": {"min_label_consistency": 2}}, "gate.min_label_consistency"),
        ({"unknown": 1}, "unknown"),
        ({"base": "Not A Ref!"}, "base"),
    ],
)
def test_bad_fields_are_refused_and_named(fields: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        request(**fields)
    assert field_of(exc) == field


@pytest.mark.parametrize("dataset", ["abc123/", "abc123/data.zip", "abc123/x.tar.gz", "abc123/x.tgz", "a/b.npz"])
def test_folder_and_archive_references_are_accepted(dataset: str) -> None:
    assert request(dataset=dataset).dataset == dataset


def test_resolution_pins_base_version_and_scopes_the_dataset_to_the_tenant() -> None:
    job = resolve_finetune(request(seed=7), CATALOG, LIMITS, job_id="job-12345678", now=NOW, tenant="acme")
    assert (job.base_name, job.base_version, job.seed) == ("fmnist-cgan", "1", 7)
    assert job.dataset_key == "tenants/acme/datasets/abc123/"
    untenanted = resolve_finetune(request(), CATALOG, LIMITS, job_id="job-12345678", now=NOW)
    assert untenanted.dataset_key == "datasets/abc123/"
    assert untenanted.seed >= 0  # chosen and recorded


def test_job_round_trips_through_the_record_union() -> None:
    job = resolve_finetune(request(), CATALOG, LIMITS, job_id="job-12345678", now=NOW)
    assert JOB_SPEC.validate_json(job.model_dump_json()) == job


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"base": "nope"}, "base", "unknown base model 'nope'"),
        ({"base": "fmnist-cgan@9"}, "base", "no version '9'"),
        ({"base": "fmnist-cvae"}, "base", "needs a cgan base"),
        ({"name": "fmnist-cvae"}, "name", "not a cgan"),
    ],
)
def test_resolution_refusals_name_the_field(fields: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(InvalidJob) as exc:
        resolve_finetune(request(**fields), CATALOG, LIMITS, job_id="job-12345678", now=NOW)
    assert exc.value.field == field
    assert words in str(exc.value)


def test_metadata_past_max_metadata_bytes_is_refused_naming_the_field_as_for_generate() -> None:
    # 4,096 bytes by default (GENQ_LIMITS__MAX_METADATA_BYTES): a fine-tune's metadata was bounded only by 64 KiB.
    metadata = {"notes": "x" * 5000}
    with pytest.raises(InvalidJob) as refused:
        resolve_finetune(request(metadata=metadata), CATALOG, LIMITS, job_id="job-12345678", now=NOW, tenant="acme")
    assert refused.value.field == "metadata"
    assert "metadata is 5012 bytes as JSON, the limit is 4096 (GENQ_LIMITS__MAX_METADATA_BYTES)" in str(refused.value)

    lower = Limits(max_metadata_bytes=12)  # the deployment's setting decides, not the default
    with pytest.raises(InvalidJob, match="17 bytes as JSON, the limit is 12 "):
        resolve_finetune(request(metadata={"sku": "A-12345"}), CATALOG, lower, job_id="job-12345678", now=NOW)
    job = resolve_finetune(request(metadata={"sku": "A"}), CATALOG, lower, job_id="job-12345678", now=NOW)
    assert job.metadata == {"sku": "A"}


def test_folder_upload_skips_hidden_files_and_links_and_reports_progress(tmp_path: Path) -> None:
    root = tmp_path / "brand_x"
    (root / "bag").mkdir(parents=True)
    (root / "bag" / "1.png").write_bytes(b"a" * 10)
    (root / "bag" / ".DS_Store").write_bytes(b"junk")
    (root / "shoe").mkdir()
    (root / "shoe" / "2.jpg").write_bytes(b"b" * 5)
    (root / "shoe" / "link.png").symlink_to(root / "bag" / "1.png")
    put: dict[str, bytes] = {}
    progress: list[tuple[int, int]] = []
    upload = upload_dataset(root, put.__setitem__, on_progress=lambda d, t: progress.append((d, t)))
    upload_id = upload.dataset.rstrip("/")
    assert sorted(put) == [f"datasets/{upload_id}/bag/1.png", f"datasets/{upload_id}/shoe/2.jpg"]
    assert (upload.files, upload.bytes) == (2, 15)
    assert progress[-1] == (15, 15)


def test_upload_refuses_what_is_neither_folder_nor_archive(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InvalidJob, match="not a folder or an archive"):
        dataset_files(tmp_path / "notes.txt")
    with pytest.raises(InvalidJob, match="does not exist"):
        dataset_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidJob, match="holds no files"):
        dataset_files(tmp_path / "empty")


@pytest.mark.parametrize("name", ["../x.zip", "x.exe", "a/b.zip", ".hidden.zip", ""])
def test_archive_names_are_checked(name: str) -> None:
    with pytest.raises(InvalidJob) as exc:
        archive_reference(name)
    assert exc.value.field == "filename"


def test_archive_reference_is_fresh_per_upload() -> None:
    a, b = archive_reference("data.zip"), archive_reference("data.zip")
    assert a != b and a.endswith("/data.zip")
