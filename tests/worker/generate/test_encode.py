"""Outputs carry their provenance and encode deterministically."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from producer.contract import OutputFormat
from worker.generate.encode import IPTC_TRAINED_ALGORITHMIC, encode_image, provenance

INFO = provenance(generator="fmnist-cgan", version="fmnist-cgan@1", label="sneaker", seed=123)


def _image(channels: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(channels, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_is_lossless_and_carries_provenance_text_chunks(channels: int) -> None:
    image = _image(channels)
    data = encode_image(image, OutputFormat.PNG, INFO)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG"
    assert np.array_equal(np.asarray(decoded).reshape(28, 28, channels).transpose(2, 0, 1), image)
    text = decoded.text  # type: ignore[attr-defined]
    assert text["genq:generator"] == "fmnist-cgan"
    assert text["genq:version"] == "fmnist-cgan@1"
    assert text["genq:label"] == "sneaker"
    assert text["genq:seed"] == "123"
    assert text["AI-generated"] == "true"
    assert text["DigitalSourceType"] == IPTC_TRAINED_ALGORITHMIC


@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_encoding_is_deterministic_and_decodable(fmt: OutputFormat) -> None:
    image = _image(3)
    first, second = encode_image(image, fmt, INFO), encode_image(image, fmt, INFO)
    assert first == second
    assert Image.open(io.BytesIO(first)).size == (28, 28)


def test_jpeg_comment_and_webp_xmp_carry_provenance() -> None:
    jpeg = Image.open(io.BytesIO(encode_image(_image(1), OutputFormat.JPEG, INFO)))
    assert json.loads(jpeg.info["comment"])["genq:seed"] == "123"
    webp = Image.open(io.BytesIO(encode_image(_image(3), OutputFormat.WEBP, INFO)))
    xmp = webp.info["xmp"]
    assert IPTC_TRAINED_ALGORITHMIC.encode() in xmp and b"<genq:seed>123</genq:seed>" in xmp


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="needs exiftool: apt-get install libimage-exiftool-perl")
@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_exiftool_reads_the_iptc_digital_source_type_as_xmp_in_every_format(fmt: OutputFormat, tmp_path: Path) -> None:
    # A reader that is not genq's own, where provenance tools look: XMP-iptcExt:DigitalSourceType.
    path = tmp_path / f"image.{fmt.value}"
    path.write_bytes(encode_image(_image(3), fmt, INFO))

    found = subprocess.run(
        ["exiftool", "-json", "-XMP-iptcExt:DigitalSourceType", "-XMP-genq:Seed", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )

    [tags] = json.loads(found.stdout)
    assert tags["DigitalSourceType"] == IPTC_TRAINED_ALGORITHMIC
    assert tags["Seed"] == 123
