"""The callback relay's CPU per event: the outbox entries of ``--jobs`` 1-image jobs (``running`` and ``succeeded``,
written by the job store's own transitions), relayed by a :class:`worker.relay.Relay` through the real first attempt
(``worker.tasks._attempt`` → ``run_delivery``: SSRF vet, sign, POST on the thread's reused client, ledger record)
to a loopback receiver that answers 200, then acknowledged.

    python -m benchmarks.relay_cpu [--jobs 500] [--rate 40] [--rounds 3] [--threads 16] [--redis URL]

The jobs are written by a process of their own at ``--rate`` jobs/s (the idle-machine callbacks benchmark runs about
45 jobs/s), so events trickle in as they do behind a generation worker; ``--rate 0`` writes them all first (a
backlog: the relay reads full batches). The receiver runs in a process of its own too
(``benchmarks.callbacks.receivers``): neither's CPU is counted. This process's CPU (``time.process_time``: every
thread, user and system) is measured from the relay's start until the writer is done and the outbox is empty, i.e.
every event attempted, recorded and acknowledged, idle waits included. Claims the Redis DB of ``--redis`` (flushed;
refused while a test run holds it: test runs take 13 first, so pass 15 beside one). Each round writes fresh jobs;
the first is a warm-up (connections, imports). Prints one ``name=value`` line per figure (medians over the rounds).
Nothing here is asserted. CPU time swells when other processes share the cores: compare two trees in alternate
runs. To see where the time goes (only threads holding the GIL: blocked reads are not CPU)::

    py-spy record --gil -f raw -o relay.txt -- python -m benchmarks.relay_cpu
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.process import BaseProcess

import redis

from benchmarks.callbacks import receivers
from benchmarks.uploads import claimed_db

EVENTS_PER_JOB = 2  # running, succeeded: what a 1-image job's worker writes to the outbox (queued is the client's)


def write_jobs(redis_url: str, url: str, jobs: int, prefix: str, rate: float = 0.0) -> None:
    """``jobs`` 1-image jobs with a callback to ``url``, each taken through start and success with ``announce``, as a
    worker does: two outbox entries per job; ``rate`` jobs/s (0: as fast as it goes)."""
    from producer.contract import Callback, GenerateJob, LabelCount, OutputRef
    from producer.core.store import JobStore

    store = JobStore(redis.Redis.from_url(redis_url), 3600)
    callback = Callback.model_validate({"url": url})
    started = time.monotonic()
    for i in range(jobs):
        if rate > 0:
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
        job_id = f"{prefix}-{i:05d}"
        job = GenerateJob(
            job_id=job_id,
            model="fmnist-cgan",
            model_name="fmnist-cgan",
            model_version="1",
            items=[LabelCount(index=7, name="sneaker", count=1)],
            seed=i,
            created_at=datetime.now(UTC),
            callback=callback,
        )
        store.create(job)
        store.start(job_id, 0, announce=True)
        if rate > 0:  # the job's events evenly spaced, as generation spaces them: the relay reads them one by one
            time.sleep(max(0.0, started + (i + 0.5) / rate - time.monotonic()))
        output = OutputRef(
            index=0,
            label="sneaker",
            label_index=7,
            seed=i,
            key=f"jobs/{job_id}/00000.png",
            sha256=f"{i:064x}",
            content_type="image/png",
        )
        store.mark_succeeded(job_id, [output], None, announce=True)  # a 1-image job stores no manifest object


@dataclass(frozen=True)
class Spent:
    """What a round cost this process: CPU seconds (all), of them in the kernel, context switches, wall seconds."""

    cpu_s: float
    sys_s: float
    switches: int
    wall_s: float


def relay_round(client: redis.Redis, threads: int, writer: BaseProcess | None, timeout_s: float = 300.0) -> Spent:
    """Relay what the outbox holds, and what ``writer`` (started here) writes, with the worker's own first attempt;
    what it cost this process until the writer is done and the outbox is empty."""
    from producer.core import constants
    from worker.relay import Relay
    from worker.tasks import _attempt, _callback_deps

    _redis, deliverer = _callback_deps()
    failures: list[str] = []
    relay = Relay(
        client,
        lambda message, settle: _attempt(message, client, deliverer, settle),
        lambda entry, reason: failures.append(reason),
        threads=threads,
        block_ms=100,
    )
    cpu, wall, usage = time.process_time(), time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    relay.start()
    if writer is not None:
        writer.start()
    try:
        deadline = time.monotonic() + timeout_s
        while writer is not None and writer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        while client.xlen(constants.CALLBACK_OUTBOX_KEY) and time.monotonic() < deadline:
            time.sleep(0.01)
        cpu, wall, after = (
            time.process_time() - cpu,
            time.perf_counter() - wall,
            resource.getrusage(resource.RUSAGE_SELF),
        )
    finally:
        relay.stop()
    if failures or client.xlen(constants.CALLBACK_OUTBOX_KEY):
        raise RuntimeError(f"not every event was relayed: {failures[:3]}")
    switches = after.ru_nvcsw + after.ru_nivcsw - usage.ru_nvcsw - usage.ru_nivcsw
    return Spent(cpu, after.ru_stime - usage.ru_stime, switches, wall)


def delivered(client: redis.Redis, prefix: str, jobs: int) -> tuple[int, int]:
    """(events recorded as delivered, records in all) over the round's jobs' delivery ledgers."""
    from producer.core import constants

    ok = total = 0
    for i in range(jobs):
        for raw in client.lrange(constants.JOB_EVENTS_KEY.format(job_id=f"{prefix}-{i:05d}"), 0, -1):
            total += 1
            ok += bool(json.loads(raw)["ok"])
    return ok, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (medians are reported)")
    parser.add_argument("--threads", type=int, default=16, help="the relay's threads (the worker's default: 16)")
    parser.add_argument(
        "--rate", type=float, default=40.0, help="jobs/s written while the relay runs (0: all written before it starts)"
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13", help="a Redis DB this benchmark may flush")
    args = parser.parse_args()

    with claimed_db(args.redis) as client, receivers() as urls:
        # Before worker.app is imported: the Celery app reads its settings from the environment once.
        os.environ.update(GENQ_REDIS__URL=args.redis, GENQ_WEBHOOK__ALLOW_HOSTS=json.dumps(["127.0.0.1"]))
        events = EVENTS_PER_JOB * args.jobs
        context = multiprocessing.get_context("spawn")
        spent: list[Spent] = []
        for round_ in range(args.rounds + 1):
            prefix = f"bench-relay-{round_}"
            writing = (args.redis, urls["ok"], args.jobs, prefix)
            writer = None
            if args.rate > 0:  # in a process of its own: its CPU is the generation worker's, not the relay's
                writer = context.Process(target=write_jobs, args=(*writing, args.rate), daemon=True)
            else:
                write_jobs(*writing)
            cost = relay_round(client, args.threads, writer)
            ok, records = delivered(client, prefix, args.jobs)
            if ok != events or records != events:
                raise RuntimeError(f"round {round_}: {ok} of {events} events delivered, {records} records")
            if round_ > 0:  # the first is a warm-up
                spent.append(cost)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    written = f"written at {args.rate:g} jobs/s" if args.rate > 0 else "written before the relay starts"
    print(f"{args.jobs} 1-image jobs per round ({written}), {events} events; relay threads {args.threads}")
    print(f"rounds: {args.rounds} after a warm-up (medians)")
    print("rounds, CPU ms per event: " + " / ".join(f"{1000 * c.cpu_s / events:.2f}" for c in spent))
    print()
    print(f"cpu_ms_per_event={statistics.median(1000 * c.cpu_s / events for c in spent):.2f}")
    print(f"sys_cpu_ms_per_event={statistics.median(1000 * c.sys_s / events for c in spent):.2f}")
    print(f"context_switches_per_event={statistics.median(c.switches / events for c in spent):.1f}")
    print(f"events_per_s={statistics.median(events / c.wall_s for c in spent):.0f}")


if __name__ == "__main__":
    main()
