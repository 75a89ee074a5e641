"""Development mode accepts the webhook secret published in this repository: never beyond loopback or on real S3."""

from __future__ import annotations

import subprocess
import sys

import pytest

from producer.core.settings import GenqSettings, dev_mode_problem

DEV, PROD = GenqSettings(env="dev"), GenqSettings(env="prod")


@pytest.mark.parametrize(
    ("bind_host", "s3_endpoint", "refused"),
    [
        ("127.0.0.1", None, False),
        ("::1", None, False),
        ("localhost", None, False),
        ("0.0.0.0", None, True),
        ("10.0.0.5", None, True),
        (None, "http://127.0.0.1:9000", False),
        (None, "http://minio:9000", False),  # docker-compose's own MinIO
        (None, "", True),  # no AWS_ENDPOINT_URL: boto3 goes to AWS S3
        (None, "https://s3.eu-west-1.amazonaws.com", True),
        (None, None, False),  # not checked
    ],
)
def test_dev_mode_is_refused_beyond_loopback_and_on_real_s3(
    bind_host: str | None, s3_endpoint: str | None, refused: bool
) -> None:
    problem = dev_mode_problem(DEV, bind_host=bind_host, s3_endpoint=s3_endpoint)
    assert (problem is not None) is refused
    if refused:
        assert "GENQ_ENV=prod" in problem
    assert dev_mode_problem(PROD, bind_host=bind_host, s3_endpoint=s3_endpoint) is None


def test_genq_api_refuses_dev_mode_on_a_public_bind(redis_url: str) -> None:
    env = {"GENQ_REDIS__URL": redis_url, "PATH": "/usr/bin:/bin"}
    argv = [sys.executable, "-m", "producer.cli", "api", "--host", "0.0.0.0", "--port", "0"]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "loopback only" in result.stderr


def test_a_worker_refuses_dev_mode_with_real_s3(redis_url: str) -> None:
    # No AWS_ENDPOINT_URL: boto3 would store in AWS S3 itself, with callbacks signed by the public placeholder.
    env = {"GENQ_REDIS__URL": redis_url, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "producer.cli", "worker", "-c", "1", "-Q", "generate"]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "refusing to start: development mode" in result.stdout + result.stderr
