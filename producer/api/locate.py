"""Where a job's output lies, for ``GET /v1/jobs/{id}/outputs/{index}`` (:mod:`producer.api.outputs`): listed in the
job view, or, past the view's first :data:`~producer.core.records.VIEW_OUTPUTS_MAX`, in the job's manifest, read from
S3 once and kept (:class:`ManifestIndex`: a manifest never changes once written).
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from producer.api.problems import ApiError
from producer.contract import JobStatus, JobView
from producer.core.records import VIEW_OUTPUTS_MAX, describe
from producer.core.s3 import make_s3_client

log = logging.getLogger("genq.api")


@dataclass(frozen=True)
class StoredObject:
    """Where one output lies: its object, and for WebDataset output the member of that tar."""

    key: str
    member: str | None = None


class ManifestIndex:
    """Outputs read from manifests (``key`` and ``member`` by index), the last ``max_manifests`` read kept in memory.

    A manifest is written once, when its job succeeds, and never changes (a redelivery rewrites the same bytes), so
    a client fetching a 10,000-image job's outputs one by one costs one read of its manifest, not one per output.
    Thread-safe; two requests missing at once may both read it.

    Args:
        read: the bytes of an object by key (:func:`s3_reader`); raises ``KeyError`` for one that does not exist.
    """

    def __init__(self, read: Callable[[str], bytes], max_manifests: int = 4) -> None:
        self._read = read
        self._max = max_manifests
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, dict[int, StoredObject]] = OrderedDict()

    def output(self, manifest_key: str, index: int) -> StoredObject | None:
        """Output ``index`` as the manifest at ``manifest_key`` lists it; None if it does not.

        Raises:
            KeyError: the manifest does not exist.
            ValueError: it cannot be read as a manifest.
        """
        with self._lock:
            outputs = self._cache.get(manifest_key)
            if outputs is not None:
                self._cache.move_to_end(manifest_key)
        if outputs is None:
            outputs = self._load(manifest_key)
            with self._lock:
                self._cache[manifest_key] = outputs
                while len(self._cache) > self._max:
                    self._cache.popitem(last=False)
        return outputs.get(index)

    def _load(self, manifest_key: str) -> dict[int, StoredObject]:
        # Plain JSON, not the pydantic Manifest: a 100,000-image manifest is ~30 MB, and only two fields are kept.
        raw = self._read(manifest_key)
        try:
            listed = json.loads(raw)["outputs"]
            return {int(o["index"]): StoredObject(str(o["key"]), o.get("member")) for o in listed}
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"manifest {manifest_key} cannot be read: {describe(exc)}") from exc


def s3_reader(bucket: str) -> Callable[[str], bytes]:
    """``read(key)``: the bytes of an object of ``bucket`` (KeyError if it does not exist), from a boto3 client made by
    :func:`producer.core.s3.make_s3_client` on the first read."""
    clients: list[Any] = []
    lock = threading.Lock()

    def read(key: str) -> bytes:
        with lock:
            if not clients:
                clients.append(make_s3_client(attempts=3))
        try:
            return bytes(clients[0].get_object(Bucket=bucket, Key=key)["Body"].read())
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404"):
                raise KeyError(key) from None
            # The tenant is told no more: botocore's text names the storage endpoint and bucket.
            log.warning("S3 GET %s failed: %s: %s", key, type(exc).__name__, exc)
            msg = f"object storage did not answer ({type(exc).__name__}); try again shortly"
            raise ApiError(503, ["storage"], msg, "unavailable", {"Retry-After": "5"}) from None

    return read


def find_output(view: JobView, index: int, from_manifest: Callable[[str, int], StoredObject | None]) -> StoredObject:
    """Where output ``index`` of the job in ``view`` lies: listed in the view, else (a succeeded job with more
    outputs than its view lists) in its manifest, through ``from_manifest(manifest_key, index)``.

    Raises:
        ApiError: 404 naming ``["path", "index"]`` for an index past the job's images (``output_not_found``) or an
            output not stored (``output_not_stored``: the job has not ended, or ended without it); ``["path",
            "job_id"]`` for a fine-tune, which has no outputs (``no_outputs``).
    """
    if view.kind != "generate":
        msg = f"job {view.id} is a fine-tune: it stores no images (its result is the model version in its view)"
        raise ApiError(404, ["path", "job_id"], msg, "no_outputs")
    total = view.progress.total
    if index >= total:
        msg = f"job {view.id} has {total} output{'s' if total != 1 else ''} (index 0 to {total - 1}): no output {index}"
        raise ApiError(404, ["path", "index"], msg, "output_not_found")
    at = bisect.bisect_left(view.outputs, index, key=lambda o: o.index)  # a view lists its outputs by index
    if at < len(view.outputs) and view.outputs[at].index == index:
        return StoredObject(view.outputs[at].key, view.outputs[at].member)
    if view.status is JobStatus.SUCCEEDED and view.manifest_key is not None:
        found = from_manifest(view.manifest_key, index)
        if found is not None:
            return found
    raise ApiError(404, ["path", "index"], _not_stored(view, index), "output_not_stored")


def _not_stored(view: JobView, index: int) -> str:
    """Why output ``index`` of a job that has that many images is not served."""
    if not view.status.is_terminal():
        return (
            f"output {index} of job {view.id} is not listed yet: the job is {view.status.value} "
            f"({view.progress.done} of {view.progress.total} images stored); outputs are listed, and served here, "
            "once it ends"
        )
    if view.status is JobStatus.SUCCEEDED:
        return f"output {index} of job {view.id} is not in its manifest"
    if view.outputs_truncated:
        return (
            f"output {index} of job {view.id} ({view.status.value}) is not among the outputs its view lists "
            f"(the first {VIEW_OUTPUTS_MAX} of those it stored)"
        )
    return f"job {view.id} {view.status.value} without storing output {index}; its view lists the outputs it stored"
