"""`genq model publish`: the operator's way to publish a system model, against real Redis and a moto S3 bucket."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from tiny_model import make_tiny_model
from typer.testing import CliRunner

from producer.cli.main import app
from producer.contract import ModelEntry
from producer.core import constants
from producer.core.resolve import visible_models


@pytest.fixture
def operator_env(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, redis_client: redis.Redis, s3_bucket: str, tmp_path: Path
) -> Path:
    """A worker's settings for the CLI (Redis, the bucket, a model root holding tiny-sys@1); returns the root."""
    for name in ("GENQ_REDIS__URL", "GENQ_S3__BUCKET", "GENQ_STORAGE", "GENQ_MODEL_DIRS", "GENQ_MODEL_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "models"
    make_tiny_model(root, name="tiny-sys")
    monkeypatch.setenv("GENQ_REDIS__URL", redis_url)
    monkeypatch.setenv("GENQ_S3__BUCKET", s3_bucket)
    monkeypatch.setenv("GENQ_STORAGE", "s3")
    monkeypatch.setenv("GENQ_MODEL_DIRS", json.dumps([str(root)]))
    monkeypatch.setenv("GENQ_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    return root


def catalog(client: redis.Redis) -> dict[str, ModelEntry]:
    return {k.decode(): ModelEntry.model_validate_json(v) for k, v in client.hgetall(constants.CATALOG_KEY).items()}


def test_an_operator_publishes_a_system_model_every_tenant_sees(
    operator_env: Path, redis_client: redis.Redis, tmp_path: Path
) -> None:
    export = make_tiny_model(tmp_path / "run", name="export", seed=3)

    result = CliRunner().invoke(app, ["model", "publish", str(export), "--name", "tiny-sys", "--alias", "production"])

    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == "tiny-sys@2"  # above the local version 1
    entry = catalog(redis_client)["tiny-sys"]
    assert entry.owner is None and set(entry.versions) == {"1", "2"}
    assert entry.aliases == {"latest": "2", "production": "2"}
    for tenant in ("acme", "globex", None):
        assert visible_models(catalog(redis_client), tenant)["tiny-sys"].key == "tiny-sys"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--name", "acme/brand-x"], "invalid model reference"),
        (["--name", "tiny-sys@3"], "the model's name alone"),
        (["--name", "tiny-sys", "--alias", "Prod Uction"], "invalid alias"),
    ],
)
def test_bad_names_are_refused_before_anything_is_published(
    operator_env: Path, redis_client: redis.Redis, tmp_path: Path, argv: list[str], words: str
) -> None:
    export = make_tiny_model(tmp_path / "run", name="export")
    result = CliRunner().invoke(app, ["model", "publish", str(export), *argv])
    assert result.exit_code == 2 and words in " ".join(result.output.split())
    assert redis_client.keys("genq:model:*") == []


def test_a_folder_that_does_not_load_is_refused(operator_env: Path, redis_client: redis.Redis, tmp_path: Path) -> None:
    export = make_tiny_model(tmp_path / "run", name="export")
    (export / "weights.safetensors").write_bytes(b"not safetensors")
    result = CliRunner().invoke(app, ["model", "publish", str(export), "--name", "tiny-sys"])
    assert result.exit_code == 2 and "not a model folder that loads" in " ".join(result.output.split())
    assert redis_client.keys("genq:model:*") == []
