"""Content Credentials end to end: a real `genq worker` (and embedded `genq generate`) signs every output of a
``provenance: "c2pa"`` job with the chain in its settings, and what lands in S3 reads back with ``c2pa.Reader``."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import c2pa
import numpy as np
import pytest
from c2pa_chain import LEAF_NAME, SigningChain, read_credentials
from PIL import Image
from shipped import CGAN_LATEST, CGAN_LATEST_REF
from stack import Stack, worker_env
from stack_fixtures import GENERATION_QUEUES, WorkerFactory

from producer.contract import GenerateRequest, JobStatus, Manifest, OutputFormat
from worker.generate.credentials import GENERATION_ASSERTION
from worker.generate.encode import IPTC_TRAINED_ALGORITHMIC

pytestmark = pytest.mark.integration


def _check_signed(data: bytes, content_type: str, chain: SigningChain, label: str, seed: int) -> None:
    read = read_credentials(data, content_type, chain.anchor_pem)
    assert (read.state, read.failures) == ("Trusted", [])
    [action] = read.assertion("c2pa.actions.v2")["actions"]
    assert (action["action"], action["digitalSourceType"]) == ("c2pa.created", IPTC_TRAINED_ALGORITHMIC)
    assert action["softwareAgent"] == {"name": "fmnist-cgan", "version": CGAN_LATEST}
    generation = read.assertion(GENERATION_ASSERTION)
    assert (generation["version"], generation["label"], generation["seed"]) == (CGAN_LATEST_REF, label, seed)
    assert read.manifest["signature_info"]["common_name"] == LEAF_NAME


def test_a_queued_c2pa_job_stores_signed_outputs_and_an_xmp_job_beside_it_does_not(
    stack: Stack, start_worker: WorkerFactory, c2pa_chain: SigningChain
) -> None:
    worker = start_worker(worker_env(stack, **c2pa_chain.env()), queues=GENERATION_QUEUES)
    assert "C2PA signing configured (ES256, chain of 2 certificates)" in worker.log()
    signed = stack.client.submit(
        GenerateRequest(model="fmnist-cgan", label="bag", count=3, seed=11, format="jpeg", provenance="c2pa")  # type: ignore[arg-type]
    )
    plain = stack.client.submit(GenerateRequest(model="fmnist-cgan", label="bag", count=3, seed=11, format="jpeg"))  # type: ignore[arg-type]

    views = [stack.client.wait(job.id, timeout=60) for job in (signed, plain)]

    assert [v.status for v in views] == [JobStatus.SUCCEEDED] * 2, [v.error for v in views]
    assert [v.provenance for v in views] == ["c2pa", "xmp"]
    signed_manifest, plain_manifest = (Manifest.model_validate_json(stack.get(v.manifest_key or "")) for v in views)
    for ref, plain_ref in zip(signed_manifest.outputs, plain_manifest.outputs, strict=True):
        data, plain_data = stack.get(ref.key), stack.get(plain_ref.key)
        assert hashlib.sha256(data).hexdigest() == ref.sha256  # the manifest lists the signed bytes
        assert ref.content_type == "image/jpeg"
        _check_signed(data, ref.content_type, c2pa_chain, ref.label, ref.seed)
        assert ref.seed == plain_ref.seed
        pixels = [np.asarray(Image.open(io.BytesIO(d))) for d in (data, plain_data)]
        assert np.array_equal(*pixels)  # signing leaves the pixels as the unsigned job made them
        with pytest.raises(c2pa.C2paError):  # no manifest in the xmp job's
            read_credentials(plain_data, plain_ref.content_type)


def test_a_worker_without_a_signing_key_fails_c2pa_jobs_saying_why_and_runs_the_others(
    stack: Stack, start_worker: WorkerFactory
) -> None:
    worker = start_worker(worker_env(stack), queues=GENERATION_QUEUES)
    assert "C2PA signing not configured" in worker.log()
    signed = stack.client.submit(GenerateRequest(model="fmnist-cgan", label="bag", count=2, provenance="c2pa"))  # type: ignore[arg-type]
    plain = stack.client.submit(GenerateRequest(model="fmnist-cgan", label="bag", count=2))  # type: ignore[arg-type]

    failed, succeeded = (stack.client.wait(job.id, timeout=60) for job in (signed, plain))

    assert failed.status is JobStatus.FAILED and failed.error is not None
    assert failed.error.type == "SigningUnavailable"
    assert "provenance 'c2pa'" in failed.error.message and "GENQ_C2PA__KEY_FILE" in failed.error.message
    assert failed.outputs == [] and stack.keys(f"jobs/{signed.id}/") == []
    assert succeeded.status is JobStatus.SUCCEEDED


def test_a_worker_whose_key_does_not_load_refuses_to_start(
    stack: Stack, start_worker: WorkerFactory, c2pa_chain: SigningChain, tmp_path: Path
) -> None:
    env = worker_env(stack, **{**c2pa_chain.env(), "GENQ_C2PA__KEY_FILE": str(tmp_path / "missing.key")})
    worker = start_worker(env, queues=GENERATION_QUEUES, ready=False)

    assert worker.proc.wait(timeout=60) == 2
    assert "refusing to start" in worker.log() and "GENQ_C2PA__KEY_FILE" in worker.log()


def _genq(*args: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "AWS_"))}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args], env=env, capture_output=True, text=True, timeout=180
    )


@pytest.mark.parametrize("fmt", [OutputFormat.PNG, OutputFormat.WEBP])
def test_embedded_generate_with_provenance_c2pa_writes_signed_files(
    c2pa_chain: SigningChain, tmp_path: Path, fmt: OutputFormat
) -> None:
    out = tmp_path / "out"
    argv = ["generate", "--label", "sneaker", "--count", "3", "--seed", "5", "--format", fmt.value, "--out", str(out)]

    result = _genq(*argv, "--provenance", "c2pa", env_extra=c2pa_chain.env())

    assert result.returncode == 0, result.stderr
    assert "signed with Content Credentials" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["outputs"]) == 3
    for entry in manifest["outputs"]:
        data = (out / entry["key"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        _check_signed(data, fmt.content_type, c2pa_chain, "sneaker", entry["seed"])


def test_embedded_generate_with_provenance_c2pa_and_no_key_fails_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _genq("generate", "--label", "bag", "--provenance", "c2pa", "--out", str(out), env_extra={})

    assert result.returncode != 0
    assert "GENQ_C2PA__KEY_FILE" in result.stderr and "Traceback" not in result.stderr
    assert not any(out.glob("*.png"))

    unknown = _genq("generate", "--label", "bag", "--provenance", "signed", "--out", str(out), env_extra={})
    assert unknown.returncode == 2 and "provenance" in unknown.stderr
