"""The generate pipeline: a plain function over injected storage, sampler, upload pool and reporter.

The Celery task and the embedded CLI both call :func:`run_generate`; neither adds logic of its own. A job ends
``succeeded`` only after every image and the manifest are stored; any error propagates to the caller, which
marks the job failed (with the outputs stored so far).
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field
from typing import IO, Protocol, cast

import numpy as np
import torch
from PIL import Image

from models.grid import contact_sheet, sheet_cell
from producer.contract import GenerateJob, Manifest, OutputRef, RenditionRef, Shard, plan_shards
from producer.core import constants
from producer.core.records import VIEW_OUTPUTS_MAX
from producer.core.seeds import image_seed
from worker.errors import IncompleteJob
from worker.generate.credentials import NOT_CONFIGURED, Claim, Signer
from worker.generate.encode import encode_image, provenance
from worker.generate.postprocess import from_chw, render, to_chw
from worker.generate.webdataset import ShardWriter, shard_key
from worker.storage.base import SYSTEM_CLOCK, Clock, RetryWindow, Storage, within


class Reporter(Protocol):
    """Where the pipeline reports what it does: Redis + callbacks in a worker, a progress bar in the CLI."""

    def started(self, job: GenerateJob, shard: Shard) -> bool:
        """Mark the job running; False means the job ended or this shard is already stored: do not run it."""
        ...

    def progress(self, job: GenerateJob, shard: Shard, done: int) -> None:
        """``done`` images of ``shard`` are stored."""
        ...

    def active(self, job: GenerateJob) -> bool:
        """Whether the job still wants outputs (False once it failed elsewhere or was canceled)."""
        ...

    def awaiting_manifest(self, job: GenerateJob) -> bool:
        """Every shard is stored but the job has not succeeded: the run that stored the last one died before it
        wrote the manifest, and a redelivery must write it."""
        ...

    def shard_stored(self, job: GenerateJob, shard: Shard, outputs: list[OutputRef]) -> bool:
        """Record a stored shard; True if it was the job's last one (this run then writes the manifest)."""
        ...

    def stored_outputs(self, job: GenerateJob, shards: int) -> Iterator[list[OutputRef]]:
        """Every shard's recorded outputs, one shard at a time, in shard (and so index) order."""
        ...

    def succeeded(
        self,
        job: GenerateJob,
        first: list[OutputRef],
        total: int,
        manifest_key: str | None,
        sheet_key: str | None = None,
    ) -> bool:
        """The manifest (and the contact sheet, if any) is stored: the job succeeded with ``total`` outputs, of which
        ``first`` are the first. ``manifest_key`` None: no manifest object (a job of one image, whose manifest is
        served from its record: :func:`stores_manifest`). False when the job had ended meanwhile (canceled)."""
        ...


# A manifest lists ~300 bytes per output: up to this size it is built in memory, beyond it in a temporary file.
MANIFEST_SPOOL_BYTES = 8 * 2**20

Sampler = Callable[[str, str, Sequence[int], Sequence[int]], "Future[torch.Tensor]"]


@dataclass(frozen=True)
class GenerateResult:
    """What a run stored: this shard's outputs, and whether it completed the job (with its manifest's key, None for
    a job whose manifest is served from its record)."""

    outputs: list[OutputRef]
    manifest_key: str | None
    completed: bool = False  # this run marked the job succeeded
    sheet_key: str | None = None  # the contact sheet, stored with the manifest
    skipped: bool = False  # the job had ended (or this shard was stored) before: nothing was done
    stopped: bool = False  # the job ended elsewhere while this shard ran: it stopped after its current chunk
    recovered: bool = False  # every shard was stored but a run died before the manifest: this one wrote it

    @property
    def outcome(self) -> str:
        """What this run did, in one word (the worker's shard metric is labelled with it)."""
        flags = {"skipped": self.skipped, "stopped": self.stopped, "recovered": self.recovered}
        return next((name for name, flag in flags.items() if flag), "stored")


# The retry windows of the shards this process runs, by job: when one learns that its job ended, all of the job's
# stop at once, not at their next look at the job store. Weak: a window goes when its run does.
_RUNNING: dict[str, weakref.WeakSet[RetryWindow]] = {}
_RUNNING_LOCK = threading.Lock()


def _watch(job_id: str, window: RetryWindow) -> None:
    with _RUNNING_LOCK:
        for gone in [j for j, windows in _RUNNING.items() if not windows]:  # jobs with no shard running here now
            del _RUNNING[gone]
        _RUNNING.setdefault(job_id, weakref.WeakSet()).add(window)


def job_ended(job_id: str) -> None:
    """The job ended (failed or canceled): this process's running shards of it upload nothing more (those queued
    are skipped, those waiting to retry stop) and stop after their current chunk."""
    with _RUNNING_LOCK:
        windows = list(_RUNNING.get(job_id, ()))
    for window in windows:
        window.end()


def job_prefix(job: GenerateJob) -> str:
    """Where a job's objects go: ``tenants/<tenant>/jobs/<id>/`` for a tenant's job, else ``jobs/<id>/``."""
    if job.tenant is not None:
        return constants.TENANT_JOB_PREFIX.format(tenant=job.tenant, job_id=job.job_id)
    return constants.JOB_PREFIX.format(job_id=job.job_id)


def output_key(prefix: str, index: int, extension: str, rendition: str | None = None) -> str:
    """``<prefix><index>.<ext>``, or ``<prefix><index>-<rendition>.<ext>`` for one of several renditions."""
    return f"{prefix}{index:05d}{'-' + rendition if rendition else ''}.{extension}"


SHEET_PER_ROW = 8  # cells in a contact sheet's row (a multiple of the renditions, so a sample's stay side by side)


def run_generate(
    job: GenerateJob,
    *,
    storage: Storage,
    sample: Sampler,
    reporter: Reporter,
    chunk_size: int,
    uploads: Executor,
    shard: Shard | None = None,
    prefix: str | None = None,
    stored: list[OutputRef] | None = None,
    clock: Clock = SYSTEM_CLOCK,
    sheet_images: int = 0,
    signer: Signer = NOT_CONFIGURED,
    one_image_manifest: bool = False,
) -> GenerateResult:
    """Sample, encode and store the images of one shard of ``job`` (default: all of it); the last shard of the job
    to finish writes the manifest and marks the job succeeded.

    The job is sampled in chunks of ``chunk_size`` images; chunk k+1 is queued for its forward pass before chunk k
    is encoded and uploaded (on ``uploads``), so compute and I/O overlap while at most two chunks are in memory.

    The shard's storage calls share one retry window (:class:`~worker.storage.base.RetryWindow`): an outage is
    waited out once, and the first upload that gives up (or fails for good) stops the others, so the error comes
    promptly. Once the job ended (it failed elsewhere, or was canceled) the shard uploads nothing more: it stops
    and returns what it stored.

    Args:
        shard: the images this run stores; a retried shard rewrites identical objects.
        sample: queues (model name, version, labels, seeds) for a forward pass and returns a future of uint8 images.
        prefix: object key prefix (default :func:`job_prefix`; the embedded CLI writes at the top of its folder).
        stored: filled in as images are stored, so a caller can report partial outputs when the run fails.
        clock: the retry window's time (a fake one in tests).
        sheet_images: the contact sheet shows the job's first this many samples (every rendition of each); 0: no
            sheet.
        signer: signs the outputs of a job with ``provenance: "c2pa"`` (Content Credentials); a job asking for it
            of a worker that cannot sign fails before any image is sampled.
        one_image_manifest: store manifest.json for a job of one image without renditions too (see
            :func:`stores_manifest`).

    Raises whatever the model, the sampler or the storage raise; nothing is swallowed.
    """
    prefix = job_prefix(job) if prefix is None else prefix
    outputs = stored if stored is not None else []
    labels = job.image_labels()
    shard = shard or plan_shards(len(labels), len(labels))[0]
    if job.provenance == "c2pa":
        signer.ready()
    if not reporter.started(job, shard):
        if reporter.awaiting_manifest(job):  # a run recorded the job's last shard, then died before the manifest
            sheet = _Sheet(sample, chunk_size, sheet_images)
            manifest_key, sheet_key, _ = _finish(job, storage, reporter, shard, prefix, None, sheet, one_image_manifest)
            return GenerateResult([], manifest_key, sheet_key=sheet_key, completed=True, recovered=True)
        return GenerateResult(outputs=[], manifest_key=None, skipped=True)

    sheet = _Sheet(sample, chunk_size, sheet_images)  # fills with the cells of this run's first outputs

    def keep_going() -> bool:
        if reporter.active(job):
            return True
        job_ended(job.job_id)  # the job store says it ended: this process's other shards of it stop too
        return False

    window = RetryWindow(clock, keep_going=keep_going)
    _watch(job.job_id, window)
    storage = within(storage, window)
    version = f"{job.model_name}@{job.model_version}"
    chunks = [range(s, min(s + chunk_size, shard.stop)) for s in range(shard.start, shard.stop, chunk_size)]
    # A job of one image (no manifest object, no sheet: nothing lies between its stored image and its success) goes
    # from the stored image to success in one step: no progress write and no shard record before it (a run that
    # dies before the success is run again, as one that died before its shard's record is).
    one_step = shard.count == 1 and not stores_manifest(job, one_image_manifest)

    def queue_chunk(indices: range) -> Future[torch.Tensor]:
        seeds = [image_seed(job.seed, i) for i in indices]
        return sample(job.model_name, job.model_version, [labels[i].index for i in indices], seeds)

    def signed(data: bytes, label: str, seed: int) -> bytes:
        """An encoded output as stored: with Content Credentials if the job asks for them, else as encoded."""
        if job.provenance != "c2pa":
            return data
        return signer.sign(data, job.format, Claim(job.model_name, job.model_version, label, seed))

    def encode(index: int, image: np.ndarray) -> tuple[list[bytes], OutputRef]:
        """The encoded image (or each rendition, in the request's order, each signed on its own) and its listing."""
        label, seed = labels[index], image_seed(job.seed, index)
        info = provenance(generator=job.model_name, version=version, label=label.name, seed=seed)
        ext = job.format.extension
        ref = OutputRef(
            index=index,
            label=label.name,
            label_index=label.index,
            seed=seed,
            key=output_key(prefix, index, ext),
            sha256="",
            content_type=job.format.content_type,
        )
        if not job.renditions:
            data = signed(encode_image(image, job.format, info), label.name, seed)
            if index < sheet_images:  # a cell of the contact sheet: the run that writes it need not draw it again
                sheet.cells[index] = sheet_cells(job, image)
            return [data], ref.model_copy(update={"sha256": hashlib.sha256(data).hexdigest()})
        sample_image = from_chw(image)
        blobs: list[bytes] = []
        renditions: list[RenditionRef] = []
        pictures: list[Image.Image] = []
        for rendition in job.renditions:
            pixels = render(sample_image, rendition)
            pictures.append(pixels)
            encoded = encode_image(to_chw(pixels), job.format, info | {"genq:rendition": rendition.name})
            data = signed(encoded, label.name, seed)
            key = output_key(prefix, index, ext, rendition.name)
            blobs.append(data)
            renditions.append(
                RenditionRef(
                    name=rendition.name,
                    key=key,
                    sha256=hashlib.sha256(data).hexdigest(),
                    width=pixels.width,
                    height=pixels.height,
                )
            )
        if index < sheet_images:
            sheet.cells[index] = sheet_cells(job, image, pictures)
        first = renditions[0]
        return blobs, ref.model_copy(update={"key": first.key, "sha256": first.sha256, "renditions": renditions})

    def store(index: int, image: np.ndarray) -> tuple[list[bytes], OutputRef] | None:
        if window.stopped:  # an upload of the shard gave up, or the job ended: skipped, not waited for
            return None
        blobs, ref = encode(index, image)
        keys = [r.key for r in ref.renditions] if ref.renditions else [ref.key]
        try:
            for key, data in zip(keys, blobs, strict=True):
                storage.put(key, data, ref.content_type)
        except Exception as exc:
            window.give_up(exc)  # the shard fails with it: its other uploads need not spend their time
            raise
        return blobs, ref

    tar = ShardWriter() if job.output == "webdataset" else None
    tar_key = shard_key(prefix, shard.index)
    in_tar: list[OutputRef] = []  # listed as outputs only once the tar is stored
    pending = queue_chunk(chunks[0])
    for k, indices in enumerate(chunks):
        if k > 0 and (window.ended.is_set() or not keep_going()):
            return GenerateResult(outputs=list(outputs), manifest_key=None, stopped=True)
        images = pending.result().numpy()  # (B, C, H, W) uint8
        if k + 1 < len(chunks):
            pending = queue_chunk(chunks[k + 1])  # its forward pass runs while this chunk is stored
        work = encode if tar is not None else store  # a tar shard is one PUT at the end; objects go up now
        futures = [uploads.submit(work, i, image) for i, image in zip(indices, images, strict=True)]
        wait(futures)
        errors = [exc for f in futures if (exc := f.exception()) is not None]
        done = [result for f in futures if f.exception() is None and (result := f.result()) is not None]
        if tar is None:
            outputs.extend(ref for _, ref in done)
        if window.ended.is_set():  # the job ended while this chunk was stored: what failed or was skipped no matter
            return GenerateResult(outputs=list(outputs), manifest_key=None, stopped=True)
        if errors:
            raise window.error or errors[0]
        if tar is not None:
            for blobs, ref in done:
                in_tar.append(_add_to_tar(tar, tar_key, blobs, ref, version, job.format.extension))
        elif not (one_step and k == len(chunks) - 1):
            reporter.progress(job, shard, len(outputs))
    if tar is not None:
        if window.ended.is_set():
            return GenerateResult(outputs=list(outputs), manifest_key=None, stopped=True)
        storage.put(tar_key, tar.finish(), "application/x-tar")
        outputs.extend(in_tar)
        if not one_step:
            reporter.progress(job, shard, len(outputs))
    if not one_step and not reporter.shard_stored(job, shard, list(outputs)):  # the last shard ends the job
        return GenerateResult(outputs=list(outputs), manifest_key=None)
    # A job of one shard has every output in hand.
    everything = list(outputs) if shard.count == 1 else None
    finished = _finish(job, storage, reporter, shard, prefix, everything, sheet, one_image_manifest)
    manifest_key, sheet_key, succeeded = finished
    if one_step and not succeeded:  # canceled between its image and its success: listed as a stopped shard's
        return GenerateResult(outputs=list(outputs), manifest_key=None, stopped=True)
    return GenerateResult(outputs=list(outputs), manifest_key=manifest_key, sheet_key=sheet_key, completed=True)


def _add_to_tar(
    tar: ShardWriter, tar_key: str, blobs: list[bytes], ref: OutputRef, version: str, extension: str
) -> OutputRef:
    """Add one sample to a WebDataset tar: ``<index>.<ext>``, or ``<index>.<rendition>.<ext>`` per rendition (one
    sample key, so loaders group a sample's renditions and its ``<index>.json``); returns its listing in the tar."""
    meta = {"label": ref.label, "label_index": ref.label_index, "seed": ref.seed, "model": version}
    if not ref.renditions:
        member = tar.add(f"{ref.index:05d}", extension, blobs[0], meta | {"sha256": ref.sha256})
        return ref.model_copy(update={"key": tar_key, "member": member})
    files = [(f"{r.name}.{extension}", data) for r, data in zip(ref.renditions, blobs, strict=True)]
    meta |= {"renditions": {r.name: {"sha256": r.sha256, "width": r.width, "height": r.height} for r in ref.renditions}}
    members = tar.add_sample(f"{ref.index:05d}", files, meta)
    renditions = [
        r.model_copy(update={"key": tar_key, "member": m}) for r, m in zip(ref.renditions, members, strict=True)
    ]
    return ref.model_copy(update={"key": tar_key, "member": members[0], "renditions": renditions})


@dataclass(frozen=True)
class _Sheet:
    """How the run that completes a job makes its contact sheet: the sampler, its chunk size, how many samples, and
    the cells this run made as it stored its own outputs (index -> one per rendition)."""

    sample: Sampler
    chunk_size: int
    images: int
    cells: dict[int, list[Image.Image]] = field(default_factory=dict)


def make_sheet(
    job: GenerateJob, sample: Sampler, chunk_size: int, images: int, made: dict[int, list[Image.Image]] | None = None
) -> bytes | None:
    """The contact sheet of ``job`` as PNG bytes: its first ``images`` samples in manifest order (each sample's
    renditions side by side, in the request's order), captioned with index, label and rendition; None when
    ``images`` is 0, and for a job of one image without renditions. ``made``: cells already made
    (:func:`sheet_cells`) by index, as the run stored those outputs.

    The run that completes a job has the cells of the outputs it stored itself (all of them in a job of one shard,
    the common case). The others are drawn again from (model version, label, seed) and rendered, rather than read
    back from storage: sampling is deterministic per image whatever batch it rides in and post-processing is a pure
    function, so the pixels are the stored ones, byte for byte; one forward pass of at most ``images`` samples costs
    milliseconds for the models genq serves, and rendering costs about what a GET and a decode of each output
    would, without reading a whole tar per shard for WebDataset output, nor depending on storage reads at all.
    """
    count = min(images, job.total_images)
    if count <= 0 or (job.total_images == 1 and not job.renditions):
        return None  # a sheet of one image is that image: the most common request stores no third object
    labels = job.image_labels()[:count]
    cells = dict(made or {})
    missing = [i for i in range(count) if i not in cells]
    for start in range(0, len(missing), chunk_size):
        indices = missing[start : start + chunk_size]
        seeds = [image_seed(job.seed, i) for i in indices]
        batch = sample(job.model_name, job.model_version, [labels[i].index for i in indices], seeds).result().numpy()
        for index, image in zip(indices, batch, strict=True):  # (C, H, W) uint8
            cells[index] = sheet_cells(job, image)
    names = [f" {r.name}" for r in job.renditions] if job.renditions else [""]
    captions = [f"{i} {labels[i].name}{name}" for i in range(count) for name in names]
    per_row = max(1, SHEET_PER_ROW // len(names)) * len(names)
    sheet = contact_sheet([cell for i in range(count) for cell in cells[i]], captions, per_row=per_row)
    buffer = io.BytesIO()
    # zlib level 6 (the outputs' too): level 9 took 21 ms instead of 1.5 for a 4-cell sheet, 320 instead of 24 for a
    # 64-cell one, for 3 % fewer bytes; a 4-image job's worker CPU doubled.
    sheet.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def sheet_cells(job: GenerateJob, image: np.ndarray, rendered: list[Image.Image] | None = None) -> list[Image.Image]:
    """The contact sheet's cells of one sample, uint8 (C, H, W): each rendition (``rendered``, or rendered now), or
    the sample itself, scaled into a sheet cell (:func:`models.grid.sheet_cell`): small enough to keep."""
    if not job.renditions:
        return [sheet_cell(from_chw(image))]
    pictures = rendered if rendered is not None else [render(from_chw(image), r) for r in job.renditions]
    return [sheet_cell(picture) for picture in pictures]


def _finish(
    job: GenerateJob,
    storage: Storage,
    reporter: Reporter,
    shard: Shard,
    prefix: str,
    outputs: list[OutputRef] | None,
    sheet: _Sheet,
    one_image_manifest: bool,
) -> tuple[str | None, str | None, bool]:
    """Store the contact sheet and the manifest of a job whose shards are all stored and mark it succeeded;
    ``outputs``: all of them, or None to read each shard's back from the reporter, one shard at a time. Returns the
    manifest's key (None: served from the record, :func:`stores_manifest`), the sheet's (None: no sheet) and whether
    the job was marked succeeded (False: it ended meanwhile)."""
    sheet_png = make_sheet(job, sheet.sample, sheet.chunk_size, sheet.images, sheet.cells)
    sheet_key = None
    if sheet_png is not None:
        sheet_key = prefix + constants.SHEET_NAME
        storage.put(sheet_key, sheet_png, "image/png")
    parts = [outputs] if outputs is not None else reporter.stored_outputs(job, shard.count)
    manifest_key = prefix + constants.MANIFEST_NAME if stores_manifest(job, one_image_manifest) else None
    first, total = write_manifest(job, storage, manifest_key, parts, sheet_key=sheet_key)
    succeeded = reporter.succeeded(job, first, total, manifest_key, sheet_key=sheet_key)
    return manifest_key, sheet_key, succeeded


def stores_manifest(job: GenerateJob, one_image_manifest: bool = False) -> bool:
    """Whether ``job`` stores manifest.json: every job but one of a single image without renditions (the most common
    request), unless ``one_image_manifest``. That job's one output is in its record, so its manifest, the same
    document, is built from the record when asked for (:meth:`producer.contract.Manifest.of_view`): one PUT per job
    instead of two, and the job succeeds a round trip to storage sooner."""
    return one_image_manifest or job.total_images > 1 or bool(job.renditions)


def write_manifest(
    job: GenerateJob,
    storage: Storage,
    key: str | None,
    parts: Iterable[list[OutputRef]],
    sheet_key: str | None = None,
) -> tuple[list[OutputRef], int]:
    """Store ``manifest.json`` (a :class:`Manifest`) at ``key`` listing every output of ``job``, streamed one shard's
    part at a time through a spooled file: memory stays flat however many images the job has. With ``key`` None the
    outputs are checked the same way and nothing is stored.

    Returns the first :data:`VIEW_OUTPUTS_MAX` outputs (for the job's view) and how many were listed.

    Raises:
        IncompleteJob: an output index is missing or repeated; no manifest is written (the job must not succeed
            with a hole in it).
    """
    header = Manifest(
        job_id=job.job_id,
        model=job.model,
        model_version=f"{job.model_name}@{job.model_version}",
        seed=job.seed,
        format=job.format,
        created_at=job.created_at,
        sheet_key=sheet_key,
        outputs=[],
    ).model_dump(mode="json", exclude={"outputs"}, exclude_none=True)
    opening = json.dumps(header, separators=(",", ":"))[:-1] + ',"outputs":['  # the outputs go in between
    first: list[OutputRef] = []
    total = 0
    with tempfile.SpooledTemporaryFile(max_size=MANIFEST_SPOOL_BYTES) as out:
        out.write(opening.encode())
        for part in parts:
            for ref in part:
                if ref.index != total:
                    hole = f"{ref.index} is listed twice" if ref.index < total else f"{total} is missing"
                    raise IncompleteJob(f"job {job.job_id}: output {hole} in the stored shards; manifest not written")
                out.write(b"," if total else b"")
                out.write(ref.model_dump_json(exclude_none=True).encode())
                if len(first) < VIEW_OUTPUTS_MAX:
                    first.append(ref)
                total += 1
        if total != job.total_images:
            raise IncompleteJob(f"job {job.job_id}: {total} of {job.total_images} outputs stored; manifest not written")
        out.write(b"]}")
        if key is not None:
            storage.put_file(key, cast(IO[bytes], out), "application/json")
    return first, total
