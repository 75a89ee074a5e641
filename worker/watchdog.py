"""The second line of recovery: a running shard whose worker is gone and whose message is nowhere in the broker is
sent again.

The first line is the task: a shard that cannot reach Redis is neither failed nor acknowledged (``worker.tasks``
hands its message back once Redis answers), and a killed worker's message stays in kombu's ``unacked`` hash until
kombu restores it. What is left: a shard whose message vanished after it was delivered — a hand-back that found its
message gone (Redis lost its ``unacked`` entry in a crash), a task that raised past genq and was acknowledged, a
broker emptied by hand — while its job stays ``running``. The sweeper (``worker.sweeper``) sends again only shards
that were never delivered; these were.

Heartbeats. Each worker process lists the shards it runs in ``RUNNING_SHARDS_KEY`` (a sorted set: task id, score =
its last heartbeat), one pipelined write per ``GENQ_SWEEPER__HEARTBEAT_S`` from a :class:`Heart` thread, whatever the
number of shards, and drops a shard at the next beat after it ends. A shard that ends within one beat is never
written: small jobs cost no round trip (they are covered by the first line and kombu's restore). A shard handed back
after an outage is written at once (:meth:`Heart.watch`), so that it is watched until a worker runs it again.

The :class:`Watchdog` is the sweeper plus, in the same turn (one worker of the fleet per interval), a look at the
shards whose heartbeat is older than ``GENQ_SWEEPER__ORPHANED_AFTER_S``: one whose job ended, or that stored its
outputs while other shards run, leaves the set; one still owed by an active job (or the one that must write a
manifest every shard is stored for) whose message is neither in ``unacked`` nor on its queue, twice
``GENQ_SWEEPER__CONFIRM_S`` apart, is rebuilt from the job record and sent again. A rerun rewrites identical objects
and records its outputs once.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

import redis

from producer.contract import JobStatus
from producer.core import constants
from producer.core.messages import JobMessage, job_messages, queue_for
from producer.core.records import as_text
from producer.core.store import JobStore
from producer.errors import JobNotFound
from worker import telemetry
from worker.outage import OUTAGES
from worker.sweeper import Stranded, StrandedCallback, Sweeper, task_ids_in

log = logging.getLogger("genq.watchdog")

_CHUNK = 500  # unacked entries per HSCAN


class Heart:
    """Heartbeats of the shards one worker process runs (:meth:`beating`), written every ``beat_s`` by one thread."""

    def __init__(self, client: redis.Redis, beat_s: float, clock: Callable[[], float] = time.time) -> None:
        self.redis = client
        self.beat_s = beat_s
        self.clock = clock
        self._running: Counter[str] = Counter()  # task id -> shards with it running in this process (a duplicate)
        self._listed: set[str] = set()  # written to the set, to be dropped when they end
        self._ended: set[str] = set()  # listed and ended since the last beat
        self._lock = threading.Lock()  # guards the three above
        self._writing = threading.Lock()  # a beat and a watch write in turn: a watch is never undone by a late beat
        self._thread: threading.Thread | None = None

    @contextmanager
    def beating(self, task_id: str) -> Iterator[None]:
        """List ``task_id`` (``<job id>.<shard>``) as running in this process while the block runs."""
        with self._lock:
            self._running[task_id] += 1
            self._ended.discard(task_id)
            if self._thread is None or not self._thread.is_alive():  # none yet, or this is a forked child
                self._thread = threading.Thread(target=self._run, name="genq-heartbeat", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._running[task_id] -= 1
                if self._running[task_id] <= 0:
                    del self._running[task_id]
                    if task_id in self._listed:
                        self._ended.add(task_id)

    def watch(self, task_id: str) -> None:
        """List ``task_id`` now, beaten now: a shard handed back to its queue stays watched until a run of it ends
        (here: dropped at the beat after; elsewhere: by the watchdog, once its job no longer owes it)."""
        with self._writing:
            with self._lock:
                self._ended.discard(task_id)
                self._listed.add(task_id)
            self.redis.zadd(constants.RUNNING_SHARDS_KEY, {task_id: self.clock()})

    def beat(self) -> None:
        """One heartbeat: every running shard's score is now; shards that ended since the last beat leave the set."""
        with self._writing:
            with self._lock:
                running = list(self._running)
                ended = list(self._ended)
            if not running and not ended:
                return
            pipe = self.redis.pipeline(transaction=False)
            if running:
                pipe.zadd(constants.RUNNING_SHARDS_KEY, dict.fromkeys(running, self.clock()))
            if ended:
                pipe.zrem(constants.RUNNING_SHARDS_KEY, *ended)
            pipe.execute()
            with self._lock:
                self._listed.update(running)
                self._listed.difference_update(ended)
                self._ended.difference_update(ended)
                self._ended.update(t for t in running if t not in self._running)  # ended while this beat was written

    def _run(self) -> None:
        while True:
            time.sleep(self.beat_s)
            try:
                self.beat()
            except OUTAGES as exc:  # the next beat writes the same again
                log.debug("heartbeat not written (%s)", exc)
            except Exception:  # a bug here must not stop the heartbeats
                log.exception("heartbeat failed")


@functools.cache
def heart_for(client: redis.Redis, beat_s: float) -> Heart:
    """The heart of one Redis client (one per worker process: its runtime's)."""
    return Heart(client, beat_s)


class Watchdog(Sweeper):
    """The sweeper (lost messages of queued jobs and callback events), and in the same turn the look at running
    shards whose heartbeat stopped (module docstring); :meth:`sweep` once, or :meth:`start` a thread.

    >>> watchdog = Watchdog(client, store, send, settings.sweeper)
    >>> watchdog.sweep()  # queued shards, callback messages and running shards sent again
    [Stranded(job_id='9f...', shard=3, queue='generate')]
    """

    def sweep(self) -> list[Stranded | StrandedCallback]:
        """The sweeper's sweep, and a look at running shards whose heartbeat stopped: those whose message is
        missing in two looks ``confirm_s`` apart are sent again (the two sweeps share one wait)."""
        suspects = self._orphans()
        looked = time.monotonic()
        sent = super().sweep()
        if suspects:
            self.sleep(max(0.0, self.settings.confirm_s - (time.monotonic() - looked)))
            # Look again at the suspects only: those whose worker beat meanwhile, that stored their outputs, or whose
            # message was moving between unacked and the queue drop out.
            again = set(self._orphans({s.task_id for s in suspects}))
            sent += [s for s in suspects if s in again and self._send_again(s)]
        return sent

    def _orphans(self, only: set[str] | None = None) -> list[Stranded]:
        """Shards listed as running whose heartbeat is older than ``orphaned_after_s``, still owed by an active job,
        whose message is nowhere in the broker; drops from the set those that ended."""
        ceiling = self.clock() - self.settings.orphaned_after_s
        raw = cast(
            list[bytes],
            self.redis.zrangebyscore(
                constants.RUNNING_SHARDS_KEY, "-inf", ceiling, start=0, num=self.settings.max_jobs
            ),
        )
        listed = [as_text(t) for t in raw if only is None or as_text(t) in only]
        if not listed:
            return []
        owed, done = self._owed(listed)
        if done:
            self.redis.zrem(constants.RUNNING_SHARDS_KEY, *done)
        return self._absent(owed)

    def _owed(self, task_ids: list[str]) -> tuple[list[Stranded], list[str]]:
        """Of ``task_ids``, the shards their job still needs run (or its manifest written), and the ids that can go:
        the job ended or has no record, the shard stored its outputs while others run, the id is not a shard's."""
        shards: list[tuple[str, str, int]] = []
        done: list[str] = []
        for task_id in task_ids:
            job_id, _, digits = task_id.rpartition(".")
            if job_id and digits.isdigit():
                shards.append((task_id, job_id, int(digits)))
            else:
                done.append(task_id)
        # The job record's fields (producer.core.store): its status, shard count, shards stored, and this shard's
        # stored outputs; one pipelined round trip for all.
        pipe = self.redis.pipeline(transaction=False)
        for _task_id, job_id, index in shards:
            pipe.hmget(JobStore.key(job_id), ["status", "shards", "shards_done"])
            pipe.hexists(JobStore.key(job_id), f"shard:{index}")
        replies = pipe.execute()
        owed: list[Stranded] = []
        queues: dict[str, str | None] = {}
        for k, (task_id, job_id, index) in enumerate(shards):
            (status, count, stored), recorded = replies[2 * k], replies[2 * k + 1]
            if not _active(status):  # ended, expired, or a record this worker cannot read
                done.append(task_id)
                continue
            if recorded and int(stored or 0) < int(count or 1):  # stored; the job's other shards are still owed
                done.append(task_id)
                continue
            if job_id not in queues:
                queues[job_id] = self._queue_of(job_id)
            queue = queues[job_id]
            if queue is None:
                done.append(task_id)
                continue
            owed.append(Stranded(job_id, index, queue))
        return owed, done

    def _queue_of(self, job_id: str) -> str | None:
        try:
            return queue_for(self.store.spec(job_id))
        except JobNotFound:
            return None

    def _absent(self, owed: list[Stranded]) -> list[Stranded]:
        """Those of ``owed`` whose message is neither fetched by a worker (unacked) nor on its queue."""
        if not owed:
            return []
        # A delivered message lives in unacked and goes back to its queue when handed back or restored: read unacked
        # first, then the queue, so a message moving that way is seen at least once (the other way round, a worker
        # fetching it, the second look sees it).
        unseen = {s.task_id for s in owed}
        unseen -= task_ids_in(v for _, v in self.redis.hscan_iter(constants.KOMBU_UNACKED_KEY, count=_CHUNK))
        by_queue: dict[str, set[str]] = {}
        for s in owed:
            if s.task_id in unseen:
                by_queue.setdefault(s.queue, set()).add(s.task_id)
        missing: set[str] = set()
        for queue, wanted in by_queue.items():
            missing |= self._not_on_queue(queue, wanted)
        return [s for s in owed if s.task_id in missing]

    def _send_again(self, orphan: Stranded) -> bool:
        """Rebuild the shard's message from the job record and send it; False when that is no longer possible."""
        message = self._rebuild(orphan)
        if message is None:  # logged; looking again at each turn would not change that
            self.redis.zrem(constants.RUNNING_SHARDS_KEY, orphan.task_id)
            return False
        self.send(message)
        # Watched again from now: looked at once more only if this message is lost too.
        self.redis.zadd(constants.RUNNING_SHARDS_KEY, {orphan.task_id: self.clock()})
        telemetry.MESSAGES_RESENT.labels(orphan.queue).inc()
        log.warning(
            "job %s: shard %d was running on a worker that is gone (no heartbeat for %g s) and its message is "
            "nowhere in the broker; sent again to %s",
            orphan.job_id,
            orphan.shard,
            self.settings.orphaned_after_s,
            orphan.queue,
        )
        return True

    def _rebuild(self, orphan: Stranded) -> JobMessage | None:
        try:
            job = self.store.spec(orphan.job_id)
        except JobNotFound:
            return None
        record = self.store.undelivered([orphan.job_id])[orphan.job_id]
        if record is None:
            return None
        shard_size = record.shard_size
        if shard_size is None:  # a record from before shard sizes were recorded: only a one-shard job is rebuilt
            if record.shards != 1:
                log.error("job %s: shard %d orphaned, but its record lacks shard_size", orphan.job_id, orphan.shard)
                return None
            shard_size = job.total_images
        message = next((m for m in job_messages(job, shard_size) if m.task_id == orphan.task_id), None)
        if message is None or message.queue != orphan.queue:
            log.error("job %s: orphaned shard %d does not match its record", orphan.job_id, orphan.shard)
            return None
        return message


def _active(status: bytes | None) -> bool:
    if status is None:
        return False
    try:
        return not JobStatus(as_text(status)).is_terminal()
    except ValueError:
        return False
