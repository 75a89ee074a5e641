"""Uploaded data sets: an archive or an S3 prefix unpacked into a local folder, then decoded by ``models.datasets``.

Archives are hostile until proven otherwise. Every member name is checked before anything is written (no absolute
paths, no ``..``, no backslashes or drive letters) and a hostile name refuses the whole archive; links, devices and
FIFOs are never created, only reported; sizes, member counts and zip compression ratios are bounded, and members are
streamed to disk in chunks so an archive never sits uncompressed in memory. On any error the files written so far
are removed again.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from models.data import LabelledImages
from models.datasets import IngestLimits, IngestReport, is_hidden, load_image_folder, load_npz
from models.errors import DatasetError
from worker.errors import InvalidArchive, UnsafeUpload

log = logging.getLogger("genq.ingest")

# Suffixes extract_archive accepts, longest first so ".tar.gz" is not read as ".gz".
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip", ".npz")
NPZ_NAME = "data.npz"  # where extract_archive puts an uploaded .npz (the customer's name is not trusted)
_MIB = 1024 * 1024
_CHUNK = _MIB
_DRIVE = re.compile(r"^[A-Za-z]:")
_REBUILD = "re-create it from the class folders, e.g. zip -r data.zip sneaker bag"
_SPLIT = "split the data set into smaller uploads"


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what unpacking one upload may write; passing any of them refuses the archive."""

    max_total_bytes: int = 1024 * _MIB  # uncompressed, all members together
    max_members: int = 100_000  # every entry: files, folders, links
    max_member_bytes: int = 512 * _MIB  # uncompressed, one member
    max_ratio: float = 100.0  # zip: uncompressed / compressed size of one member ...
    ratio_floor_bytes: int = _MIB  # ... once it is at least this big (a blank 1 kB PNG may compress 50:1)
    max_depth: int = 32  # folders a member path may nest: an ImageFolder tree is two deep; 1,000 deep breaks tools


def archive_kind(name: str) -> str:
    """The suffix of ``name`` that extract_archive dispatches on (``.zip``, ``.tar.gz``, ...), case-insensitive.

    Raises:
        InvalidArchive: the name has none of the supported suffixes.
    """
    lowered = name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lowered.endswith(suffix):
            return suffix
    raise InvalidArchive(
        f"unsupported upload {name!r}: send a .zip, .tar, .tar.gz or .tgz of an ImageFolder "
        "(one folder per class), or an .npz with 'images' and 'labels' arrays"
    )


def extract_archive(
    data: bytes,
    name: str,
    dest: Path,
    limits: ArchiveLimits = ArchiveLimits(),  # noqa: B008 - frozen, so a shared default is safe
) -> list[tuple[str, str]]:
    """Unpack the archive ``data`` (kind taken from ``name``) into ``dest``, which is created if missing.

    An ``.npz`` is not unpacked: it is written as ``dest/data.npz`` for :func:`load_dataset_dir`.

    Returns:
        The members not written, as (member name, reason): links, devices, FIFOs, duplicates, encrypted members.

    Raises:
        InvalidArchive: unsupported kind, or the archive is corrupt or truncated.
        UnsafeUpload: a member name escapes ``dest`` (absolute, ``..``, backslash, drive letter), or the archive
            passes a limit (members, bytes, zip compression ratio). Nothing written is left behind.
    """
    kind = archive_kind(name)
    dest.mkdir(parents=True, exist_ok=True)
    writer = _Writer(dest.resolve(), name, limits)
    try:
        if kind == ".zip":
            _extract_zip(data, writer)
        elif kind == ".npz":
            writer.count_member()
            writer.write([NPZ_NAME], NPZ_NAME, io.BytesIO(data), len(data))
        else:
            _extract_tar(data, writer)
    except BaseException:
        writer.undo()
        raise
    return writer.skipped


def remove_tree(root: Path) -> None:
    """Remove ``root`` and everything below it, however deep, never following a link; never raises.

    ``shutil.rmtree`` recurses once per folder level, so a tree a thousand folders deep (an upload's, or one built
    on purpose) raises ``RecursionError`` and is left on disk. This walks with a stack of its own instead; what
    cannot be removed is logged and left.
    """
    stack = [root]
    seen_dirs: list[Path] = []
    try:
        while stack:
            path = stack.pop()
            try:
                if path.is_dir() and not path.is_symlink():
                    seen_dirs.append(path)
                    with os.scandir(path) as entries:
                        stack.extend(Path(entry.path) for entry in entries)
                else:
                    path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove %s: %s", path, exc)
        for folder in reversed(seen_dirs):  # deepest first: each is empty once its children are gone
            try:
                folder.rmdir()
            except OSError as exc:
                log.warning("could not remove %s: %s", folder, exc)
    except Exception:  # a cleanup must never turn a finished job into a failed task
        log.exception("could not remove %s", root)


def safe_relative_key(key: str, prefix: str) -> str:
    """The part of the S3 ``key`` after ``prefix``, safe to write as ``dest / result``.

    ``prefix`` is taken as a folder: ``uploads/ds1`` matches ``uploads/ds1/bag/1.png`` but not
    ``uploads/ds10/bag/1.png``. Keys ending in ``/`` are folder markers; skip them before calling.

    Raises:
        UnsafeUpload: the key is not under the prefix, or its remainder is empty, absolute, or has ``..``, ``.``,
            empty components, backslashes, a drive letter or a NUL.
    """
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    if not key.startswith(prefix):
        raise UnsafeUpload(f"key {key!r} is not under the prefix {prefix!r}")
    rel = key[len(prefix) :]
    problem = _name_problem(rel)
    if problem is None and (not rel or any(part in ("", ".") for part in rel.split("/"))):
        problem = "has an empty or '.' path component"
    if problem is not None:
        raise UnsafeUpload(f"key {key!r} {problem}; rename the object under {prefix!r}")
    return rel


def load_dataset_dir(
    root: Path,
    *,
    resolution: int,
    channels: int,
    class_names: Sequence[str] | None = None,
    limits: IngestLimits = IngestLimits(),  # noqa: B008 - frozen, so a shared default is safe
) -> tuple[LabelledImages, IngestReport]:
    """Load an unpacked upload: an ImageFolder, one folder wrapping an ImageFolder, or a single ``.npz``.

    A zipped folder usually arrives wrapped (``brand_x/sneaker/1.png``): when ``root`` holds a single folder (hidden
    litter such as ``__MACOSX`` aside) that itself holds folders or an ``.npz``, and the requested classes are not
    folders of ``root`` itself, that folder is the data set. Skipped paths in the report are relative to ``root``.

    Raises:
        DatasetError: as :func:`models.datasets.load_image_folder` or :func:`models.datasets.load_npz`, or
            ``root`` holds more than one ``.npz``.
    """
    above: list[tuple[str, str]] = []  # skipped beside the wrapper folder, if there is one
    here: list[tuple[str, str]] = []  # skipped at the data set's own top level
    base, prefix = root, ""
    visible = _visible(root, "", here)
    wrapper = visible[0] if len(visible) == 1 and visible[0].is_dir() else None
    requested_here = class_names is not None and all((root / name).is_dir() for name in class_names)
    if wrapper is not None and not requested_here:
        inner_skipped: list[tuple[str, str]] = []
        inner = _visible(wrapper, f"{wrapper.name}/", inner_skipped)
        if any(path.is_dir() or _is_npz(path) for path in inner):
            base, prefix, visible, above, here = wrapper, f"{wrapper.name}/", inner, here, inner_skipped
    if not any(path.is_dir() for path in visible) and any(_is_npz(path) for path in visible):
        npz = [path for path in visible if _is_npz(path)]
        if len(npz) > 1:
            raise DatasetError(f"{len(npz)} .npz files in the upload ({', '.join(p.name for p in npz)}); send one")
        skipped = (
            above + here + [(prefix + path.name, "beside the .npz, ignored") for path in visible if path != npz[0]]
        )
        data, report = load_npz(
            npz[0], resolution=resolution, channels=channels, class_names=class_names, limits=limits
        )
    else:
        # load_image_folder reports what it skips at its own top level, with paths relative to base
        data, report = load_image_folder(
            base, resolution=resolution, channels=channels, class_names=class_names, limits=limits
        )
        skipped = above + [(prefix + path, reason) for path, reason in report.skipped]
    return data, IngestReport(counts=report.counts, skipped=skipped)


def _visible(folder: Path, prefix: str, skipped: list[tuple[str, str]]) -> list[Path]:
    """Entries of ``folder`` that are neither hidden nor links, sorted; the others go to ``skipped``."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise DatasetError(f"cannot list {folder}: {exc.strerror or exc}") from exc
    visible = []
    for path in entries:
        if path.is_symlink():
            skipped.append((prefix + path.name, "symbolic link"))
        elif is_hidden(path.name):
            skipped.append((prefix + path.name, "hidden folder" if path.is_dir() else "hidden file"))
        else:
            visible.append(path)
    return visible


def _is_npz(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(".npz")


def _name_problem(name: str) -> str | None:
    """Why a member name or key could write outside its folder, or None when it cannot."""
    if "\x00" in name:
        return "contains a NUL character"
    if "\\" in name:
        return "contains a backslash (a Windows path separator)"
    if name.startswith("/"):
        return "is an absolute path"
    if _DRIVE.match(name):
        return "starts with a drive letter"
    if ".." in name.split("/"):
        return "has a '..' component that climbs out of the folder"
    return None


@dataclass
class _Writer:
    """Writes members under ``dest``, keeping the running totals, the skip list and an undo log."""

    dest: Path  # resolved
    archive: str
    limits: ArchiveLimits
    skipped: list[tuple[str, str]] = field(default_factory=list)
    members: int = 0
    total_bytes: int = 0
    written: set[tuple[str, ...]] = field(default_factory=set)
    created: list[Path] = field(default_factory=list)  # files and folders, in creation order

    def refuse(self, member: str, reason: str, advice: str = _REBUILD) -> UnsafeUpload:
        return UnsafeUpload(
            f"unsafe archive {self.archive!r}: member {member!r} {reason}; the archive was refused and nothing "
            f"from it is used ({advice})"
        )

    def parts(self, member: str) -> list[str]:
        """The member's path components below dest (``.`` and empty ones dropped); a hostile name raises."""
        problem = _name_problem(member)
        if problem is not None:
            raise self.refuse(member, problem)
        parts = [part for part in member.split("/") if part not in ("", ".")]
        if len(parts) > self.limits.max_depth:
            raise self.refuse(
                member[:200] + ("..." if len(member) > 200 else ""),
                f"is nested {len(parts)} folders deep, past the limit of {self.limits.max_depth}",
            )
        return parts

    def count_member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise UnsafeUpload(
                f"archive {self.archive!r} has more than {self.limits.max_members} members; split the data set"
            )

    def skip(self, member: str, reason: str) -> None:
        self.skipped.append((member, reason))

    def mkdir(self, parts: list[str]) -> Path:
        folder = self.dest
        for part in parts:
            folder = folder / part
            if not folder.is_dir() or folder.is_symlink():
                folder.mkdir(mode=0o755)  # raises if a file (or anything else) is in the way
                self.created.append(folder)
        if not folder.resolve().is_relative_to(self.dest):  # never true unless dest held links: belt and braces
            raise self.refuse("/".join(parts), "resolves outside the destination folder")
        return folder

    def write(self, parts: list[str], member: str, src: _Readable, declared: int) -> None:
        """Stream ``src`` to ``dest/parts`` in chunks, counting what is really written against the limits."""
        if not parts:
            return
        key = tuple(parts)
        if key in self.written:
            self.skip(member, "duplicate member (the first one was kept)")
            return
        self.check_size(member, declared)
        try:
            folder = self.mkdir(parts[:-1])
            # O_EXCL with O_NOFOLLOW: never write through a link or over a file or folder already there
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(folder / parts[-1], flags, 0o644)
        except OSError as exc:
            self.skip(member, f"cannot be written ({exc.strerror or exc})")
            return
        target = folder / parts[-1]
        self.created.append(target)
        self.written.add(key)
        size = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK):
                size += len(chunk)
                self.check_size(member, size)
                out.write(chunk)
        self.total_bytes += size

    def check_size(self, member: str, size: int) -> None:
        if size > self.limits.max_member_bytes:
            limit = self.limits.max_member_bytes / _MIB
            raise self.refuse(member, f"expands to more than the limit of {limit:g} MiB per member", _SPLIT)
        if self.total_bytes + size > self.limits.max_total_bytes:
            limit = self.limits.max_total_bytes / _MIB
            raise self.refuse(member, f"takes the archive past the limit of {limit:g} MiB uncompressed", _SPLIT)

    def undo(self) -> None:
        """Remove every file and folder this writer created, newest first."""
        for path in reversed(self.created):
            try:
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink()
            except OSError:
                pass  # a folder that still holds something not ours stays


def _extract_zip(data: bytes, writer: _Writer) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidArchive(f"{writer.archive!r} is not a valid zip archive ({exc}); upload it again") from exc
    with archive:
        infos = archive.infolist()
        # every name and declared size is checked before the first byte is written
        planned = []
        for info in infos:
            writer.count_member()
            parts = writer.parts(info.filename)
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size >= writer.limits.ratio_floor_bytes and ratio > writer.limits.max_ratio:
                raise writer.refuse(
                    info.filename,
                    f"expands {info.compress_size:,} bytes to {info.file_size:,} (ratio {ratio:,.0f}, over "
                    f"{writer.limits.max_ratio:g}): a zip bomb?",
                    "real photos barely compress; send the original files",
                )
            writer.check_size(info.filename, info.file_size)
            planned.append((info, parts))
        declared = sum(info.file_size for info in infos)
        if declared > writer.limits.max_total_bytes:
            raise UnsafeUpload(
                f"archive {writer.archive!r} expands to {declared / _MIB:.1f} MiB, over the limit of "
                f"{writer.limits.max_total_bytes / _MIB:g} MiB uncompressed; split the data set"
            )
        for info, parts in planned:
            # the Unix file type, when a Unix tool made the archive (many tools store permissions only, or nothing)
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind == stat.S_IFLNK:
                writer.skip(info.filename, "symbolic link")
            elif kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                writer.skip(info.filename, "not a regular file (device, FIFO or socket)")
            elif info.is_dir():
                _mkdir_or_skip(writer, parts, info.filename)
            elif info.flag_bits & 0x1:
                writer.skip(info.filename, "encrypted")
            else:
                try:
                    with archive.open(info) as src:
                        writer.write(parts, info.filename, src, info.file_size)
                except NotImplementedError:
                    writer.skip(info.filename, f"compressed with an unsupported method ({info.compress_type})")
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    raise InvalidArchive(
                        f"zip archive {writer.archive!r} is corrupt at member {info.filename!r} ({exc}); "
                        "upload it again"
                    ) from exc


def _extract_tar(data: bytes, writer: _Writer) -> None:
    raw: _Readable = io.BytesIO(data)
    if data[:2] == b"\x1f\x8b":  # gzip magic: trust the bytes, not the name (a .tar may well be gzipped)
        raw = gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb")
    # headers are not counted as member bytes; bound the whole stream too (a 1 GB pax header is still 1 GB)
    capped = _CappedReader(raw, writer.limits.max_total_bytes + 4096 * writer.limits.max_members + _MIB, writer)
    try:
        with tarfile.open(fileobj=capped, mode="r|") as tar:
            for member in tar:
                writer.count_member()
                parts = writer.parts(member.name)
                if member.issym():
                    writer.skip(member.name, f"symbolic link to {member.linkname!r}")
                elif member.islnk():
                    writer.skip(member.name, f"hard link to {member.linkname!r}")
                elif member.ischr() or member.isblk():
                    writer.skip(member.name, "device file")
                elif member.isfifo():
                    writer.skip(member.name, "FIFO")
                elif not (member.isdir() or member.isreg()):
                    writer.skip(member.name, "not a regular file")
                else:
                    _data_filter(member, writer)
                    if member.isdir():
                        _mkdir_or_skip(writer, parts, member.name)
                    else:
                        src = tar.extractfile(member)
                        if src is not None:
                            writer.write(parts, member.name, src, member.size)
    except (tarfile.TarError, gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise InvalidArchive(f"{writer.archive!r} is not a valid tar archive ({exc}); upload it again") from exc


def _data_filter(member: tarfile.TarInfo, writer: _Writer) -> None:
    """tarfile's own ``data`` filter, a second line of defence behind the checks above."""
    try:
        tarfile.data_filter(member, str(writer.dest))
    except tarfile.FilterError as exc:
        raise writer.refuse(member.name, f"is refused by tarfile's data filter ({exc})") from exc


def _mkdir_or_skip(writer: _Writer, parts: list[str], member: str) -> None:
    try:
        writer.mkdir(parts)
    except OSError as exc:
        writer.skip(member, f"cannot be created ({exc.strerror or exc})")


class _CappedReader(io.RawIOBase):
    """A read-only stream that raises UnsafeUpload once more than ``cap`` bytes have been read from ``src``."""

    def __init__(self, src: _Readable, cap: int, writer: _Writer) -> None:
        super().__init__()
        self._src, self._cap, self._writer, self._read = src, cap, writer, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = self._src.read(len(buffer))
        self._read += len(chunk)
        if self._read > self._cap:
            raise UnsafeUpload(
                f"archive {self._writer.archive!r} expands past {self._cap / _MIB:.0f} MiB; split the data set"
            )
        buffer[: len(chunk)] = chunk
        return len(chunk)
