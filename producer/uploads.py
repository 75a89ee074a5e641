"""Uploading a fine-tune data set: a folder in ImageFolder layout (one sub-folder per class) or one archive.

The client puts the files straight into the bucket under a fresh upload id (``datasets/<id>/...``, per tenant under
the HTTP API) and hands the worker only that reference; the worker treats every byte as hostile again.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from producer.contract import ARCHIVE_SUFFIXES
from producer.core.resolve import dataset_prefix
from producer.errors import InvalidJob

MAX_UPLOAD_FILES = 100_000
MAX_FILE_BYTES = 512 * 2**20  # one archive; single images are far smaller (the worker refuses > 32 MiB images)

Put = Callable[[str, bytes], None]  # (key, data): store one object
ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class Upload:
    """What was uploaded: the reference for ``FineTuneRequest.dataset``, how many files and bytes."""

    dataset: str
    files: int
    bytes: int


def dataset_files(path: Path) -> list[tuple[Path, str]]:
    """The files to upload for ``path`` with their names relative to the upload, sorted.

    A folder gives every regular file under it (hidden files and symbolic links left out); a file must be an
    archive genq reads. Raises InvalidJob (field ``dataset``) with what is wrong.
    """
    if path.is_file():
        if not path.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise InvalidJob(f"{path} is not a folder or an archive ({', '.join(ARCHIVE_SUFFIXES)})", field="dataset")
        return [(path, path.name)]
    if not path.is_dir():
        raise InvalidJob(f"{path} does not exist", field="dataset")
    files = sorted((p, p.relative_to(path).as_posix()) for p in _walk(path))
    if not files:
        raise InvalidJob(f"{path} holds no files; expected one sub-folder of images per class", field="dataset")
    if len(files) > MAX_UPLOAD_FILES:
        raise InvalidJob(f"{path} holds {len(files)} files, more than {MAX_UPLOAD_FILES}", field="dataset")
    return files


def _walk(root: Path) -> Iterator[Path]:
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if any(part.startswith(".") for part in rel) or p.is_symlink() or not p.is_file():
            continue
        yield p


def upload_dataset(
    path: Path, put: Put, *, tenant: str | None = None, on_progress: ProgressFn | None = None, threads: int = 8
) -> Upload:
    """Upload a folder or archive with ``put`` (several files at once) and return its :class:`Upload`."""
    files = dataset_files(path)
    sizes = [p.stat().st_size for p, _ in files]
    too_big = [str(p) for (p, _), size in zip(files, sizes, strict=True) if size > MAX_FILE_BYTES]
    if too_big:
        raise InvalidJob(f"{too_big[0]} is larger than {MAX_FILE_BYTES // 2**20} MiB", field="dataset")
    upload_id = uuid.uuid4().hex
    prefix = dataset_prefix(tenant) + upload_id + "/"
    total, done = sum(sizes), 0

    def send(item: tuple[Path, str]) -> int:
        local, name = item
        data = local.read_bytes()
        put(prefix + name, data)
        return len(data)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for size in pool.map(send, files):
            done += size
            if on_progress is not None:
                on_progress(done, total)
    reference = f"{upload_id}/{files[0][1]}" if path.is_file() else f"{upload_id}/"
    return Upload(dataset=reference, files=len(files), bytes=total)


def check_archive_name(filename: str) -> str:
    """``filename`` if it is a plain archive file name genq reads; InvalidJob (field ``filename``) otherwise."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", filename) or not filename.lower().endswith(
        ARCHIVE_SUFFIXES
    ):
        raise InvalidJob(
            f"filename {filename!r} must be a plain file name ending in {', '.join(ARCHIVE_SUFFIXES)}",
            field="filename",
        )
    return filename


def archive_reference(filename: str) -> str:
    """A fresh upload's reference for one archive called ``filename``; InvalidJob (field ``filename``) if unusable."""
    return f"{uuid.uuid4().hex}/{check_archive_name(filename)}"
