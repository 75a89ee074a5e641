"""What must hold after any fault, checked the same way by every chaos test::

    view = client.wait(job.id, timeout=120)                  # after the fault
    clean = client.wait(client.submit(request).id, 120)      # the same spec again, on the same stack, no fault
    faulted = assert_exact(stack, view, 1500)                # succeeded with every index once, nothing else stored
    assert_identical(stack, faulted, assert_exact(stack, clean, 1500))  # byte for byte the clean run's outputs
    wait_nothing_left(stack.redis, [view.id, clean.id])      # no message, index entry or heartbeat left behind
    settle(stack, [view.id], receiver=receiver)              # every callback event delivered or dead-lettered

Image *i* depends only on (model version, label, seed), so a job run through faults stores exactly the bytes a clean
run of its spec stores, under another job id. Stored bytes are compared as S3 ETags (the MD5 of an object stored in
one PUT, as every output is), read in one listing per 1,000 objects, index by index; each output's SHA-256 (the
manifest's, computed by the worker from the bytes it stored) is compared index by index too, and the first, middle
and last objects are read back and hashed to tie the two together. A WebDataset job's tars are read whole and each
member hashed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from stack import Stack
from webhook_receiver import WebhookReceiver

from producer.contract import JobStatus, JobView, Manifest
from producer.core import constants
from producer.core.callbacks.events import CallbackDeadLetter

UNACKED_INDEX_KEY = "unacked_index"  # kombu's Redis transport: delivery tag -> when it was fetched


@dataclass(frozen=True)
class Stored:
    """What a job left in object storage: its manifest, and every object under its prefix with its ETag."""

    view: JobView
    manifest: Manifest
    objects: dict[str, str]


def job_prefix(view: JobView) -> str:
    if view.tenant is not None:
        return constants.TENANT_JOB_PREFIX.format(tenant=view.tenant, job_id=view.id)
    return constants.JOB_PREFIX.format(job_id=view.id)


def objects_under(stack: Stack, view: JobView) -> dict[str, str]:
    """Every object under the job's prefix and its ETag, from one listing per 1,000 objects."""
    pages = stack.s3().get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix=job_prefix(view))
    return {obj["Key"]: obj["ETag"].strip('"') for page in pages for obj in page.get("Contents", [])}


def assert_exact(stack: Stack, view: JobView, count: int) -> Stored:
    """The job succeeded with exactly ``count`` outputs: its progress and manifest count indexes 0 … count-1 once
    each, and its prefix holds exactly the manifest's objects (every rendition), the contact sheet it names and the
    manifest, nothing outside it."""
    assert view.status is JobStatus.SUCCEEDED, f"job {view.id}: {view.status} ({view.error})"
    assert view.progress.done == count, (view.id, view.progress)
    assert view.manifest_key is not None, f"job {view.id} succeeded without a manifest"
    manifest = Manifest.model_validate_json(stack.get(view.manifest_key))
    assert [o.index for o in manifest.outputs] == list(range(count)), f"job {view.id}: indexes missing or repeated"
    objects = objects_under(stack, view)
    renditions = {r.key for o in manifest.outputs for r in o.renditions or ()}
    sheet = {manifest.sheet_key} if manifest.sheet_key is not None else set()
    expected = {o.key for o in manifest.outputs} | renditions | sheet | {view.manifest_key}
    extra, missing = set(objects) - expected, expected - set(objects)
    assert not extra and not missing, f"job {view.id}: outside its manifest {sorted(extra)}, missing {sorted(missing)}"
    return Stored(view, manifest, objects)


def output_digests(stack: Stack, stored: Stored) -> list[str]:
    """A digest of each output's stored bytes, by index: the S3 ETag of each object (every output is one PUT), or
    the SHA-256 of each image inside a WebDataset job's tars."""
    outputs = stored.manifest.outputs
    if not any(o.member is not None for o in outputs):
        return [stored.objects[o.key] for o in outputs]
    members: dict[tuple[str, str], str] = {}
    for key in sorted({o.key for o in outputs}):
        with tarfile.open(fileobj=io.BytesIO(stack.get(key))) as tar:
            for info in tar.getmembers():
                data = tar.extractfile(info)
                assert data is not None, (key, info.name)
                members[(key, info.name)] = hashlib.sha256(data.read()).hexdigest()
    return [members[(o.key, str(o.member))] for o in outputs]


def assert_identical(stack: Stack, faulted: Stored, clean: Stored, *, read_back: bool = True) -> None:
    """The faulted job's outputs are byte for byte those of ``clean``, a run of the same spec without the fault:
    the stored bytes and the manifests' SHA-256, index by index. ``read_back``: its first, middle and last objects
    are read and hashed too (once per test is enough to tie the manifest's SHA-256 to the stored bytes)."""
    mine, reference = faulted.manifest.outputs, clean.manifest.outputs
    job = faulted.view.id
    assert len(mine) == len(reference), (len(mine), len(reference))
    differ = [o.index for o, r in zip(mine, reference, strict=True) if o.sha256 != r.sha256]
    assert not differ, f"job {job}: the manifest's SHA-256 differs from the clean run's at indexes {differ[:20]}"
    digests = zip(output_digests(stack, faulted), output_digests(stack, clean), strict=True)
    differ = [i for i, (a, b) in enumerate(digests) if a != b]
    assert not differ, f"job {job}: stored bytes differ from the clean run's at indexes {differ[:20]}"
    sheets = [s.manifest.sheet_key for s in (faulted, clean)]
    if sheets[0] is not None and sheets[1] is not None:  # drawn again by whichever run wrote the manifest
        assert stack.get(sheets[0]) == stack.get(sheets[1]), (
            f"job {job}: its contact sheet differs from the clean run's"
        )
    for ref in (mine[i] for i in sorted({0, len(mine) // 2, len(mine) - 1}) if read_back):
        if ref.member is None:  # a tar's members were hashed above
            assert hashlib.sha256(stack.get(ref.key)).hexdigest() == ref.sha256, f"{ref.key}: not the manifest's"


# -- nothing left behind in Redis ------------------------------------------------------------------------------------


def _queues() -> set[str]:
    """Every Celery queue genq sends to (per priority, and any others the constants module names)."""
    names = {*constants.WORKER_QUEUES, constants.TRAIN_QUEUE, constants.CALLBACK_QUEUE}
    for value in vars(constants).values():
        if isinstance(value, dict) and all(isinstance(q, str) for q in value.values()):
            names |= {q for q in value.values() if q.startswith("generate")}
    return names


def _mentions(element: bytes | str, job_ids: Iterable[str]) -> str | None:
    """The job id a kombu message (a queue element, or an unacked entry wrapping it) is about, if one of
    ``job_ids``: its task id (``<job id>.<shard>``) or, for a callback event, its arguments."""
    raw = element.encode() if isinstance(element, str) else element
    texts = [raw]
    try:
        decoded = json.loads(raw)
        message = decoded[0] if isinstance(decoded, list) else decoded
        texts.append(base64.b64decode(str(message.get("body", ""))))
    except (ValueError, AttributeError, IndexError, TypeError):
        pass
    return next((j for j in job_ids for text in texts if j.encode() in text), None)


def leftovers(client: redis.Redis, job_ids: Iterable[str] = (), *, everything: bool = False) -> list[str]:
    """What the jobs still have in the broker and genq's indexes: messages on a queue or in kombu's unacked hash,
    entries in a queued-jobs index (``genq:queued:<queue>``), running shards (``genq:shards:running``), callback
    events not relayed yet (``genq:callbacks:outbox``) and callback messages kept for the sweeper
    (``genq:callbacks:pending``). ``everything``: anything there at all, whatever its
    job (a Redis of the test's own)."""
    ids = list(job_ids)

    def about(elements: Iterable[bytes], where: str) -> list[str]:
        if everything:
            return [f"{n} in {where}"] if (n := len(list(elements))) else []
        return [f"job {job} in {where}" for e in elements if (job := _mentions(e, ids))]

    found: list[str] = []
    for queue in sorted(_queues()):
        found += about(client.lrange(queue, 0, -1), f"queue {queue}")
    found += about(client.hvals(constants.KOMBU_UNACKED_KEY), constants.KOMBU_UNACKED_KEY)
    if everything:
        found += about(client.zrange(UNACKED_INDEX_KEY, 0, -1), UNACKED_INDEX_KEY)
    for index in client.scan_iter(match=constants.QUEUED_JOBS_KEY.format(queue="*"), count=100):
        members = [m.decode() for m in client.zrange(index, 0, -1)]
        found += [f"job {m} in {index.decode()}" for m in members if everything or m in ids]
    running = [m.decode() for m in client.zrange(constants.RUNNING_SHARDS_KEY, 0, -1)]
    found += [
        f"shard {m} in {constants.RUNNING_SHARDS_KEY}" for m in running if everything or m.rsplit(".", 1)[0] in ids
    ]
    found += about(client.hvals(constants.CALLBACKS_PENDING_ARGS_KEY), constants.CALLBACKS_PENDING_ARGS_KEY)
    outbox = [fields.get(b"job", b"") for _id, fields in client.xrange(constants.CALLBACK_OUTBOX_KEY)]
    found += about(outbox, constants.CALLBACK_OUTBOX_KEY)
    if everything:
        found += about(client.zrange(constants.CALLBACKS_PENDING_KEY, 0, -1), constants.CALLBACKS_PENDING_KEY)
    return found


def wait_nothing_left(
    client: redis.Redis, job_ids: Iterable[str] = (), *, everything: bool = False, timeout: float = 30.0
) -> None:
    """Wait until :func:`leftovers` finds nothing (a message is acknowledged just after its job ends, a running
    shard leaves the set at the next heartbeat); AssertionError listing what is left after ``timeout``."""
    ids = list(job_ids)
    deadline = time.monotonic() + timeout
    while (left := leftovers(client, ids, everything=everything)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"left behind after {timeout} s: {left}"


# -- callback events: delivered or dead-lettered, never lost ----------------------------------------------------------


@dataclass(frozen=True)
class Settled:
    """How a job's callback events ended (``webhook-id`` s): delivered (a 2xx answer), dead-lettered (the retry
    schedule used up), or stopped (not sent, or answered 410 Gone: the receiver asked for no more); and the attempts
    genq recorded as sent, of every event."""

    delivered: frozenset[str]
    dead_lettered: frozenset[str]
    stopped: frozenset[str]
    attempts: int


def _ended(record: dict[str, Any]) -> bool:
    """The attempt is the event's last: delivered, dead-lettered, not sent, or failed with no retry due (410)."""
    return bool(record["ok"] or record["dead_lettered"] or not record["sent"] or not record["next_retry_at"])


def _by_event(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_event: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_event.setdefault(record["msg_id"], []).append(record)
    return by_event


def settle(
    stack: Stack,
    job_ids: Iterable[str],
    *,
    types: Iterable[str] = ("succeeded",),
    receiver: WebhookReceiver | None = None,
    timeout: float = 60.0,
) -> dict[str, Settled]:
    """Wait until every callback event of the jobs has ended, then check that none was lost; returns how each job's
    events ended.

    Each event of the delivery ledger (``genq:job:<id>:events``) has attempts 1, 2, … and ends exactly once:
    delivered, dead-lettered (and then in ``genq:callbacks:dead``) or stopped; each job has one event of each of
    ``types``; no callback message of the jobs is left in the broker or ``genq:callbacks:pending``. ``receiver``:
    where the events were sent. Of the requests it got about these jobs, it answered 2xx to each delivered event and
    to no other, and got each event exactly as often as the ledger says it was sent: no attempt unrecorded, none
    recorded and not made.
    """
    ids = list(job_ids)
    wanted = set(types)

    def settled(records: dict[str, list[dict[str, Any]]]) -> bool:
        return all(
            wanted <= {r["type"] for r in job_records}
            and all(any(_ended(r) for r in rs) for rs in _by_event(job_records).values())
            for job_records in records.values()
        )

    deadline = time.monotonic() + timeout
    while not settled(records := {job_id: stack.client.deliveries(job_id) for job_id in ids}):
        if time.monotonic() > deadline:
            raise AssertionError(f"callback events not ended after {timeout} s: {json.dumps(records)[-4000:]}")
        time.sleep(0.1)
    wait_nothing_left(stack.redis, ids, timeout=max(1.0, deadline - time.monotonic()))
    records = {job_id: stack.client.deliveries(job_id) for job_id in ids}  # final: no attempt can follow now

    letters = {
        CallbackDeadLetter.model_validate_json(raw).message.msg_id
        for raw in stack.redis.lrange(constants.CALLBACK_DEAD_KEY, 0, -1)
    }
    result: dict[str, Settled] = {}
    sent: Counter[str] = Counter()
    for job_id, job_records in records.items():
        by_event = _by_event(job_records)
        for t in wanted:
            assert sum(rs[0]["type"] == t for rs in by_event.values()) == 1, f"job {job_id}: not one {t} event"
        endings: dict[str, set[str]] = {"delivered": set(), "dead": set(), "stopped": set()}
        for msg_id, rs in by_event.items():
            assert [r["attempt"] for r in rs] == list(range(1, len(rs) + 1)), f"event {msg_id}: attempts {rs}"
            last = [r for r in rs if _ended(r)]
            assert len(last) == 1 and last[0] is rs[-1], f"event {msg_id} ended {len(last)} times: {rs}"
            ending = "delivered" if last[0]["ok"] else "dead" if last[0]["dead_lettered"] else "stopped"
            endings[ending].add(msg_id)
            sent[msg_id] += sum(bool(r["sent"]) for r in rs)
        assert endings["dead"] <= letters, f"job {job_id}: dead-lettered events not in {constants.CALLBACK_DEAD_KEY}"
        attempts = sum(sent[m] for m in by_event)
        result[job_id] = Settled(*(frozenset(endings[k]) for k in ("delivered", "dead", "stopped")), attempts)
    if receiver is not None:  # read now: every attempt has ended and none can follow
        ours = [r for r in receiver.received if r.json().get("data", {}).get("id") in ids]
        got = Counter(r.headers["webhook-id"] for r in ours)
        answered = {r.headers["webhook-id"] for r in ours if 200 <= r.status < 300}
        assert got == +sent, f"the receiver got {dict(got)}; the ledger sent {dict(sent)}"
        assert answered == {m for s in result.values() for m in s.delivered}, "2xx answers are not the deliveries"
    return result
