"""Customer data sets: an ImageFolder tree or an ``.npz`` file, decoded defensively into :class:`LabelledImages`.

The input is hostile until proven otherwise: symbolic links are never followed, only a few raster formats are
decoded (Pillow's EPS plugin would run Ghostscript), an image's declared size is checked before its pixels are
decoded (a 1 kB PNG can declare 100,000 x 100,000 pixels), and ``.npz`` arrays load without pickle.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps

from models.data import LabelledImages
from models.errors import DatasetError

# Raster formats worth training on; every other Pillow plugin is attack surface. (JPEG covers the multi-picture MPO
# files that phones write: Pillow opens them through the JPEG plugin.)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# Litter that zip tools and file managers leave beside the images.
_LITTER = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
_RESAMPLE = Image.Resampling.LANCZOS
_MIB = 1024 * 1024
_NPY_HEADER_MAX = 10_000  # bytes; numpy's own default cap on .npy headers


@dataclass(frozen=True)
class IngestLimits:
    """Bounds on what one upload may cost to decode; anything beyond them is skipped or refused."""

    max_pixels: int = 4096 * 4096  # per decoded image (JPEGs count after decode-time downscaling)
    max_images: int = 100_000  # files in a folder, or images in an .npz
    min_per_class: int = 8  # fewer usable images than this in any class refuses the data set
    max_file_bytes: int = 32 * _MIB  # per image file
    max_array_bytes: int = 1024 * _MIB  # per uncompressed array in an .npz ...
    max_npz_bytes: int = 1024 * _MIB  # ... and all of them together
    max_ratio: float = 100.0  # .npz: uncompressed / compressed size of one array, as for zip archives ...
    ratio_floor_bytes: int = _MIB  # ... once it is at least this big (a blank image set may compress 50:1)


@dataclass(frozen=True)
class IngestReport:
    """What a load kept (images per class) and what it skipped, with one reason per skipped path."""

    counts: dict[str, int]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line: ``24 images in 2 classes (bag 12, shoe 12); 2 skipped, e.g. 'a.txt': not an image``."""
        total = sum(self.counts.values())
        per_class = ", ".join(f"{name} {count}" for name, count in self.counts.items())
        line = f"{total} images in {len(self.counts)} classes ({per_class})"
        if self.skipped:
            examples = ", ".join(f"{path!r}: {reason}" for path, reason in self.skipped[:3])
            line += f"; {len(self.skipped)} skipped, e.g. {examples}"
        return line


def is_hidden(name: str) -> bool:
    """True for dot-files (``.DS_Store``, AppleDouble ``._x.jpg``) and OS litter such as ``__MACOSX``."""
    return name.startswith(".") or name in _LITTER


def load_image_folder(
    root: Path,
    *,
    resolution: int,
    channels: int,
    class_names: Sequence[str] | None = None,
    limits: IngestLimits = IngestLimits(),  # noqa: B008 - frozen, so a shared default is safe
) -> tuple[LabelledImages, IngestReport]:
    """Decode an ImageFolder tree (``root/<class>/**/<image>``) into square images.

    Each image is EXIF-rotated, converted to L or RGB (alpha composited on white), scaled so its short side is
    ``resolution`` and centre-cropped. Classes and files are taken in sorted order, so a load is deterministic.

    Args:
        root: the folder holding one sub-folder per class.
        resolution: side of the square output images.
        channels: 1 (grayscale) or 3 (RGB).
        class_names: the classes to load, in label order; default: every sub-folder, sorted. Other folders are
            skipped and reported.
        limits: size and count bounds.

    Returns:
        uint8 images (N, C, R, R) with int64 labels, and the report of what was kept and skipped.

    Raises:
        DatasetError: no class folders, a named class has no folder, too many files, no usable image, or a class
            with fewer than ``limits.min_per_class`` usable images.
    """
    _check_target(resolution, channels)
    skipped: list[tuple[str, str]] = []
    folders: dict[str, Path] = {}
    for entry in _scan(root):
        reason = _entry_reason(entry)
        if reason is not None:
            skipped.append((entry.name, reason))
        elif entry.is_dir(follow_symlinks=False):
            folders[entry.name] = Path(entry.path)
        else:
            skipped.append((entry.name, "not in a class folder"))
    if class_names is None:
        classes = sorted(folders)
        if not classes:
            raise DatasetError(
                f"no class folders in {root}: expected one sub-folder per class (sneaker/001.jpg, bag/001.jpg)"
            )
    else:
        classes = _check_class_names(class_names)
        missing = [name for name in classes if name not in folders]
        if missing:
            raise DatasetError(
                f"no folder for class {', '.join(map(repr, missing))} in {root} "
                f"(folders: {', '.join(sorted(folders)) or 'none'}); add it or leave the class out"
            )
        skipped += [(name, "not one of the requested classes") for name in sorted(set(folders) - set(classes))]

    files: list[tuple[int, str, Path]] = []  # (label, path relative to root, path)
    for label, name in enumerate(classes):
        # room for the litter (AppleDouble ._ files, .DS_Store) that doubles a Mac upload's entry count
        for rel, path, reason in _walk(folders[name], name, 2 * limits.max_images + 1000):
            if reason is not None:
                skipped.append((rel, reason))
                continue
            files.append((label, rel, path))
            if len(files) > limits.max_images:
                raise DatasetError(
                    f"{root} holds more than {limits.max_images} files; split the data set or raise max_images"
                )

    images = np.empty((len(files), channels, resolution, resolution), dtype=np.uint8)  # (N, C, R, R)
    labels: list[int] = []
    for label, rel, path in files:
        result = _read_image(path, resolution, channels, limits)
        if isinstance(result, str):
            skipped.append((rel, result))
            continue
        images[len(labels)] = result
        labels.append(label)
    return _finish(images[: len(labels)], labels, tuple(classes), skipped, limits, str(root))


def load_npz(
    source: Path | bytes,
    *,
    resolution: int,
    channels: int,
    class_names: Sequence[str] | None = None,
    limits: IngestLimits = IngestLimits(),  # noqa: B008 - frozen, so a shared default is safe
) -> tuple[LabelledImages, IngestReport]:
    """Load an ``.npz`` with ``images`` and ``labels`` (and optionally ``class_names``), fitted to the target.

    ``images`` is uint8, or floats in [0, 1], shaped (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 3, 4
    (channels last wins when both would fit). ``labels`` is (N,) integers in 0..K-1. Class names come from the
    ``class_names`` argument, else the file's ``class_names`` array, else ``"0"``..``"K-1"``.

    Raises:
        DatasetError: not an .npz, an array missing, pickled, too large or of the wrong shape or dtype, a label
            out of range, class names that disagree with the file's, or a class with too few images.
    """
    _check_target(resolution, channels)
    what = str(source) if isinstance(source, Path) else "the .npz upload"
    fileobj = io.BytesIO(source) if isinstance(source, bytes) else source
    _check_npz_members(fileobj, what, limits)
    if isinstance(fileobj, io.BytesIO):
        fileobj.seek(0)
    try:
        with np.load(fileobj, allow_pickle=False) as npz:
            for key in ("images", "labels"):
                if key not in npz.files:
                    raise DatasetError(f"{what} has no {key!r} array (arrays: {', '.join(npz.files) or 'none'})")
            skipped = [(key, "unexpected array, ignored") for key in npz.files if key not in _NPZ_KEYS]
            images, labels = _npz_array(npz, "images", what), _npz_array(npz, "labels", what)
            stored_names = _npz_array(npz, "class_names", what) if "class_names" in npz.files else None
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{what} is not a readable .npz file ({exc}); save it with numpy.savez") from exc

    images = _npz_images_nhwc(images, what, limits)  # (N, H, W, C)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.dtype.kind not in "iu":
        raise DatasetError(
            f"{what}: 'labels' must be {images.shape[0]} integers (one per image), got {labels.dtype} "
            f"of shape {labels.shape}"
        )
    labels = labels.astype(np.int64)  # uint8 labels cannot even be compared with -1
    names = _npz_class_names(class_names, stored_names, labels, what)
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        bad = int(np.flatnonzero((labels < 0) | (labels >= len(names)))[0])
        raise DatasetError(
            f"{what}: label {int(labels[bad])} of image {bad} is out of range 0..{len(names) - 1} "
            f"({len(names)} classes: {', '.join(names)})"
        )
    out = np.empty((images.shape[0], channels, resolution, resolution), dtype=np.uint8)  # (N, C, R, R)
    for i, image in enumerate(images):
        out[i] = _fit(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image), resolution, channels)
    return _finish(out, labels.tolist(), names, skipped, limits, what)


_NPZ_KEYS = ("images", "labels", "class_names")


def _check_target(resolution: int, channels: int) -> None:
    if resolution < 1:
        raise DatasetError(f"resolution must be a positive number of pixels, got {resolution}")
    if channels not in (1, 3):
        raise DatasetError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")


def _check_class_names(class_names: Sequence[str]) -> list[str]:
    classes = list(class_names)
    if not classes:
        raise DatasetError("class_names is empty; name at least one class or leave it out")
    repeated = sorted({name for name in classes if classes.count(name) > 1})
    if repeated:
        raise DatasetError(f"class {', '.join(map(repr, repeated))} given twice in class_names")
    return classes


def _scan(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda entry: entry.name)
    except OSError as exc:
        raise DatasetError(f"cannot list {folder}: {exc.strerror or exc}") from exc


def _entry_reason(entry: os.DirEntry[str]) -> str | None:
    """Why a directory entry is skipped, or None for a real folder or regular file."""
    if entry.is_symlink():  # a link could point anywhere on the worker's disk
        return "symbolic link"
    if is_hidden(entry.name):
        return "hidden folder" if entry.is_dir(follow_symlinks=False) else "hidden file"
    if not (entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False)):
        return "not a regular file"
    return None


def _walk(folder: Path, rel: str, budget: int) -> list[tuple[str, Path, str | None]]:
    """Every entry under ``folder`` as (relative path, path, skip reason or None), sorted by relative path.

    Iterative, so a hostile tree nested thousands deep cannot exhaust the stack; at most ``budget`` entries.
    """
    found: list[tuple[str, Path, str | None]] = []
    pending = [(folder, rel)]
    while pending:
        current, current_rel = pending.pop()
        for entry in _scan(current):
            path, entry_rel = Path(entry.path), f"{current_rel}/{entry.name}"
            reason = _entry_reason(entry)
            if reason is None and entry.is_dir(follow_symlinks=False):
                pending.append((path, entry_rel))
            else:
                found.append((entry_rel, path, reason))
            if len(found) + len(pending) > budget:
                raise DatasetError(f"{folder} holds more than {budget} entries; split the data set or raise max_images")
    return sorted(found, key=lambda item: item[0])


def _read_image(path: Path, resolution: int, channels: int, limits: IngestLimits) -> np.ndarray | str:
    """The image at ``path`` as (C, R, R) uint8, or the reason it is skipped."""
    try:
        # O_NOFOLLOW: the file may have been swapped for a link since the folder was listed
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        if info.st_size > limits.max_file_bytes:
            return f"file of {info.st_size / _MIB:.1f} MiB exceeds the limit of {limits.max_file_bytes / _MIB:g} MiB"
        data = fh.read(limits.max_file_bytes + 1)
    return decode_image(data, resolution=resolution, channels=channels, limits=limits)


def decode_image(data: bytes, *, resolution: int, channels: int, limits: IngestLimits) -> np.ndarray | str:
    """Decode one image file's bytes into (C, R, R) uint8, or return why it cannot be used.

    The declared size is checked before any pixel is decoded; JPEGs are decoded at the smallest of 1/1, 1/2, 1/4,
    1/8 scale that still covers ``resolution``, and that decoded size is what ``limits.max_pixels`` bounds.
    """
    if len(data) > limits.max_file_bytes:
        return f"file of {len(data) / _MIB:.1f} MiB exceeds the limit of {limits.max_file_bytes / _MIB:g} MiB"
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than raises) between 1x and 2x its own limit: a bomb all the same
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
            declared = im.size
            if im.format in ("JPEG", "MPO"):
                im.draft(None, (resolution, resolution))
            width, height = im.size
            if width * height > limits.max_pixels:
                return _bomb_reason(declared, limits)
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own limit refused it while opening, before the size could be read: quote its pixel count
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        return (
            f"image of {int(pixels.group(1)) if pixels else 0:,} pixels exceeds the limit of {limits.max_pixels:,} "
            "pixels (decompression bomb?)"
        )
    except Image.UnidentifiedImageError:
        return f"not an image (supported: {', '.join(IMAGE_FORMATS)})"
    except Exception:  # Pillow's plugins raise many types on hostile bytes; all of them mean "unusable"
        return "corrupt or truncated image"
    try:
        return _fit(ImageOps.exif_transpose(im), resolution, channels)
    except (OSError, ValueError) as exc:
        return f"cannot be converted ({exc})"


def _bomb_reason(size: tuple[int, int], limits: IngestLimits) -> str:
    return (
        f"image of {size[0]}x{size[1]} pixels exceeds the limit of {limits.max_pixels:,} pixels (decompression bomb?)"
    )


def _fit(im: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """Convert to L or RGB on white, scale the short side to ``resolution`` and centre-crop: (C, R, R) uint8."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = Image.fromarray(_to_uint8(np.asarray(im), im.mode))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    im = im.convert("RGB" if channels == 3 else "L")
    if im.size != (resolution, resolution):
        im = ImageOps.fit(im, (resolution, resolution), method=_RESAMPLE)
    pixels = np.asarray(im, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)  # (C, R, R)


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """16-bit and float grayscale to 8 bits: 16-bit scaled down, floats in [0, 1] scaled up, the rest clipped."""
    values = pixels.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255):
        values = values / 257
    elif mode == "F" and values.max(initial=0) <= 1:
        values = values * 255
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _check_npz_members(fileobj: Path | io.BytesIO, what: str, limits: IngestLimits) -> None:
    """Refuse an .npz before numpy allocates any of its arrays.

    numpy sizes an array by its ``.npy`` header (shape and dtype), not by the zip entry: a 488 kB file can declare a
    1.5 TiB array, or hold 500 MB of zeros compressed 1,000:1. So every member's header is read from the stream
    (a few hundred bytes) and refused when its byte count disagrees with the zip entry, passes ``max_array_bytes``
    (or, with the others, ``max_npz_bytes``), compresses past ``max_ratio``, or holds Python objects (pickle).
    """
    try:
        with zipfile.ZipFile(fileobj) as archive:
            total = 0
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                if info.file_size > limits.max_array_bytes:
                    raise DatasetError(
                        f"{what}: array {name!r} is {info.file_size / _MIB:.0f} MiB uncompressed, over the limit of "
                        f"{limits.max_array_bytes / _MIB:.0f} MiB; split the data set"
                    )
                total += info.file_size
                if total > limits.max_npz_bytes:
                    raise DatasetError(
                        f"{what}: its arrays add up to more than {limits.max_npz_bytes / _MIB:.0f} MiB uncompressed; "
                        "split the data set"
                    )
                ratio = info.file_size / max(info.compress_size, 1)
                if info.file_size >= limits.ratio_floor_bytes and ratio > limits.max_ratio:
                    raise DatasetError(
                        f"{what}: array {name!r} compresses {ratio:.0f}:1 (limit {limits.max_ratio:g}:1): a "
                        "decompression bomb? Save it with numpy.savez (uncompressed) or savez_compressed of real data"
                    )
                with archive.open(info) as member:
                    _check_npy_header(member, info.file_size, name, what)
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{what} is not an .npz file ({exc}); save it with numpy.savez") from exc


def _check_npy_header(member: IO[bytes], entry_bytes: int, name: str, what: str) -> None:
    """The ``.npy`` header of one member: its data must be exactly what the zip entry holds after the header."""
    try:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member, max_header_size=_NPY_HEADER_MAX)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member, max_header_size=_NPY_HEADER_MAX)
    except ValueError as exc:
        raise DatasetError(
            f"{what}: array {name!r} has no valid .npy header ({exc}); save it with numpy.savez"
        ) from exc
    if dtype.hasobject:
        raise DatasetError(
            f"{what}: array {name!r} cannot be read without pickle (it holds Python objects); store plain numbers "
            "or strings"
        )
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize  # Python ints: a hostile shape cannot overflow
    header_bytes = member.tell()
    if declared != entry_bytes - header_bytes:
        raise DatasetError(
            f"{what}: array {name!r} declares shape {tuple(shape)} of {dtype} ({declared:,} bytes) but holds "
            f"{entry_bytes - header_bytes:,}: a corrupt or crafted file; save it again with numpy.savez"
        )


def _npz_array(npz: np.lib.npyio.NpzFile, key: str, what: str) -> np.ndarray:
    try:
        return np.asarray(npz[key])
    except ValueError as exc:  # numpy refuses object arrays when allow_pickle=False
        raise DatasetError(
            f"{what}: array {key!r} cannot be read without pickle ({exc}); store plain numbers or strings"
        ) from exc


def _npz_images_nhwc(images: np.ndarray, what: str, limits: IngestLimits) -> np.ndarray:
    """Validate ``images`` and return it as uint8 (N, H, W, C)."""
    if images.ndim == 3:
        images = images[..., None]
    elif images.ndim == 4 and images.shape[-1] not in (1, 3, 4) and images.shape[1] in (1, 3, 4):
        images = images.transpose(0, 2, 3, 1)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise DatasetError(
            f"{what}: 'images' has shape {images.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) "
            "with C of 1, 3 or 4"
        )
    n, height, width = images.shape[:3]
    if n == 0:
        raise DatasetError(f"{what}: 'images' holds no image")
    if n > limits.max_images:
        raise DatasetError(f"{what} holds {n} images, more than the limit of {limits.max_images}; split it")
    if height * width > limits.max_pixels:
        raise DatasetError(f"{what}: images of {width}x{height} exceed the limit of {limits.max_pixels:,} pixels")
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind == "f":
        if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise DatasetError(f"{what}: float 'images' must lie in [0, 1] (no NaN); scale them or store uint8")
        return np.rint(images * 255).astype(np.uint8)
    raise DatasetError(f"{what}: 'images' has dtype {images.dtype}; store uint8, or floats in [0, 1]")


def _npz_class_names(
    given: Sequence[str] | None, stored: np.ndarray | None, labels: np.ndarray, what: str
) -> tuple[str, ...]:
    from_file: list[str] | None = None
    if stored is not None:
        if stored.ndim != 1 or stored.dtype.kind not in "US":
            raise DatasetError(
                f"{what}: 'class_names' must be a 1-D array of strings, got {stored.dtype} {stored.shape}"
            )
        from_file = [s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s) for s in stored.tolist()]
        _check_class_names(from_file)
    if given is not None:
        names = _check_class_names(given)
        if from_file is not None and from_file != names:
            raise DatasetError(
                f"{what} names its classes {', '.join(from_file)} but {', '.join(names)} were given; "
                "drop one of the two lists or make them agree"
            )
        return tuple(names)
    if from_file is not None:
        return tuple(from_file)
    return tuple(str(i) for i in range(int(labels.max(initial=-1)) + 1))


def _finish(
    images: np.ndarray,
    labels: list[int],
    classes: tuple[str, ...],
    skipped: list[tuple[str, str]],
    limits: IngestLimits,
    what: str,
) -> tuple[LabelledImages, IngestReport]:
    """Check the per-class minimum and package images (N, C, R, R) with their labels and report."""
    if not labels:
        examples = "; ".join(f"{path!r}: {reason}" for path, reason in skipped[:3])
        raise DatasetError(
            f"no usable images in {what}" + (f" ({len(skipped)} skipped, e.g. {examples})" if skipped else "")
        )
    counts = dict.fromkeys(classes, 0)
    for label in labels:
        counts[classes[label]] += 1
    short = [name for name, count in counts.items() if count < limits.min_per_class]
    if short:
        problems = []
        for name in short:
            lost = [(path, reason) for path, reason in skipped if path.split("/")[0] == name]
            problem = f"class {name!r} has {counts[name]} usable images"
            if lost:
                problem += f" ({len(lost)} skipped, e.g. {lost[0][0]!r}: {lost[0][1]})"
            problems.append(problem)
        raise DatasetError(
            f"{'; '.join(problems)}; at least {limits.min_per_class} per class are needed: add images or leave "
            "the class out"
        )
    data = LabelledImages(
        images=torch.from_numpy(np.ascontiguousarray(images)),  # (N, C, R, R)
        labels=torch.tensor(labels, dtype=torch.int64),
        class_names=classes,
    )
    return data, IngestReport(counts=counts, skipped=skipped)
