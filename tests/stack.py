"""The pieces of the integration stack that tests import (fixtures live in tests/stack_fixtures.py)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import redis

from producer.client import Client

# The tests' webhook receivers listen on 127.0.0.1, which the SSRF guard refuses unless it is allow-listed.
LOOPBACK_ALLOWED = ["127.0.0.1"]
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def boto_kwargs() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS_ENV["AWS_DEFAULT_REGION"],
    }


@dataclass
class Stack:
    """What an integration test talks to."""

    redis_url: str
    redis: redis.Redis
    s3_endpoint: str
    bucket: str
    model_root: Path
    client: Client

    def s3(self) -> Any:
        return boto3.client("s3", endpoint_url=self.s3_endpoint, **boto_kwargs())

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def get(self, key: str) -> bytes:
        return bytes(self.s3().get_object(Bucket=self.bucket, Key=key)["Body"].read())


# The sweeper and the watchdog within seconds instead of minutes: a sweep every 1.5 s looks at jobs queued over 2 s,
# heartbeats every 0.5 s, a running shard unbeaten for 2 s is looked at (what the defaults do in 90-95 s).
FAST_RECOVERY = {
    "GENQ_SWEEPER__INTERVAL_S": "1.5",
    "GENQ_SWEEPER__STRANDED_AFTER_S": "2",
    "GENQ_SWEEPER__CONFIRM_S": "1",
    "GENQ_SWEEPER__HEARTBEAT_S": "0.5",
    "GENQ_SWEEPER__ORPHANED_AFTER_S": "2",
}


def worker_env(stack: Stack, **overrides: str) -> dict[str, str]:
    """Environment of a `genq worker` subprocess wired to the stack; ``overrides`` use GENQ_* names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "AWS_"))}
    env.update(AWS_ENV)
    env.update(
        {
            "AWS_ENDPOINT_URL": stack.s3_endpoint,
            "GENQ_REDIS__URL": stack.redis_url,
            "GENQ_S3__BUCKET": stack.bucket,
            "GENQ_STORAGE": "s3",
            "GENQ_MODEL_DIRS": json.dumps([str(stack.model_root)]),
            "GENQ_STORAGE_RETRY__WINDOW_S": "5",
            "GENQ_CELERY__UNACKED_RESTORE_INTERVAL_S": "1",
            "GENQ_WEBHOOK__ALLOW_HOSTS": json.dumps(LOOPBACK_ALLOWED),
        }
    )
    env.update(overrides)
    return env


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms until it holds; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def deliveries_until(
    stack: Stack, job_id: str, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 30
) -> list[dict[str, Any]]:
    """The job's delivery records once ``done`` holds for them; TimeoutError showing them after ``timeout`` s.

    Events of one job are attempted on parallel threads, so the ledger's order is not the events' order: wait for
    each record a test asserts on (:func:`recorded`), never for the last event alone."""
    deadline = time.monotonic() + timeout
    while True:
        records = stack.client.deliveries(job_id)
        if done(records):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"deliveries of job {job_id} after {timeout} s: {json.dumps(records, indent=1)}")
        time.sleep(0.05)


def recorded(*types: str) -> Callable[[list[dict[str, Any]]], bool]:
    """A :func:`deliveries_until` condition: a record of each of ``types`` is in the ledger."""
    return lambda records: {r["type"] for r in records} >= set(types)
