"""Post-processing as pure functions: exact sizes for every fit, the pad colour, the operations, determinism."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from producer.contract import OutputFormat, Rendition, output_size
from worker.generate.encode import encode_image, provenance
from worker.generate.postprocess import from_chw, render, to_chw


def _sample(width: int = 28, height: int = 28, mode: str = "L", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (height, width) if mode == "L" else (height, width, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _rendition(**fields: Any) -> Rendition:
    return Rendition.model_validate({"name": "r", **fields})


# Expected sizes worked out by hand: contain scales by min(box/side), cover by max then crops, pad is the box.
@pytest.mark.parametrize(
    ("sample", "fields", "size"),
    [
        ((28, 28), {"size": 1080}, (1080, 1080)),
        ((28, 28), {"width": 1080, "height": 1350}, (1080, 1080)),  # contain: the width binds
        ((28, 28), {"width": 1080, "height": 1350, "fit": "cover"}, (1080, 1350)),
        ((28, 28), {"width": 1080, "height": 1350, "fit": "pad"}, (1080, 1350)),
        ((28, 28), {"width": 500}, (500, 500)),  # one side: the other follows the aspect ratio
        ((40, 20), {"height": 50}, (100, 50)),
        ((40, 20), {"width": 30, "height": 30}, (30, 15)),
        ((40, 20), {"width": 30, "height": 30, "fit": "cover"}, (30, 30)),
        ((40, 20), {"width": 30, "height": 30, "fit": "pad"}, (30, 30)),
        ((30, 20), {"width": 7, "height": 7}, (7, 5)),  # 20 * 7/30 = 4.67 rounds to 5
        ((64, 64), {"size": 16, "fit": "cover"}, (16, 16)),  # shrinking
        ((1, 100), {"width": 10, "height": 10}, (1, 10)),  # never below one pixel
    ],
)
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_every_fit_gives_the_exact_size(
    sample: tuple[int, int], fields: dict[str, Any], size: tuple[int, int], mode: str
) -> None:
    rendition = _rendition(**fields)
    image = render(_sample(*sample, mode=mode), rendition)
    assert image.size == size == output_size(*sample, rendition)
    assert image.mode == mode


def test_cover_crops_the_overflow_evenly() -> None:
    # A 4 x 2 sample whose columns are 0, 1, 2, 3: covering a 2 x 2 box keeps the middle two columns.
    sample = Image.fromarray(np.array([[0, 80, 160, 240]] * 2, dtype=np.uint8), mode="L")
    image = render(sample, _rendition(size=2, fit="cover", resample="nearest"))
    assert np.asarray(image).tolist() == [[80, 160], [80, 160]]


@pytest.mark.parametrize(
    ("background", "mode", "corner"),
    [
        ("#ffffff", "L", 255),  # a grey pad keeps a grey sample one channel
        ("#808080", "L", 128),
        ("#fff", "L", 255),
        ("#ff0000", "RGB", (255, 0, 0)),  # a colour makes it RGB
        ("#12AB34", "RGB", (0x12, 0xAB, 0x34)),
    ],
)
def test_pad_centres_the_sample_on_the_background_colour(background: str, mode: str, corner: object) -> None:
    black = Image.new("L", (10, 10), 0)
    image = render(black, _rendition(width=30, height=50, fit="pad", background=background))
    assert image.size == (30, 50) and image.mode == mode
    for xy in ((0, 0), (29, 0), (0, 49), (29, 49), (15, 9)):  # corners and just above the sample
        assert image.getpixel(xy) == corner
    middle = image.getpixel((15, 25))  # the sample, 30 x 30, from row 10 to 39
    assert middle == (0 if mode == "L" else (0, 0, 0))
    assert image.getpixel((15, 10)) == middle and image.getpixel((15, 39)) == middle
    assert image.getpixel((15, 40)) == corner


def test_the_operations_never_touch_the_pad() -> None:
    # autocontrast on a flat mid-grey sample would stretch the pad too if it ran after padding
    image = render(
        Image.new("L", (8, 8), 100),
        _rendition(width=16, height=32, fit="pad", background="#c8c8c8", ops=[{"op": "autocontrast"}]),
    )
    assert image.getpixel((0, 0)) == 200 and image.getpixel((8, 16)) == 100


@pytest.mark.parametrize(
    "op",
    [
        {"op": "autocontrast", "cutoff": 2},
        {"op": "unsharp_mask", "radius": 2, "percent": 150, "threshold": 3},
        {"op": "contrast", "factor": 1.5},
        {"op": "sharpness", "factor": 2.0},
    ],
)
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_each_operation_changes_pixels_but_not_size_or_mode(op: dict[str, Any], mode: str) -> None:
    sample = _sample(mode=mode)
    plain = render(sample, _rendition(size=64))
    enhanced = render(sample, _rendition(size=64, ops=[op]))
    assert enhanced.size == plain.size and enhanced.mode == plain.mode
    assert enhanced.tobytes() != plain.tobytes()


def test_operations_run_in_the_order_given() -> None:
    # A dim gradient (100 to 150): halving its contrast then stretching ends full range; the other order does not.
    sample = Image.fromarray(np.tile(np.linspace(100, 150, 16).astype(np.uint8), (16, 1)), mode="L")
    halve, stretch = {"op": "contrast", "factor": 0.5}, {"op": "autocontrast"}
    first = render(sample, _rendition(size=16, ops=[halve, stretch]))
    second = render(sample, _rendition(size=16, ops=[stretch, halve]))
    assert first.getextrema() == (0, 255)
    assert second.getextrema()[1] - second.getextrema()[0] < 200


@pytest.mark.parametrize("fmt", list(OutputFormat))
@pytest.mark.parametrize(
    "fields",
    [
        {"size": 1080, "fit": "cover", "ops": [{"op": "unsharp_mask"}]},
        {"width": 1080, "height": 1350, "fit": "pad", "background": "#ffffff", "ops": [{"op": "autocontrast"}]},
        {"width": 300, "resample": "bicubic", "ops": [{"op": "sharpness"}, {"op": "contrast"}]},
    ],
)
def test_same_sample_and_rendition_give_the_same_bytes(fmt: OutputFormat, fields: dict[str, Any]) -> None:
    info = provenance(generator="g", version="g@1", label="sneaker", seed=7)

    def once() -> str:
        pixels = to_chw(render(from_chw(to_chw(_sample(seed=3))), _rendition(**fields)))
        return hashlib.sha256(encode_image(pixels, fmt, info)).hexdigest()

    assert once() == once()


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_chw_round_trip(mode: str) -> None:
    sample = _sample(5, 3, mode)
    assert to_chw(sample).shape == ((1 if mode == "L" else 3), 3, 5)
    assert from_chw(to_chw(sample)).tobytes() == sample.tobytes()


def test_an_encoded_rendition_decodes_to_its_pixels() -> None:
    pixels = render(_sample(), _rendition(width=64, height=80, fit="pad", background="#102030"))
    info = provenance(generator="g", version="g@1", label="bag", seed=1)
    decoded = Image.open(io.BytesIO(encode_image(to_chw(pixels), OutputFormat.PNG, info)))
    assert decoded.size == (64, 80) and decoded.tobytes() == pixels.tobytes()
