"""What one sweep for lost messages costs while a backlog waits, and when a message is missing.

    python -m benchmarks.sweeper [--redis redis://127.0.0.1:6379/15] [--sizes 1000,10000,100000]

For each backlog size N it fills the ``generate`` queue with N real Celery messages (one submitted through the
client, copied with fresh job ids, each with its job record and index entry), then times
:meth:`worker.sweeper.Sweeper.sweep` in three states: the backlog younger than ``stranded_after_s`` (not looked
at), older with nothing lost (the oldest waiting jobs are found at the queue's front), and older with one of the
oldest 1,000 jobs' messages lost (a whole-queue read in each of the two looks). Each row gives the sweep's wall
time, its LRANGE calls and the time Redis spent in them (``INFO commandstats``: Redis serves nothing else
meanwhile), and the messages sent again. Nothing here is asserted. FLUSHES the Redis DB it is given: never point it
at a live one.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any, cast

import redis

from producer.client import Client
from producer.contract import GenerateRequest, JobStatus, ModelEntry, ModelVersionInfo
from producer.core import constants
from producer.core.messages import JobMessage
from producer.core.settings import RedisSettings
from producer.settings import ClientSettings
from worker.settings import SweeperSettings
from worker.sweeper import Sweeper

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
HOUR = 3600.0


def lrange_stats(client: redis.Redis) -> tuple[int, int]:
    """(calls, microseconds) Redis has spent in LRANGE since its stats were reset."""
    stats: dict[str, Any] = client.info("commandstats").get("cmdstat_lrange", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def fill(client: Client, n: int) -> list[str]:
    """N queued jobs with one message each on ``generate``, oldest first; returns their ids in that order."""
    template_id = client.submit(GenerateRequest(model="fmnist-cgan", label="bag", count=1, seed=1)).id
    template = client.redis.rpop(constants.GENERATE_QUEUE)
    assert isinstance(template, bytes)
    raw = cast(dict[bytes, bytes], client.redis.hgetall(client.store.key(template_id)))
    record: dict[Any, Any] = {k.decode(): v for k, v in raw.items()}
    index = constants.QUEUED_JOBS_KEY.format(queue=constants.GENERATE_QUEUE)
    client.redis.delete(client.store.key(template_id), index)
    created = time.time()
    ids = [uuid.uuid4().hex for _ in range(n)]
    for start in range(0, n, 5000):
        pipe = client.redis.pipeline(transaction=False)
        for k, job_id in enumerate(ids[start : start + 5000], start):
            pipe.hset(client.store.key(job_id), mapping=record)
            pipe.hset(client.store.key(job_id), "spec", record["spec"].replace(template_id.encode(), job_id.encode()))
            pipe.zadd(index, {job_id: created + k * 1e-6})
            pipe.lpush(constants.GENERATE_QUEUE, template.replace(template_id.encode(), job_id.encode()))
        pipe.execute()
    return ids


def timed_sweep(client: Client, later_s: float = HOUR) -> tuple[float, int, float, int]:
    """One sweep (its clock ``later_s`` ahead, no pause between its two looks): ms, LRANGE calls and ms, resent."""
    sent: list[JobMessage] = []
    settings = SweeperSettings(interval_s=30, stranded_after_s=60, confirm_s=0)
    sweeper = Sweeper(client.redis, client.store, sent.append, settings, clock=lambda: time.time() + later_s)
    client.redis.config_resetstat()
    start = time.perf_counter()
    sweeper.sweep()
    wall = time.perf_counter() - start
    calls, usec = lrange_stats(client.redis)
    return wall * 1000, calls, usec / 1000, len(sent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="a Redis DB to FLUSH and use")
    parser.add_argument("--sizes", default="1000,10000,100000", help="backlog sizes, comma-separated")
    options = parser.parse_args()
    client = Client(ClientSettings(redis=RedisSettings(url=options.redis)))
    info = ModelVersionInfo(arch="cgan", class_names=CLASSES, resolution=28, channels=1)
    catalog = ModelEntry(name="fmnist-cgan", versions={"1": info}, aliases={"latest": "1"})

    rows = []
    for n in (int(s) for s in options.sizes.split(",")):
        client.redis.flushdb()
        client.redis.hset(constants.CATALOG_KEY, catalog.name, catalog.model_dump_json())
        ids = fill(client, n)
        rows.append((n, "backlog, all recent", *timed_sweep(client, later_s=0.0)))
        rows.append((n, "backlog, none lost", *timed_sweep(client)))
        lost = ids[min(500, n - 1)].encode()  # among the oldest 1,000: the jobs a sweep looks at
        front = cast(list[bytes], client.redis.lrange(constants.GENERATE_QUEUE, -1000, -1))
        element = next(e for e in front if lost in e)
        client.redis.lrem(constants.GENERATE_QUEUE, 1, cast(Any, element))
        rows.append((n, "backlog, one lost", *timed_sweep(client)))
        assert client.store.get(lost.decode()).status is JobStatus.QUEUED
    client.redis.flushdb()

    print(f"{'backlog':>8}  {'state':<20} {'sweep ms':>9} {'LRANGE':>7} {'Redis ms':>9} {'resent':>6}")
    for n, state, wall, calls, busy, resent in rows:
        print(f"{n:>8}  {state:<20} {wall:>9.1f} {calls:>7} {busy:>9.1f} {resent:>6}")
    print(json.dumps({f"{n}/{state}": round(wall, 1) for n, state, wall, *_ in rows}))


if __name__ == "__main__":
    main()
