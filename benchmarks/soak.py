"""Soak: thousands of small generate jobs through real `genq worker` processes while faults are injected, and what
every job, message, index entry and callback event became.

    python -m benchmarks.soak [--jobs 10000] [--workers 2] [--faults all|none|kill,redis,s3] [--seed 0]
                              [--baseline-jobs N] [--rounds 2] [--grace-s 300]

Starts its own redis-server (AOF, ``appendfsync everysec``, a free loopback port and a temporary folder: no other
Redis is touched), a moto S3 server in this process reached by the workers through a loopback TCP proxy, a callback
receiver (HTTP on loopback, answers 200, checks signatures) and ``--workers`` `genq worker` processes with their
defaults (threads pool, ``-c 16``, a callbacks worker beside each), each in a process group of its own, serving the
shipped fmnist-cgan (28 px). ``GENQ_CELERY__VISIBILITY_TIMEOUT_S`` is 60 (the default hour would keep a killed
worker's jobs that long); every other setting is the default.

Jobs, in the order queued (the same plan for a given --seed): 1 image, except every tenth (4 images); every tenth
has a callback (events queued, running, succeeded, failed, canceled); one in twenty is ``high`` and one in twenty
``low``; labels and seeds drawn from --seed. All are queued before the workers start (a backlog, as in issue 17), so
the run measures the workers, not this process's submit loop. Then the faults come, one after another, each when the
jobs ended reach the next of ``faults + 1`` equal steps and 5 s after the previous one was over (kinds interleaved,
``--rounds`` of each):

kill   SIGKILL of a whole worker's process group (the worker, its pool and its callbacks worker), always the first
       worker (the others live through the run, so their RSS at the end is the same process's); a new one is
       started at once;
redis  the redis-server stopped (``SHUTDOWN``, then SIGKILL on the next round, and so on) for ``--redis-down-s``,
       then started again on the same port and folder (it reloads its AOF);
s3     the proxy refuses and drops connections for ``--s3-down-s`` (inside ``GENQ_STORAGE_RETRY__WINDOW_S``).

A job is **lost** if it has not ended (its record gone, or still queued/running) once every fault is over, ``--grace-s``
have passed since the last one and no job ended in the last 30 s; **stuck** if it is still queued/running at the end;
**duplicated** if more of its images are stored than it asked for, or its view lists an output twice; **incomplete**
if it succeeded without every image (or its manifest) stored. A callback event is expected for each status a job
reached (queued; running if it started; its end); delivered if the receiver got it, signed. Before the faulted run,
the same plan without faults (``--baseline-jobs``, default the same number) on fresh workers, a fresh bucket and the
Redis flushed. jobs/s is the jobs over the time from the first job's start to the last one's end (job records); its
ratio to the baseline's is what the faults cost. Worker RSS (VmRSS of the last worker, never killed when there are two
or more) once 1 % of the jobs ended, and at the end. CPU per job is the workers' (every process of their groups,
killed ones up to their kill, new ones from their start), redis-server's and this process's (moto, the proxy, the
receiver, the polling) from the workers' start to the last job's end, divided by the jobs. Prints one table, the
faults, what went wrong (job ids) and one ``name=value`` line per figure. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import redis

from benchmarks.audit import Audit, Receiver, audit, ended_jobs
from benchmarks.faults import RedisServer, TcpProxy, WorkerProcess
from benchmarks.throughput import AWS, start_s3
from producer.client import Client
from producer.contract import GenerateRequest, JobStatus
from producer.core.settings import RedisSettings, S3Settings, WebhookSettings
from producer.settings import ClientSettings
from worker.catalog.registry import ZOO_DIR, ModelRegistry

# Pinned: docs/benchmarks.md's figures are of this network's widths (versions 1 and 2; 3 costs 3x per image).
MODEL = "fmnist-cgan@2"
KINDS = ("kill", "redis", "s3")
CALLBACK_EVENTS = ["queued", "running", "succeeded", "failed", "canceled"]
VISIBILITY_TIMEOUT_S = 60
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
QUIET_S = 30.0  # a run ends early only once no job has ended for this long
FAULT_GAP_S = 5.0  # the stack runs at least this long between two faults


@dataclass
class Fault:
    kind: str  # kill, redis, s3
    at_ended: int  # injected once this many jobs ended
    mode: str = ""  # redis: shutdown or kill
    started_s: float = 0.0  # since the workers were ready
    ended_s: float = 0.0  # the fault is over: the new worker ready, Redis answering, the proxy up again
    ended_jobs: int = 0  # jobs ended when it was injected

    def describe(self) -> str:
        what = {
            "kill": "SIGKILL worker 1's process group, start a new worker",
            "redis": f"redis-server {self.mode.upper()}, start again",
            "s3": "S3 proxy down, up again",
        }[self.kind]
        took = self.ended_s - self.started_s
        return f"{what}: at {self.ended_jobs} ended, t={self.started_s:.1f} s, over after {took:.1f} s"


@dataclass
class Outcome:
    """One run: its figures, its faults, and what its jobs became."""

    label: str
    jobs: int
    submitted: int = 0
    lost: list[str] = field(default_factory=list)  # not ended by the deadline (record gone, or queued/running)
    gone: list[str] = field(default_factory=list)  # records not found
    rss_start: list[float] = field(default_factory=list)  # MiB, per worker slot
    rss_end: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # seconds, by who used it
    submit_s: float = 0.0
    recovery_s: float = 0.0  # from the end of the last fault to the last job's end
    faults: list[Fault] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    audit: Audit = field(default_factory=Audit)

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.audit.run_s if self.audit.run_s else 0.0

    @property
    def cpu_s_per_job(self) -> float:
        return sum(self.cpu.values()) / self.jobs


def plan(n: int, seed: int, callback_url: str) -> list[GenerateRequest]:
    """The run's jobs in submit order: see the module's docstring."""
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        callback = {"url": callback_url, "events": CALLBACK_EVENTS} if i % 10 == 3 else None
        priority = "high" if i % 20 == 7 else "low" if i % 20 == 13 else "normal"
        request = {
            "model": MODEL,
            "label": rng.randrange(10),
            "count": 4 if i % 10 == 5 else 1,
            "seed": rng.randrange(1 << 31),
            "priority": priority,
            "callback": callback,
        }
        requests.append(GenerateRequest.model_validate(request))
    return requests


def schedule(kinds: list[str], rounds: int, jobs: int) -> list[Fault]:
    """``rounds`` of each kind, interleaved, at equal steps of jobs ended; Redis alternates SHUTDOWN and SIGKILL."""
    order = [kind for _ in range(rounds) for kind in kinds]
    faults = [Fault(kind, jobs * (k + 1) // (len(order) + 1)) for k, kind in enumerate(order)]
    for k, fault in enumerate(f for f in faults if f.kind == "redis"):
        fault.mode = "shutdown" if k % 2 == 0 else "kill"
    return faults


@dataclass
class Stack:
    """What both runs share: Redis, S3 behind the proxy, the receiver, where the worker logs go."""

    redis: RedisServer
    s3_endpoint: str
    proxy: TcpProxy
    receiver: Receiver
    logs: Path
    args: argparse.Namespace

    def worker_env(self, bucket: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "AWS_"))}
        env.update(AWS, AWS_ENDPOINT_URL=self.proxy.url, GENQ_REDIS__URL=self.redis.url, GENQ_S3__BUCKET=bucket)
        env.update(
            GENQ_MODEL_DIRS="[]",
            GENQ_WEBHOOK__ALLOW_HOSTS='["127.0.0.1"]',
            GENQ_CELERY__VISIBILITY_TIMEOUT_S=str(VISIBILITY_TIMEOUT_S),
        )
        return env


def progress(line: str) -> None:
    sys.stderr.write(f"\r{line[:150]:<150}")
    sys.stderr.flush()


def run(stack: Stack, label: str, jobs: int, faults: list[Fault]) -> Outcome:
    """Queue ``jobs`` jobs, start fresh workers, inject ``faults``, wait for the jobs to end; what they left behind."""
    args = stack.args
    out = Outcome(label, jobs)
    bucket = f"soak-{label}"
    boto3.client("s3", endpoint_url=stack.s3_endpoint).create_bucket(Bucket=bucket)
    redis.Redis.from_url(stack.redis.url).flushdb()
    env = stack.worker_env(bucket)
    settings = ClientSettings(
        redis=RedisSettings(url=stack.redis.url),
        s3=S3Settings(bucket=bucket),
        webhook=WebhookSettings(allow_hosts=["127.0.0.1"]),
    )
    client = Client(settings)
    # The catalogue the workers publish at start-up, published here first: the jobs are queued before any worker runs.
    ModelRegistry([ZOO_DIR]).publish(client.redis)
    started = time.monotonic()
    requests = plan(jobs, args.seed, stack.receiver.url)
    ids: list[str] = []
    for i, request in enumerate(requests):
        ids.append(client.submit(request).id)
        if i % 250 == 0:
            progress(f"{label}: queueing {i}/{jobs}")
    out.submitted = len(ids)
    out.submit_s = time.monotonic() - started

    def new_worker(slot: int) -> WorkerProcess:
        name = f"{label}-worker{slot + 1}-{len(out.logs) + 1}"
        worker = WorkerProcess(env, stack.logs / f"{name}.log", f"soak-{name}")
        out.logs.append(str(worker.log))
        return worker

    progress(f"{label}: starting {args.workers} workers")
    workers = [new_worker(slot) for slot in range(args.workers)]
    gone: list[WorkerProcess] = []
    for worker in workers:
        worker.wait_ready()

    def cpu_now() -> dict[str, float]:
        return {
            "workers": sum(w.cpu() for w in workers + gone),
            "redis": stack.redis.cpu(),
            "this process": time.process_time(),
        }

    cpu_start = cpu_now()
    t0 = time.monotonic()
    pending = set(ids)
    ended = 0
    last_exact = 0.0
    last_change = quiet_since = time.monotonic()  # quiet_since: the end of the last fault (or the workers' start)
    queue = list(faults)
    while pending:
        now = time.monotonic()
        try:
            counts = client.store.counts_by_status()
            ended_stats = sum(counts[s] for s in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED))
            if now - last_exact >= 5 or ended_stats >= jobs:
                before = len(pending)
                pending -= ended_jobs(client.redis, pending, out.gone)
                last_exact = now
                if len(pending) < before:
                    last_change = now
            ended = max(ended_stats, jobs - len(pending))
        except REDIS_DOWN:
            pass
        if not out.rss_start and ended >= jobs // 100:  # warmed up: first forward passes, pools, connections
            out.rss_start = [w.rss_mib() for w in workers]
        if queue and ended >= queue[0].at_ended and now - quiet_since >= FAULT_GAP_S:
            fault = queue.pop(0)
            fault.ended_jobs, fault.started_s = ended, now - t0
            progress(f"{label}: {ended}/{jobs} ended; fault: {fault.kind} {fault.mode}")
            inject(stack, fault, workers, gone, new_worker)
            fault.ended_s = time.monotonic() - t0
            out.faults.append(fault)
            quiet_since = last_change = time.monotonic()
            continue
        if not queue and now - quiet_since >= args.grace_s and now - last_change >= QUIET_S:
            break
        rate = ended / (now - t0) if now > t0 else 0.0
        done = len(faults) - len(queue)
        progress(f"{label}: {ended}/{jobs} ended, {rate:.1f} jobs/s, faults {done}/{len(faults)}, {now - t0:.0f} s")
        time.sleep(0.5)
    out.cpu = {k: v - cpu_start[k] for k, v in cpu_now().items()}
    out.lost = sorted(pending | set(out.gone))
    progress(f"{label}: {jobs - len(pending)}/{jobs} ended; waiting for callback events and queues to settle")
    out.audit = audit(client, ids, requests, stack.s3_endpoint, bucket, stack.receiver, args.settle_s)
    out.rss_end = [w.rss_mib() for w in workers]
    for worker in workers:
        worker.stop()
    last_fault = max((f.ended_s for f in out.faults), default=0.0)
    out.recovery_s = max(0.0, out.audit.run_s - last_fault)
    progress(f"{label}: done in {time.monotonic() - started:.0f} s")
    sys.stderr.write("\n")
    return out


def inject(
    stack: Stack,
    fault: Fault,
    workers: list[WorkerProcess],
    gone: list[WorkerProcess],
    new_worker: Callable[[int], WorkerProcess],
) -> None:
    """Inject ``fault`` and return once it is over: a new worker ready, Redis answering, the proxy up again."""
    if fault.kind == "kill":
        gone.append(workers[0])
        workers[0].kill()
        workers[0] = new_worker(0).wait_ready()
    elif fault.kind == "redis":
        (stack.redis.shutdown if fault.mode == "shutdown" else stack.redis.kill)()
        time.sleep(stack.args.redis_down_s)
        stack.redis.start()
    else:
        stack.proxy.down()
        time.sleep(stack.args.s3_down_s)
        stack.proxy.up()


def machine() -> str:
    names = [
        line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line
    ]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{platform.machine()}, {os.cpu_count()} cores ({names[0] if names else '?'}), load average {load}"


def figures(r: Outcome) -> list[tuple[str, str, str]]:
    """(row of the table, ``name=value`` name, value as printed) of one run."""
    a = r.audit
    return [
        ("jobs submitted", "jobs_submitted", str(r.submitted)),
        ("succeeded", "jobs_succeeded", str(a.succeeded)),
        ("failed", "jobs_failed", str(sum(a.failed.values()))),
        ("lost (not ended by the deadline)", "jobs_lost", str(len(r.lost))),
        ("stuck (queued/running at the end)", "jobs_stuck", str(len(a.stuck))),
        ("duplicated (objects or outputs)", "jobs_duplicated", str(len(a.duplicated))),
        ("succeeded without every object", "jobs_incomplete", str(len(a.incomplete))),
        ("run more than once (deliveries > 1)", "jobs_rerun", str(a.rerun)),
        ("queued-jobs index entries left", "queued_index_entries", str(len(a.index_entries))),
        ("messages left on queues", "messages_queued", str(a.queued_messages)),
        ("messages left unacked", "messages_unacked", str(a.unacked)),
        ("dead letters (messages)", "deadletters", str(a.deadletters)),
        ("callback events expected", "callback_events_expected", str(a.events["expected"])),
        ("  delivered", "callback_events_delivered", str(a.events["delivered"])),
        ("  dead-lettered", "callback_events_dead_lettered", str(a.events["dead_lettered"])),
        ("  neither", "callback_events_missing", str(a.events["missing"])),
        ("worker RSS at start (MiB, last worker)", "worker_rss_start_mib", f"{r.rss_start[-1]:.1f}"),
        ("worker RSS at end (MiB, last worker)", "worker_rss_end_mib", f"{r.rss_end[-1]:.1f}"),
        ("queueing the jobs (s)", "submit_s", f"{r.submit_s:.1f}"),
        ("first job started to last ended (s)", "run_s", f"{a.run_s:.1f}"),
        ("jobs/s", "jobs_per_s", f"{r.jobs_per_s:.2f}"),
        ("CPU s per job (workers, Redis, this process)", "cpu_s_per_job", f"{r.cpu_s_per_job:.4f}"),
    ]


def report(args: argparse.Namespace, base: Outcome | None, soak: Outcome, at_start: str) -> None:
    print(f"machine at start: {at_start}")
    print(f"machine at end:   {machine()}")
    print(
        f"stack: {args.workers} x `genq worker` (threads, -c 16, a callbacks worker beside each), {MODEL} 28 px; "
        f"redis-server (AOF everysec) and moto S3 behind a TCP proxy, on loopback; visibility timeout "
        f"{VISIBILITY_TIMEOUT_S} s, other settings default"
    )
    print(
        f"jobs: {soak.jobs} with faults, {base.jobs if base else 0} without; 1 image (every 10th: 4), every 10th with "
        f"a callback; seed {args.seed}; faults {args.faults} x {args.rounds}; grace {args.grace_s:g} s"
    )
    for k, fault in enumerate(soak.faults, 1):
        print(f"fault {k}: {fault.describe()}")
    print()
    runs = [r for r in (base, soak) if r is not None]
    print(f"{'figure':<46}" + "".join(f"{r.label:>12}" for r in runs))
    for rows in zip(*(figures(r) for r in runs), strict=True):
        print(f"{rows[0][0]:<46}" + "".join(f"{value:>12}" for _row, _name, value in rows))
    print()
    for r in runs:
        a = r.audit
        cpu = ", ".join(f"{k} {v:.1f} s" for k, v in r.cpu.items())
        rss = ", ".join(f"{a:.0f} -> {b:.0f}" for a, b in zip(r.rss_start, r.rss_end, strict=True))
        print(f"{r.label}: CPU {cpu}; worker RSS MiB {rss}; failed by type {dict(a.failed)}; events {a.events}")
        found = {
            "lost": r.lost,
            "record gone": sorted(set(r.gone + a.gone)),
            "stuck": a.stuck,
            "duplicated": a.duplicated,
        }
        found |= {"incomplete": a.incomplete, "failed": a.failed_ids, "index entry left": a.index_entries}
        for name, ids in found.items():
            if ids:
                print(f"{r.label}: {name}: {', '.join(ids[:20])}{' ...' if len(ids) > 20 else ''}")
        print(f"{r.label}: running shards listed {a.running_shards}, callbacks pending {a.callbacks_pending}")
        print(f"{r.label}: worker logs {' '.join(r.logs)}")
    print()
    for r, prefix in ((soak, ""), *(((base, "baseline_"),) if base else ())):
        for _row, name, value in figures(r):
            print(f"{prefix}{name}={value}")
    print(f"faults_injected={len(soak.faults)}")
    print(f"recovery_s={soak.recovery_s:.1f}")
    if base is not None:
        print(f"baseline_jobs={base.jobs}")
        print(f"jobs_per_s_ratio={soak.jobs_per_s / base.jobs_per_s:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs of the faulted run")
    parser.add_argument("--workers", type=int, default=2, help="`genq worker` processes")
    parser.add_argument("--faults", default="all", help="all, none, or a comma-separated list of kill, redis, s3")
    parser.add_argument("--rounds", type=int, default=2, help="faults of each kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-jobs", type=int, default=None, help="jobs of the no-fault run (default --jobs)")
    parser.add_argument("--redis-down-s", type=float, default=2.0, help="how long Redis stays down")
    parser.add_argument("--s3-down-s", type=float, default=10.0, help="how long the S3 proxy stays down")
    parser.add_argument("--grace-s", type=float, default=300.0, help="after the last fault, how long jobs may take")
    parser.add_argument("--settle-s", type=float, default=180.0, help="how long callback events may take after")
    args = parser.parse_args()
    kinds = [] if args.faults == "none" else list(KINDS) if args.faults == "all" else args.faults.split(",")
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"unknown faults {sorted(unknown)}: choose among {', '.join(KINDS)}, or all, or none")
    baseline_jobs = (0 if not kinds else args.jobs) if args.baseline_jobs is None else args.baseline_jobs
    at_start = machine()

    folder = Path(tempfile.mkdtemp(prefix="genq-soak-"))
    (folder / "redis").mkdir()
    server = RedisServer(folder / "redis").start()
    s3, endpoint = start_s3("soak")
    host, port = endpoint.rsplit(":", 1)
    proxy = TcpProxy(host.removeprefix("http://"), int(port))
    proxy.up()
    stack = Stack(server, endpoint, proxy, Receiver(), folder, args)
    try:
        base = run(stack, "baseline", baseline_jobs, []) if baseline_jobs else None
        soak = run(stack, "faults" if kinds else "no-faults", args.jobs, schedule(kinds, args.rounds, args.jobs))
    finally:
        stack.receiver.server.shutdown()
        proxy.down()
        s3.stop()
        server.kill()
    report(args, base, soak, at_start)


if __name__ == "__main__":
    main()
