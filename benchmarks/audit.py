"""What a benchmark run left behind: how each job ended, what the bucket holds for it, what is left in Redis (queues,
``unacked``, the queued-jobs indexes, dead letters), and which callback events a receiver got."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import boto3
import redis

from producer.client import Client
from producer.contract import GenerateRequest, JobStatus, JobView
from producer.core import constants
from producer.core.callbacks.signing import WebhookVerificationError, verify
from producer.core.records import as_text
from producer.core.settings import DEV_WEBHOOK_SECRET
from producer.errors import JobNotFound

QUEUES = [constants.CALLBACK_QUEUE, *constants.JOB_QUEUES]
DRAIN_S = 30.0  # messages still on their way at the end (a restored one, a second delivery) get this long


class Receiver:
    """Callback receiver on loopback: answers 200 to every POST and records each event signed with the dev secret,
    (job id, type) by its ``webhook-id``, and how many times it came."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.posts: Counter[str] = Counter()
        self.events: dict[str, tuple[str, str]] = {}
        self.unverified = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def record(self, headers: dict[str, str], body: bytes) -> None:
        try:
            verify(DEV_WEBHOOK_SECRET, headers, body)
        except WebhookVerificationError:
            with self.lock:
                self.unverified += 1
            return
        event = json.loads(body)
        msg_id = {k.lower(): v for k, v in headers.items()}["webhook-id"]
        with self.lock:
            self.posts[msg_id] += 1
            self.events[msg_id] = (event["data"]["id"], event["type"])


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            receiver.record(dict(self.headers.items()), body)
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@dataclass
class Audit:
    """What became of a run's jobs; lists hold job ids."""

    succeeded: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # by error type
    failed_ids: list[str] = field(default_factory=list)
    canceled: int = 0
    gone: list[str] = field(default_factory=list)  # no record
    stuck: list[str] = field(default_factory=list)  # still queued or running
    duplicated: list[str] = field(default_factory=list)  # more images stored than asked for, or an output listed twice
    incomplete: list[str] = field(default_factory=list)  # succeeded without every image or its manifest stored
    rerun: int = 0  # jobs delivered to a worker more than once
    index_entries: list[str] = field(default_factory=list)  # "<queue> <job id> <its status>"
    queued_messages: int = 0
    unacked: int = 0
    running_shards: int = 0
    callbacks_pending: int = 0
    deadletters: int = 0
    events: dict[str, int] = field(default_factory=dict)
    run_s: float = 0.0  # from the first job's start to the last one's end, from the records


def ended_jobs(client: redis.Redis, pending: set[str], gone: list[str]) -> set[str]:
    """The pending jobs whose records say they ended, and those whose record is gone (added to ``gone``)."""
    ended: set[str] = set()
    order = list(pending)
    for start in range(0, len(order), 2000):
        chunk = order[start : start + 2000]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hget(constants.JOB_KEY.format(job_id=job_id), "status")
        for job_id, status in zip(chunk, pipe.execute(), strict=True):
            if status is None:
                gone.append(job_id)
                ended.add(job_id)
            elif JobStatus(as_text(status)).is_terminal():
                ended.add(job_id)
    return ended


def audit(
    client: Client,
    ids: list[str],
    requests: list[GenerateRequest],
    s3_endpoint: str,
    bucket: str,
    receiver: Receiver,
    settle_s: float,
) -> Audit:
    """Wait for callback events (up to ``settle_s``) and for the queues to drain (up to :data:`DRAIN_S`), then
    read every job's record, the bucket's objects under ``jobs/`` and what is left in Redis."""
    out = Audit()
    views = _views(client, ids, out.gone)
    finished = [v.finished_at for v in views.values() if v.finished_at is not None]
    begun = [v.started_at for v in views.values() if v.started_at is not None]
    if finished and begun:
        out.run_s = (max(finished) - min(begun)).total_seconds()
    out.events = settle_callbacks(client, receiver, views, requests, ids, settle_s)
    deadline = time.monotonic() + DRAIN_S
    while time.monotonic() < deadline and _messages(client.redis) != (0, 0):
        time.sleep(1)
    views = _views(client, ids, [])  # the jobs that ended meanwhile
    for job_id, view in views.items():
        if view.status is JobStatus.SUCCEEDED:
            out.succeeded += 1
        elif view.status is JobStatus.FAILED:
            out.failed[view.error.type if view.error else "?"] += 1
            out.failed_ids.append(job_id)
        elif view.status is JobStatus.CANCELED:
            out.canceled += 1
        else:
            out.stuck.append(job_id)
    stored: Counter[str] = Counter()
    manifests: set[str] = set()
    pages = (
        boto3.client("s3", endpoint_url=s3_endpoint)
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix="jobs/")
    )
    for page in pages:
        for obj in page.get("Contents", []):
            _, job_id, name = obj["Key"].split("/", 2)
            if name == constants.MANIFEST_NAME:
                manifests.add(job_id)
            else:
                stored[job_id] += 1
    for job_id, request in zip(ids, requests, strict=True):
        found = views.get(job_id)
        count = request.total_images
        keys = [o.key for o in found.outputs] if found else []
        if stored[job_id] > count or len(set(keys)) < len(keys) or len(keys) > count:
            out.duplicated.append(job_id)
        succeeded = found is not None and found.status is JobStatus.SUCCEEDED
        if succeeded and (stored[job_id] < count or len(keys) < count or job_id not in manifests):
            out.incomplete.append(job_id)
    pipe = client.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(constants.JOB_KEY.format(job_id=job_id), "deliveries:0")  # every job here is one shard
    out.rerun = sum(int(d or 0) > 1 for d in pipe.execute())
    for queue in constants.JOB_QUEUES:
        entries = cast(list[bytes], client.redis.zrange(constants.QUEUED_JOBS_KEY.format(queue=queue), 0, -1))
        for job_id in map(as_text, entries):
            status = views[job_id].status.value if job_id in views else "no record"
            out.index_entries.append(f"{queue} {job_id} {status}")
    out.queued_messages, out.unacked = _messages(client.redis)
    out.running_shards = int(client.redis.zcard(constants.RUNNING_SHARDS_KEY))
    out.callbacks_pending = int(client.redis.zcard(constants.CALLBACKS_PENDING_KEY))
    out.deadletters = int(client.redis.llen(constants.DEADLETTER_KEY))
    return out


def _views(client: Client, ids: list[str], gone: list[str]) -> dict[str, JobView]:
    views: dict[str, JobView] = {}
    for job_id in ids:
        try:
            views[job_id] = client.status(job_id)
        except JobNotFound:
            gone.append(job_id)
    return views


def _messages(client: redis.Redis) -> tuple[int, int]:
    """(messages on the job and callback queues, messages in kombu's ``unacked``)."""
    return sum(int(client.llen(q)) for q in QUEUES), int(client.hlen(constants.KOMBU_UNACKED_KEY))


def settle_callbacks(
    client: Client,
    receiver: Receiver,
    views: dict[str, JobView],
    requests: list[GenerateRequest],
    ids: list[str],
    timeout: float,
) -> dict[str, int]:
    """Wait (up to ``timeout``) until every expected event was delivered or dead-lettered; the counts.

    A job with a callback owes ``queued``, ``running`` if it started, and its end if it ended.
    """
    expected: set[tuple[str, str]] = set()
    for job_id, request in zip(ids, requests, strict=True):
        view = views.get(job_id)
        if request.callback is None or view is None:
            continue
        expected.add((job_id, "queued"))
        if view.started_at is not None:
            expected.add((job_id, "running"))
        if view.status.is_terminal():
            expected.add((job_id, view.status.value))
    ours = {job_id for job_id, _ in expected}
    deadline = time.monotonic() + timeout
    while True:
        with receiver.lock:
            got = {msg_id: event for msg_id, event in receiver.events.items() if event[0] in ours}
            posts = sum(receiver.posts[msg_id] for msg_id in got)
        delivered = set(got.values())
        dead = set()
        for raw in client.redis.lrange(constants.CALLBACK_DEAD_KEY, 0, -1):
            message = json.loads(raw)["message"]
            dead.add((message["job_id"], message["event"]["type"]))
        missing = expected - delivered - dead
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    return {
        "expected": len(expected),
        "delivered": len(expected & delivered),
        "dead_lettered": len(expected & dead),
        "missing": len(missing),
        "unexpected": len(delivered - expected),
        "announced_twice": len(got) - len(delivered),  # one (job, type) under two webhook-ids
        "posts_repeated": posts - len(got),  # the same webhook-id POSTed again (at least once: allowed)
        "unverified": receiver.unverified,
    }
