"""`genq` without its services or with a bad setting: one line naming the service, where genq looked (never a
password) and the setting, a documented exit code, and the traceback only with `--debug`. Real Redis and a real moto
S3 where a test needs one up; a loopback port nothing listens on where it needs one down."""

from __future__ import annotations

import uuid
from pathlib import Path

import boto3
import pytest
import redis
from api_server import publish_catalog
from typer.testing import CliRunner

from producer.cli import exits
from producer.cli.main import app
from producer.settings import ClientSettings


def lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--label", "sneaker", "--count", "1"],
        ["generate", "--label", "sneaker", "--count", "1", "--wait", "--download", "out"],
        ["status", "3b1ba29b66c042218b3b9f594b3e15f2"],
        ["wait", "3b1ba29b66c042218b3b9f594b3e15f2"],
        ["cancel", "3b1ba29b66c042218b3b9f594b3e15f2"],
        ["models"],
        ["keys", "list"],
    ],
)
def test_every_command_without_redis_prints_one_line_naming_the_url_and_the_setting_and_exits_3(
    clean_env: pytest.MonkeyPatch, closed_port: int, argv: list[str]
) -> None:
    port = closed_port
    clean_env.setenv("GENQ_REDIS__URL", f"redis://:hunter2@127.0.0.1:{port}/0")

    result = CliRunner().invoke(app, argv)

    assert result.exit_code == exits.UNAVAILABLE == 3
    [line] = lines(result.output)
    assert line.startswith(f"error: cannot reach Redis at redis://127.0.0.1:{port}/0 (GENQ_REDIS__URL): ")
    assert "Connection refused" in line
    assert "hunter2" not in result.output and "Traceback" not in result.output


def test_debug_prints_the_traceback_above_the_same_line(clean_env: pytest.MonkeyPatch, closed_port: int) -> None:
    clean_env.setenv("GENQ_REDIS__URL", f"redis://127.0.0.1:{closed_port}/0")

    result = CliRunner().invoke(app, ["--debug", "status", "3b1ba29b66c042218b3b9f594b3e15f2"])

    assert result.exit_code == 3
    assert "Traceback (most recent call last)" in result.output
    assert "redis.exceptions.ConnectionError" in result.output
    assert lines(result.output)[-1].startswith("error: cannot reach Redis at ")


def test_download_without_s3_prints_one_line_naming_the_endpoint_and_the_setting_and_exits_3(
    clean_env: pytest.MonkeyPatch,
    closed_port: int,
    redis_url: str,
    redis_client: redis.Redis,
    job_completer: None,
    tmp_path: Path,
) -> None:
    publish_catalog(redis_client)
    port = closed_port
    clean_env.setenv("GENQ_REDIS__URL", redis_url)
    clean_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")

    result = CliRunner().invoke(
        app, ["generate", "--label", "sneaker", "--count", "1", "--wait", "--download", str(tmp_path / "out")]
    )

    assert result.exit_code == 3, result.output
    errors = [line for line in lines(result.output) if "error" in line]
    assert errors == [lines(result.output)[-1]]
    assert errors[0].startswith(f"error: cannot reach S3 at http://127.0.0.1:{port} (AWS_ENDPOINT_URL): ")
    assert "Traceback" not in result.output


def test_a_malformed_webhook_secret_is_refused_in_one_line_naming_the_command_that_makes_one(
    clean_env: pytest.MonkeyPatch, closed_port: int
) -> None:
    clean_env.setenv("GENQ_WEBHOOK__SECRET", "my shop secret")
    clean_env.setenv("GENQ_REDIS__URL", f"redis://127.0.0.1:{closed_port}/0")

    for argv in (["status", "3b1ba29b66c042218b3b9f594b3e15f2"], ["worker"], ["api"]):
        result = CliRunner().invoke(app, argv)

        assert result.exit_code == exits.INVALID == 2
        [line] = lines(result.output)
        assert line.startswith("error: GENQ_WEBHOOK__SECRET is not a Standard Webhooks secret")
        assert "`genq keys webhook-secret`" in line
        assert "my shop secret" not in result.output  # a secret, even a malformed one, is never printed


def test_genq_keys_webhook_secret_prints_a_secret_the_settings_accept(clean_env: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(app, ["keys", "webhook-secret"])

    assert result.exit_code == 0
    secret = result.stdout.strip()
    assert secret.startswith("whsec_") and result.stdout.count("\n") == 1
    clean_env.setenv("GENQ_WEBHOOK__SECRET", secret)
    assert ClientSettings().webhook.secret == secret
    assert CliRunner().invoke(app, ["keys", "webhook-secret"]).stdout.strip() != secret


def test_an_invalid_setting_is_named_without_its_value(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GENQ_S3__PRESIGN_EXPIRES_S", "forever")

    result = CliRunner().invoke(app, ["status", "3b1ba29b66c042218b3b9f594b3e15f2"])

    assert result.exit_code == 2
    [line] = lines(result.output)
    assert line.startswith("invalid setting GENQ_S3__PRESIGN_EXPIRES_S: ") and "forever" not in line


def test_a_worker_without_redis_exits_3_before_celery_starts(clean_env: pytest.MonkeyPatch, closed_port: int) -> None:
    port = closed_port
    clean_env.setenv("GENQ_REDIS__URL", f"redis://127.0.0.1:{port}/0")
    clean_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")  # not AWS: development mode may store there

    result = CliRunner().invoke(app, ["worker", "-Q", "generate,generate.bulk"])

    assert result.exit_code == 3
    [line] = lines(result.output)
    assert line.startswith(f"error: cannot reach Redis at redis://127.0.0.1:{port}/0 (GENQ_REDIS__URL): ")


def test_a_worker_without_s3_exits_3_naming_the_endpoint(
    clean_env: pytest.MonkeyPatch, closed_port: int, redis_url: str
) -> None:
    port = closed_port
    clean_env.setenv("GENQ_REDIS__URL", redis_url)
    clean_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")

    result = CliRunner().invoke(app, ["worker", "-Q", "generate,generate.bulk"])

    assert result.exit_code == 3
    [line] = lines(result.output)
    assert line.startswith(f"error: cannot reach S3 at http://127.0.0.1:{port} (AWS_ENDPOINT_URL): ")


def test_a_worker_refuses_to_start_without_a_bucket_it_may_not_create(
    clean_env: pytest.MonkeyPatch, redis_url: str, s3_endpoint: str
) -> None:
    bucket = f"genq-missing-{uuid.uuid4().hex[:8]}"
    clean_env.setenv("GENQ_REDIS__URL", redis_url)
    clean_env.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    clean_env.setenv("GENQ_S3__BUCKET", bucket)
    clean_env.setenv("GENQ_S3__CREATE_BUCKET", "false")

    result = CliRunner().invoke(app, ["worker", "-Q", "generate,generate.bulk"])

    assert result.exit_code == 2
    [line] = lines(result.output)
    assert f"bucket {bucket!r} (GENQ_S3__BUCKET) does not exist at {s3_endpoint}" in line
    assert "GENQ_S3__CREATE_BUCKET=true" in line
    existing = {b["Name"] for b in boto3.client("s3", endpoint_url=s3_endpoint).list_buckets()["Buckets"]}
    assert bucket not in existing


def test_a_worker_creates_its_missing_bucket_at_start_on_a_loopback_endpoint(
    clean_env: pytest.MonkeyPatch, redis_url: str, s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from producer.cli.worker import check_services
    from worker.settings import WorkerSettings

    bucket = f"genq-new-{uuid.uuid4().hex[:8]}"
    clean_env.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # 127.0.0.1: GENQ_S3__CREATE_BUCKET defaults to on
    settings = WorkerSettings.model_validate({"redis": {"url": redis_url}, "s3": {"bucket": bucket}})

    check_services(settings, ["callbacks"])  # delivers callbacks only: needs no bucket
    assert bucket not in {b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]}
    check_services(settings, ["generate", "generate.bulk"])
    check_services(settings, ["generate", "generate.bulk"])  # the next worker finds it

    boto3.client("s3").head_bucket(Bucket=bucket)
    assert capsys.readouterr().err.count(f"created bucket {bucket!r}") == 1
