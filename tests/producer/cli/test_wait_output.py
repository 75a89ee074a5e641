"""`genq wait` and `genq generate --wait` print one line when the job ends (`--json`: the whole view, as before);
`--output webdataset` asks for tar shards. Real Redis; the job is recorded as a worker would record it."""

from __future__ import annotations

import json

import pytest
import redis
from api_server import publish_catalog
from typer.testing import CliRunner

from producer.cli.main import app
from producer.contract import GenerateJob, JobView


@pytest.fixture
def queue_mode(clean_env: pytest.MonkeyPatch, redis_url: str, redis_client: redis.Redis) -> redis.Redis:
    publish_catalog(redis_client)
    clean_env.setenv("GENQ_REDIS__URL", redis_url)
    return redis_client


def test_generate_wait_prints_one_summary_line_on_stdout(queue_mode: redis.Redis, job_completer: None) -> None:
    result = CliRunner().invoke(app, ["generate", "--label", "sneaker", "--count", "1", "--seed", "3", "--wait"])

    assert result.exit_code == 0, result.output
    [line] = result.stdout.splitlines()
    job_id = line.split()[0]
    assert line.startswith(f"{job_id} succeeded: 1/1 images, manifest jobs/{job_id}/manifest.json, ")
    assert line.endswith(" s")


def test_wait_prints_one_line_and_with_json_the_whole_view(queue_mode: redis.Redis, job_completer: None) -> None:
    submitted = CliRunner().invoke(app, ["generate", "--label", "bag", "--count", "1"])
    job_id = submitted.stdout.strip()

    waited = CliRunner().invoke(app, ["wait", job_id])
    as_json = CliRunner().invoke(app, ["wait", job_id, "--json"])

    assert waited.exit_code == as_json.exit_code == 0, waited.output
    assert waited.stdout.startswith(f"{job_id} succeeded: ") and waited.stdout.count("\n") == 1
    view = JobView.model_validate_json(as_json.stdout)
    assert view.id == job_id and view.manifest_key == f"jobs/{job_id}/manifest.json"


def test_generate_output_webdataset_asks_for_tar_shards_and_json_prints_the_queued_view(
    queue_mode: redis.Redis,
) -> None:
    result = CliRunner().invoke(app, ["generate", "--label", "bag", "--count", "2", "--output", "webdataset", "--json"])

    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    assert view["status"] == "queued"
    spec = GenerateJob.model_validate_json(queue_mode.hget(f"genq:job:{view['id']}", "spec") or b"")
    assert spec.output == "webdataset"


def test_an_unknown_output_layout_is_refused_naming_the_field(queue_mode: redis.Redis) -> None:
    result = CliRunner().invoke(app, ["generate", "--label", "bag", "--output", "tar"])

    assert result.exit_code == 2
    assert result.output.strip() == "invalid request: output: Input should be 'objects' or 'webdataset'"
