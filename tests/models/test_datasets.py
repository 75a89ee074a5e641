"""Customer data sets: ImageFolder and .npz decoding, and what hostile or broken files do to it."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.datasets import IMAGE_FORMATS, IngestLimits, decode_image, load_image_folder, load_npz
from models.errors import DatasetError

FEW = IngestLimits(min_per_class=2)


def save(path: Path, image: Image.Image, fmt: str = "PNG", **params: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **params)
    return path


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR is patched (CRC fixed) to declare ``width`` x ``height``: a bomb in 70 bytes."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def mixed_folder(root: Path) -> Path:
    """Two classes of small images in every mode and shape a customer might send."""
    save(root / "bag/01_rgba.png", Image.new("RGBA", (12, 12), (255, 0, 0, 0)))  # fully transparent red
    save(root / "bag/02_p.png", Image.new("P", (10, 14), 3))
    save(root / "bag/03_wide.jpg", Image.new("RGB", (40, 20), (0, 128, 255)), "JPEG")
    save(root / "bag/nested/04_l.png", Image.new("L", (8, 8), 77))
    save(root / "shoe/01_1bit.png", Image.new("1", (9, 9), 1))
    save(root / "shoe/02_16bit.png", Image.new("I;16", (16, 16), 65535))
    save(root / "shoe/03_gif.gif", Image.new("P", (30, 10), 1), "GIF")
    return root


def test_image_folder_decodes_every_mode_and_size_to_square_uint8(tmp_path: Path) -> None:
    data, report = load_image_folder(mixed_folder(tmp_path), resolution=8, channels=3, limits=FEW)
    assert data.images.shape == (7, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0, 0, 0, 0, 1, 1, 1] and data.labels.dtype == torch.int64
    assert data.class_names == ("bag", "shoe")
    assert report.counts == {"bag": 4, "shoe": 3} and report.skipped == []
    assert data.images[0].eq(255).all()  # transparent pixels land on white, not on their hidden red
    assert data.images[3].eq(77).all()  # bag/nested/04_l.png: sorted paths, sub-folders included
    assert data.images[5].eq(255).all()  # 16-bit white stays white, not clipped to 255 of 65535


def test_every_allowed_format_has_a_pillow_plugin() -> None:
    Image.init()
    assert set(IMAGE_FORMATS) <= set(Image.OPEN)  # an unknown name would make Image.open raise KeyError


def test_image_folder_in_grayscale(tmp_path: Path) -> None:
    data, _ = load_image_folder(mixed_folder(tmp_path), resolution=5, channels=1, limits=FEW)
    assert data.images.shape == (7, 1, 5, 5)


def test_exif_orientation_is_applied_before_cropping(tmp_path: Path) -> None:
    image = Image.new("L", (16, 8), 255)
    image.paste(0, (0, 0, 8, 8))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left half becomes the top
    save(tmp_path / "a/1.png", image, exif=exif.tobytes())
    save(tmp_path / "a/2.png", image)
    data, _ = load_image_folder(tmp_path, resolution=8, channels=1, limits=IngestLimits(min_per_class=1))
    rotated, plain = data.images[0, 0], data.images[1, 0]
    assert rotated[0].max() < 30 and rotated[-1].min() > 225  # top rows black, bottom rows white
    assert plain[:, 0].max() < 30 and plain[:, -1].min() > 225  # left columns black, right columns white


def test_unusable_files_are_skipped_with_their_reason(tmp_path: Path) -> None:
    mixed_folder(tmp_path)
    (tmp_path / "bag/notes.txt").write_text("not a picture")
    (tmp_path / "bag/fake.png").write_text("not a picture either")
    whole = png_bytes(Image.effect_noise((32, 32), 50).convert("L"))
    (tmp_path / "bag/truncated.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "bag/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "bag/._01_rgba.png").write_bytes(b"\0\5\26\7")
    (tmp_path / "README.md").write_text("my data set")
    data, report = load_image_folder(tmp_path, resolution=8, channels=3, limits=FEW)
    assert len(data) == 7
    reasons = dict(report.skipped)
    assert reasons["bag/notes.txt"].startswith("not an image")
    assert reasons["bag/fake.png"].startswith("not an image")
    assert reasons["bag/truncated.png"] == "corrupt or truncated image"
    assert reasons["bag/.DS_Store"] == reasons["bag/._01_rgba.png"] == "hidden file"
    assert reasons["README.md"] == "not in a class folder"
    assert "7 images in 2 classes (bag 4, shoe 3); 6 skipped" in report.summary()


def test_image_over_the_pixel_limit_is_skipped_as_a_bomb(tmp_path: Path) -> None:
    save(tmp_path / "a/big.png", Image.new("L", (20, 20)))
    save(tmp_path / "a/small.png", Image.new("L", (10, 10)))
    data, report = load_image_folder(
        tmp_path, resolution=4, channels=1, limits=IngestLimits(max_pixels=100, min_per_class=1)
    )
    assert len(data) == 1
    assert report.skipped == [
        ("a/big.png", "image of 20x20 pixels exceeds the limit of 100 pixels (decompression bomb?)")
    ]


@pytest.mark.parametrize(
    ("width", "height", "pixels"),
    [
        (5000, 5000, "5000x5000"),  # over our limit, under Pillow's: refused by our header check
        (100_000, 100_000, "10,000,000,000"),  # over Pillow's own limit: it raises while opening
    ],
)
def test_png_declaring_a_huge_size_is_refused_from_its_header(width: int, height: int, pixels: str) -> None:
    # The file holds one pixel of data: had it been decoded, the reason would be "corrupt or truncated image".
    reason = decode_image(png_declaring(width, height), resolution=8, channels=1, limits=IngestLimits())
    assert isinstance(reason, str)
    assert pixels in reason and "(decompression bomb?)" in reason


def test_file_over_the_byte_limit_is_skipped_unread(tmp_path: Path) -> None:
    save(tmp_path / "a/1.png", Image.effect_noise((64, 64), 80).convert("L"))
    save(tmp_path / "a/2.png", Image.new("L", (4, 4)))
    limits = IngestLimits(max_file_bytes=1024, min_per_class=1)
    _, report = load_image_folder(tmp_path, resolution=4, channels=1, limits=limits)
    assert report.skipped[0][0] == "a/1.png" and report.skipped[0][1].startswith("file of ")


def test_symbolic_links_are_never_followed(tmp_path: Path) -> None:
    outside = save(tmp_path / "outside/secret.png", Image.new("L", (8, 8), 9))
    root = tmp_path / "root"
    for i in range(2):
        save(root / f"a/{i}.png", Image.new("L", (8, 8)))
    (root / "a/link.png").symlink_to(outside)
    (root / "a/linked_dir").symlink_to(outside.parent, target_is_directory=True)
    (root / "b").symlink_to(root / "a", target_is_directory=True)
    data, report = load_image_folder(root, resolution=8, channels=1, limits=FEW)
    assert data.class_names == ("a",) and len(data) == 2 and not data.images.eq(9).any()
    assert dict(report.skipped) == {
        "b": "symbolic link",
        "a/link.png": "symbolic link",
        "a/linked_dir": "symbolic link",
    }


def test_class_with_too_few_images_names_class_count_minimum_and_skips(tmp_path: Path) -> None:
    for i in range(8):
        save(tmp_path / f"shoe/{i}.png", Image.new("L", (8, 8)))
    for i in range(3):
        save(tmp_path / f"bag/{i}.png", Image.new("L", (8, 8)))
    (tmp_path / "bag/x.txt").write_text("?")
    (tmp_path / "bag/y.txt").write_text("?")
    with pytest.raises(DatasetError) as caught:
        load_image_folder(tmp_path, resolution=8, channels=1)
    message = str(caught.value)
    assert message.startswith("class 'bag' has 3 usable images (2 skipped, e.g. 'bag/x.txt': not an image")
    assert "at least 8 per class are needed" in message and "shoe" not in message


def test_no_usable_image_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a/x.txt").write_text("?")
    with pytest.raises(DatasetError, match="no usable images in .*'a/x.txt': not an image"):
        load_image_folder(tmp_path, resolution=8, channels=1)


def test_no_class_folder_says_what_layout_is_expected(tmp_path: Path) -> None:
    save(tmp_path / "1.png", Image.new("L", (8, 8)))
    with pytest.raises(DatasetError, match="one sub-folder per class"):
        load_image_folder(tmp_path, resolution=8, channels=1)


def test_class_names_choose_and_order_the_classes(tmp_path: Path) -> None:
    for name in ("bag", "shoe", "hat"):
        for i in range(2):
            save(tmp_path / f"{name}/{i}.png", Image.new("L", (8, 8)))
    data, report = load_image_folder(tmp_path, resolution=8, channels=1, class_names=["shoe", "bag"], limits=FEW)
    assert data.class_names == ("shoe", "bag") and data.labels.tolist() == [0, 0, 1, 1]
    assert report.skipped == [("hat", "not one of the requested classes")]
    with pytest.raises(DatasetError, match="no folder for class 'coat' .*folders: bag, hat, shoe"):
        load_image_folder(tmp_path, resolution=8, channels=1, class_names=["bag", "coat"], limits=FEW)


def test_more_files_than_max_images_is_refused(tmp_path: Path) -> None:
    for i in range(4):
        save(tmp_path / f"a/{i}.png", Image.new("L", (4, 4)))
    with pytest.raises(DatasetError, match="more than 3 files"):
        load_image_folder(tmp_path, resolution=4, channels=1, limits=IngestLimits(max_images=3, min_per_class=1))


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


@pytest.mark.parametrize(
    "images",
    [
        np.full((4, 12, 10, 3), 200, dtype=np.uint8),  # (N, H, W, C)
        np.full((4, 3, 12, 10), 200, dtype=np.uint8),  # (N, C, H, W)
        np.full((4, 12, 10), 200, dtype=np.uint8),  # (N, H, W)
        np.concatenate([np.full((4, 12, 10, 3), 200 / 255), np.ones((4, 12, 10, 1))], axis=-1),  # floats, opaque
    ],
)
def test_npz_images_in_any_layout_are_fitted_to_the_target(images: np.ndarray) -> None:
    source = npz_bytes(images=images, labels=np.array([0, 1, 0, 1]), class_names=np.array(["bag", "shoe"]))
    data, report = load_npz(source, resolution=6, channels=3, limits=FEW)
    assert data.images.shape == (4, 3, 6, 6) and data.images.eq(200).all()
    assert data.labels.tolist() == [0, 1, 0, 1] and data.class_names == ("bag", "shoe")
    assert report.counts == {"bag": 2, "shoe": 2}


def test_npz_from_a_file_without_class_names_numbers_the_classes(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((4, 8, 8), np.uint8), labels=np.array([1, 0, 1, 0], np.uint8))
    data, _ = load_npz(path, resolution=8, channels=1, limits=FEW)
    assert data.class_names == ("0", "1") and data.images.shape == (4, 1, 8, 8)


def test_npz_object_array_is_refused_without_unpickling() -> None:
    source = npz_bytes(images=np.array([[1, 2], [3, 4]], dtype=object), labels=np.array([0, 1]))
    with pytest.raises(DatasetError, match="array 'images' cannot be read without pickle"):
        load_npz(source, resolution=8, channels=1, limits=FEW)


def test_npz_label_out_of_range_names_image_and_range() -> None:
    source = npz_bytes(images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 0, 5]))
    with pytest.raises(DatasetError, match=r"label 5 of image 3 is out of range 0\.\.1 \(2 classes: bag, shoe\)"):
        load_npz(source, resolution=8, channels=1, class_names=["bag", "shoe"], limits=FEW)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((2, 8, 8), np.uint8)}, "no 'labels' array"),
        ({"images": np.zeros((2, 8, 8), np.int16), "labels": np.zeros(2, int)}, "'images' has dtype int16"),
        ({"images": np.full((2, 8, 8), 2.0), "labels": np.zeros(2, int)}, r"must lie in \[0, 1\]"),
        ({"images": np.zeros((2, 8, 8, 7), np.uint8), "labels": np.zeros(2, int)}, "'images' has shape"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.zeros(3, int)}, "'labels' must be 2 integers"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.zeros(2)}, "'labels' must be 2 integers"),
    ],
)
def test_npz_malformed_arrays_are_named(arrays: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_npz(npz_bytes(**arrays), resolution=8, channels=1, limits=IngestLimits(min_per_class=1))


def test_npz_that_is_not_a_zip_is_refused() -> None:
    with pytest.raises(DatasetError, match="not an .npz file"):
        load_npz(b"\x93NUMPY not an npz", resolution=8, channels=1)


def test_npz_array_over_the_size_limit_is_refused_before_loading() -> None:
    source = npz_bytes(images=np.zeros((4, 64, 64), np.uint8), labels=np.zeros(4, int))
    with pytest.raises(DatasetError, match="array 'images' is .* uncompressed, over the limit"):
        load_npz(source, resolution=8, channels=1, limits=IngestLimits(max_array_bytes=1024))


def _npz_of(members: dict[str, bytes], *, compress: bool) -> bytes:
    buffer = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _labels(n: int) -> bytes:
    return _raw_npy((n,), "<i8", (np.arange(n) % 2).astype("<i8").tobytes())


def _raw_npy(shape: tuple[int, ...], dtype: str, body: bytes) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": dtype, "fortran_order": False, "shape": shape})
    return out.getvalue() + body


def _peak_bytes_of(call: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_npz_bomb_is_refused_before_numpy_inflates_it() -> None:
    # ~500 MB of zeros deflates to ~0.5 MB: the attack that took a training worker from 0.76 to 2.2 GB.
    zeros = np.zeros((2000, 256, 256, 4), dtype=np.uint8)
    members = {"images.npy": _raw_npy(zeros.shape, "|u1", zeros.tobytes()), "labels.npy": _labels(2000)}
    bomb = _npz_of(members, compress=True)
    del zeros
    assert len(bomb) < 1024 * 1024

    peak = _peak_bytes_of(lambda: load_npz(bomb, resolution=8, channels=1))

    assert peak < 16 * 1024 * 1024  # the header is read, the 500 MB never allocated


def test_an_npy_header_declaring_more_than_the_file_holds_is_refused_before_allocation() -> None:
    # The header claims 1.5 TiB; the entry holds 1 kB. numpy would try to allocate the declared shape.
    lie = _raw_npy((200_000, 2048, 2048, 2), "|u1", b"\0" * 1024)
    with pytest.raises(DatasetError, match=r"declares shape \(200000, 2048, 2048, 2\).*crafted"):
        load_npz(_npz_of({"images.npy": lie, "labels.npy": _labels(200_000)}, compress=False), resolution=8, channels=1)


def test_arrays_that_together_pass_the_npz_limit_are_refused() -> None:
    images = np.full((40, 16, 16), 7, dtype=np.uint8)
    labels = np.arange(40) % 2
    data = npz_bytes(images=images, labels=labels, extra=np.random.default_rng(0).integers(0, 255, 20_000))
    with pytest.raises(DatasetError, match="add up to more than"):
        load_npz(data, resolution=8, channels=1, limits=IngestLimits(max_npz_bytes=20_000))
