"""The README's first command: embedded generation with no Redis and no S3."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from shipped import CGAN_LATEST_REF


def _genq(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "AWS_"))}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args], env=env, capture_output=True, text=True, timeout=180
    )


def _text(output: str) -> str:
    """Console output without rich's line wrapping and panel borders, for matching messages."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def test_embedded_generate_writes_pngs_and_manifest_without_redis_or_s3(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _genq(
        "generate", "--model", "fmnist-cgan", "--label", "sneaker", "--count", "8", "--seed", "42", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 8 images" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 42 and manifest["model_version"] == CGAN_LATEST_REF
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:05d}.png" for i in range(8)] + ["sheet.png"]
    for entry in manifest["outputs"]:
        data = (out / entry["key"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert entry["label"] == "sneaker" and Image.open(out / entry["key"]).size == (28, 28)

    again = tmp_path / "again"
    assert _genq("generate", "--label", "sneaker", "--count", "8", "--seed", "42", "--out", str(again)).returncode == 0
    assert [(again / f"{i:05d}.png").read_bytes() for i in range(8)] == [
        (out / f"{i:05d}.png").read_bytes() for i in range(8)
    ]


def test_embedded_generate_refuses_an_unknown_label_naming_the_field(tmp_path: Path) -> None:
    result = _genq("generate", "--label", "hat", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "label: unknown label 'hat'" in result.stderr and "sneaker" in result.stderr
    assert not (tmp_path / "x").exists()


def test_count_zero_is_refused_by_the_contract(tmp_path: Path) -> None:
    result = _genq("generate", "--label", "bag", "--count", "0", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "count" in result.stderr


def test_embedded_generate_output_webdataset_writes_one_tar_of_images_and_json_and_the_manifest(tmp_path: Path) -> None:
    import tarfile

    out = tmp_path / "wds"
    result = _genq(
        "generate", "--label", "bag", "--count", "3", "--seed", "7", "--output", "webdataset", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 3 images in 1 tar" in _text(result.stderr)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.tar", "sheet.png"]
    with tarfile.open(out / "shard-00000.tar") as tar:
        assert sorted(tar.getnames()) == [f"{i:05d}.{ext}" for i in range(3) for ext in ("json", "png")]


def test_models_lists_the_shipped_model_in_embedded_mode() -> None:
    result = _genq("models")
    assert result.returncode == 0, result.stderr
    assert "fmnist-cgan" in result.stdout and "sneaker" in result.stdout


def test_eval_quick_prints_every_score_beside_its_reference_and_writes_json(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = _genq("eval", "fmnist-cgan", "--quick", "--json", str(report))
    assert result.returncode == 0, result.stderr
    for score in ("FID", "KID", "precision (k=5)", "recall (k=5)", "label consistency", "CAS", "per-class FID"):
        assert score in result.stdout
    data = json.loads(report.read_text())
    assert data["model"] == CGAN_LATEST_REF
    assert 0.0 <= data["label_consistency"] <= 1.0 and data["classifier_test_accuracy"] > 0.9


def test_eval_refuses_an_unknown_model() -> None:
    result = _genq("eval", "shoe-gan", "--quick")
    assert result.returncode == 2 and "unknown model 'shoe-gan'" in result.stderr


@pytest.mark.parametrize(
    ("arch", "widths"), [("cgan", ["--g-ch", "4", "--d-ch", "4"]), ("cvae", ["--width", "4", "--z-dim", "4"])]
)
def test_train_writes_grids_a_checkpoint_and_a_servable_export(tmp_path: Path, arch: str, widths: list[str]) -> None:
    out = tmp_path / arch
    args = ["train", "--arch", arch, "--out", str(out), "--steps", "2", "--batch-size", "8", "--threads", "1"]
    result = _genq(*args, *widths, "--sample-every", "2", "--checkpoint-every", "2")
    assert result.returncode == 0, result.stderr
    assert (out / "checkpoint.safetensors").is_file() and (out / "samples" / "step-000002.png").is_file()
    from models.generator import load_generator

    model = load_generator(out / "export")
    assert model.sample([7], [1]).shape == (1, 1, 28, 28)
    again = _genq(*args[:-4], "--steps", "3", "--threads", "1", *widths)  # resumes: 1 step left
    assert again.returncode == 0 and "resuming from step 2" in again.stderr
    lines = again.stderr.splitlines()  # stderr is a pipe: rich would wrap at 80 columns
    assert f"exported generator to {out / 'export'}" in lines, again.stderr  # a path longer than 80 columns
    if arch == "cgan":  # the cVAE logs no checkpoint lines
        assert any(line.startswith("step 3/3: ") and line.endswith(" written") for line in lines), again.stderr


def test_train_reads_an_image_folder_at_the_asked_size_with_diffaugment(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    for c, name in enumerate(("bag", "shoe")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(8):
            pixels = np.full((40, 50, 3), 40 * (c + 1) + i, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    (tmp_path / "data" / "bag" / "notes.txt").write_text("not an image")
    out = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "data"), "--resolution", "32", "--channels", "3", "--out", str(out)]
    flags = ["--steps", "2", "--batch-size", "8", "--g-ch", "4", "--d-ch", "4", "--threads", "1"]
    result = _genq(*args, *flags, "--augment", "translation,cutout,color", "--sample-every", "2")
    assert result.returncode == 0, result.stderr
    said = _text(result.stderr)
    assert "16 images in 2 classes" in said and "'bag/notes.txt': not an image" in said
    from models.generator import load_generator

    model = load_generator(out / "export")
    assert model.class_names == ("bag", "shoe") and model.sample([1], [3]).shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--data", "no/such/place"], "is not fashion-mnist, a folder or an .npz file"),
        (["--augment", "rotate"], "unknown augmentation 'rotate'"),
        (["--init-from", "shoe-gan"], "unknown model 'shoe-gan'"),
        (["--arch", "cvae", "--init-from", "fmnist-cgan@1"], "only a cgan can start from a published model"),
        (["--mode-seeking", "1", "--batch-size", "7"], "batch_size must be even, got 7"),
        (["--consistency", "10", "--augment", "translation"], "use one of them"),
    ],
)
def test_train_refuses_bad_data_and_augmentation_naming_them(tmp_path: Path, args: list[str], words: str) -> None:
    result = _genq("train", "--out", str(tmp_path), "--steps", "1", *args)
    assert result.returncode == 2 and words in _text(result.stderr), result.stderr


def test_train_refuses_an_unknown_architecture(tmp_path: Path) -> None:
    result = _genq("train", "--arch", "diffusion", "--out", str(tmp_path))
    assert result.returncode == 2 and "unknown architecture 'diffusion'" in result.stderr
