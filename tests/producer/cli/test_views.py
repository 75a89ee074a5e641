"""`genq wait` and `genq generate --wait` end with one line per job, not its whole view."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from factories import output_refs

from producer.cli.views import duration, summary
from producer.contract import JobError, JobStatus, JobView, Progress, TrainingView

CREATED = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


def test_a_succeeded_job_of_a_thousand_images_is_summed_up_in_one_line() -> None:
    view = JobView(
        id="3b1ba29b66c042218b3b9f594b3e15f2",
        status=JobStatus.SUCCEEDED,
        model="fmnist-cgan",
        progress=Progress(done=1000, total=1000),
        outputs=output_refs(range(1000), prefix="jobs/3b1b/"),
        manifest_key="jobs/3b1b/manifest.json",
        created_at=CREATED,
        finished_at=CREATED + timedelta(seconds=8.44),
    )

    assert summary(view) == (
        "3b1ba29b66c042218b3b9f594b3e15f2 succeeded: 1000/1000 images, manifest jobs/3b1b/manifest.json, 8.4 s"
    )
    assert len(view.model_dump_json(indent=2).splitlines()) > 10_000  # what `--json` prints


def test_a_job_with_a_contact_sheet_names_it_after_the_manifest() -> None:
    view = JobView(
        id="j2",
        status=JobStatus.SUCCEEDED,
        model="fmnist-cgan",
        progress=Progress(done=2, total=2),
        manifest_key="jobs/j2/manifest.json",
        sheet_key="jobs/j2/sheet.png",
        created_at=CREATED,
        finished_at=CREATED + timedelta(seconds=1),
    )
    assert summary(view) == "j2 succeeded: 2/2 images, manifest jobs/j2/manifest.json, sheet jobs/j2/sheet.png, 1.0 s"


def test_a_failed_job_says_what_it_stored_that_it_has_no_manifest_and_the_error_type() -> None:
    view = JobView(
        id="j1",
        status=JobStatus.FAILED,
        model="fmnist-cgan",
        progress=Progress(done=64, total=200),
        error=JobError(type="StorageUnavailable", message="S3 down"),
        created_at=CREATED,
        finished_at=CREATED + timedelta(minutes=3, seconds=2),
    )

    assert summary(view) == "j1 failed: 64/200 images, no manifest, 3 min 2 s (StorageUnavailable)"


def test_a_fine_tune_names_the_model_it_published_and_a_job_not_ended_counts_time_to_now() -> None:
    trained = JobView(
        id="f1",
        kind="finetune",
        status=JobStatus.SUCCEEDED,
        model="fmnist-cgan",
        training=TrainingView(step=3000, total_steps=3000, model="brand-x@2"),
        created_at=CREATED,
        finished_at=CREATED + timedelta(hours=1, minutes=4),
    )
    running = JobView(id="j2", status=JobStatus.RUNNING, model="fmnist-cgan", created_at=CREATED)

    assert summary(trained) == "f1 succeeded: model brand-x@2, 1 h 4 min"
    assert summary(running, now=CREATED + timedelta(seconds=1.25)) == "j2 running: 0 images, no manifest, 1.2 s"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (-0.1, "0.0 s"),
        (0.04, "0.0 s"),
        (59.94, "59.9 s"),
        (60, "1 min 0 s"),
        (3599.4, "59 min 59 s"),
        (7260, "2 h 1 min"),
    ],
)
def test_durations_read_as_a_person_says_them(seconds: float, shown: str) -> None:
    assert duration(seconds) == shown
