"""Uploading a fine-tune data set: a folder in ImageFolder layout (one sub-folder per class) or one archive.

The client puts the files straight into the bucket under a fresh upload id (``datasets/<id>/...``, per tenant under
the HTTP API) and hands the worker only that reference; the worker treats every byte as hostile again.

An upload for a tenant always goes through a :class:`DatasetMeter`, one of its API keys' data set quota
(``producer.api.quotas.Quotas.dataset_meter``): recorded with its size and expiry before a byte is stored, given back
if storing fails, deleted once expired, exactly as ``POST /v1/datasets`` does. Without a meter there is no tenant:
the operator's own data sets under ``datasets/``, which nothing meters or expires.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from producer.contract import ARCHIVE_SUFFIXES
from producer.core.resolve import dataset_prefix
from producer.errors import InvalidJob

MAX_UPLOAD_FILES = 100_000
MAX_FILE_BYTES = 512 * 2**20  # one archive; single images are far smaller (the worker refuses > 32 MiB images)

Put = Callable[[str, bytes], None]  # (key, data): store one object
ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class Upload:
    """What was uploaded: the reference for ``FineTuneRequest.dataset``, how many files and bytes, and when a metered
    upload expires (Unix seconds; None for the operator's, which do not)."""

    dataset: str
    files: int
    bytes: int
    expires_at: float | None = None


class DatasetMeter(Protocol):
    """One API key's data set quota, which every upload for its tenant counts against."""

    @property
    def tenant(self) -> str:
        """The tenant the uploads are for: they are stored under its prefix."""
        ...

    def take(self, reference: str, size: int) -> float:
        """Record an upload of ``size`` bytes before it is stored; returns when it expires (Unix seconds).

        Raises:
            QuotaExceeded: the key's data sets would pass its quota; nothing is taken.
        """
        ...

    def forget(self, references: list[str]) -> int:
        """Give back the bytes of uploads that were not stored after all; returns the bytes freed."""
        ...


@contextmanager
def metered(meter: DatasetMeter | None, reference: str, size: int) -> Iterator[float | None]:
    """Take ``size`` bytes for ``reference`` from ``meter`` around the block that stores it; yields its expiry.

    Whatever the block raises gives the bytes back. Without a meter (the operator's upload) nothing is taken and
    the expiry is None. Raises QuotaExceeded before the block runs when the upload does not fit.
    """
    if meter is None:
        yield None
        return
    expires_at = meter.take(reference, size)
    try:
        yield expires_at
    except BaseException:
        meter.forget([reference])
        raise


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
    path: Path,
    put: Put,
    *,
    meter: DatasetMeter | None = None,
    on_progress: ProgressFn | None = None,
    threads: int = 8,
) -> Upload:
    """Upload a folder or archive with ``put`` (several files at once) and return its :class:`Upload`.

    Args:
        meter: for a tenant's upload, the quota of the key it is made for (:class:`DatasetMeter`); it is stored
            under the tenant's prefix, must be one archive (what expires is deleted as one object, as an upload
            through ``POST /v1/datasets``) named like one, and is recorded before ``put`` stores a byte. None: the
            operator's upload, under ``datasets/``, unmetered.

    Raises:
        InvalidJob: (field ``dataset``) not a folder or archive, too many or too large files, or a folder for a
            tenant; (field ``filename``) a tenant's archive name that ``POST /v1/datasets`` would refuse too.
        QuotaExceeded: the upload would pass the key's quota; nothing is stored.
    """
    files = dataset_files(path)
    if meter is not None and not path.is_file():
        raise InvalidJob(
            f"{path} is a folder; a tenant's data set is one archive ({', '.join(ARCHIVE_SUFFIXES)}), as "
            "POST /v1/datasets takes: pack it first (tar czf data.tar.gz -C FOLDER .)",
            field="dataset",
        )
    sizes = [p.stat().st_size for p, _ in files]
    too_big = [str(p) for (p, _), size in zip(files, sizes, strict=True) if size > MAX_FILE_BYTES]
    if too_big:
        raise InvalidJob(f"{too_big[0]} is larger than {MAX_FILE_BYTES // 2**20} MiB", field="dataset")
    if meter is not None:
        reference = archive_reference(path.name)
        upload_id, name = reference.split("/")
        files = [(files[0][0], name)]
    else:
        upload_id = uuid.uuid4().hex
        reference = f"{upload_id}/{files[0][1]}" if path.is_file() else f"{upload_id}/"
    prefix = dataset_prefix(None if meter is None else meter.tenant) + upload_id + "/"
    total, done = sum(sizes), 0

    def send(item: tuple[Path, str]) -> int:
        local, name = item
        data = local.read_bytes()
        put(prefix + name, data)
        return len(data)

    with metered(meter, reference, total) as expires_at, ThreadPoolExecutor(max(1, threads)) as pool:
        for size in pool.map(send, files):
            done += size
            if on_progress is not None:
                on_progress(done, total)
    return Upload(dataset=reference, files=len(files), bytes=total, expires_at=expires_at)


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
