"""`pip install genq` without the worker extra: the producer side submits, waits and downloads with none of the
worker side's packages importable, and the commands that need them say so in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from stack import Stack
from worker_process import WorkerProcess

from producer.cli import WORKER_SIDE

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# Run as `python -c`: the worker side's packages are absent, as in an install of `genq` alone (a finder that
# refuses them before any other is asked), then the `genq` console script's own entry point.
WITHOUT_WORKER_SIDE = f"""
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {list(WORKER_SIDE)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Absent())
sys.argv = ["genq", *sys.argv[1:]]
from producer.cli import run
run()
"""


def _genq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", WITHOUT_WORKER_SIDE, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_the_project_installs_the_worker_side_only_with_its_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda requirement: requirement.split("[")[0].split(">")[0].split("<")[0].split("=")[0].lower()  # noqa: E731
    base = {name(r) for r in project["dependencies"]}
    worker = {name(r) for r in project["optional-dependencies"]["worker"]}

    assert worker == {"torch", "numpy", "pillow", "safetensors"} and not base & worker
    assert "genq[worker]" in project["optional-dependencies"]["dev"]  # the README's first command installs both


def test_the_producer_side_alone_submits_waits_and_downloads(
    stack: Stack, module_worker: WorkerProcess, tmp_path: Path
) -> None:
    env = {**os.environ, "GENQ_REDIS__URL": stack.redis_url, "GENQ_S3__BUCKET": stack.bucket}
    args = ["generate", "--model", "fmnist-cgan", "--label", "bag", "--count", "2", "--seed", "5", "--wait", "--json"]

    result = _genq(env, *args, "--download", str(tmp_path))

    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    assert view["status"] == "succeeded" and len(view["outputs"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.png", "00001.png", "manifest.json", "sheet.png"]
    status = _genq(env, "status", view["id"])
    assert status.returncode == 0 and json.loads(status.stdout)["id"] == view["id"], status.stderr


def test_commands_that_need_the_worker_side_say_so_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}  # no Redis: embedded mode

    result = _genq(env, "generate", "--model", "fmnist-cgan", "--label", "bag", "--out", str(tmp_path))

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "genq generate needs genq's worker side" in lines[0] and "pip install 'genq[worker]'" in lines[0]
    assert list(tmp_path.iterdir()) == []
