"""Send again the messages the broker lost: a queued job's, or a callback event's, that is nowhere in Redis.

kombu's Redis transport takes a message off its queue with BRPOP and only then records it as unacked, in a second
round trip (celery#7950 shows the commands). A worker killed between the two — SIGKILL, OOM, a spot node taken back —
loses that message: the job stays ``queued`` forever with nothing left to run it. So does a client killed between
recording a job and sending its messages. kombu restores only what reached its unacked hash.

Every worker runs a :class:`Sweeper` thread; one worker per interval sweeps (a lock in Redis). It reads each queue's
index of queued jobs (``QUEUED_JOBS_KEY``, written by ``JobStore.create``) for jobs recorded more than
``stranded_after_s`` ago, and the job records for their shards that no task has started. It looks for those
shards' messages (stable task ids, :func:`producer.core.messages.task_id`) on the queue, front first, and in kombu's
unacked hash; a message found in neither place, twice, ``confirm_s`` apart, is rebuilt from the job record and sent
again. A job leaves the index in the transition that ends it (``JobStore``); the sweep drops those it finds expired
or with every shard delivered. Callback messages have no record to rebuild them from: their senders keep each in
``PendingCallbacks`` until a worker starts it, and one kept past its due time by ``stranded_after_s`` and missing
twice is sent again as it was kept.

Costs: nothing while no job waits longer than ``stranded_after_s``; during a backlog, a read of the queue's front
until every waiting shard is found (the oldest are at the front); a whole queue and the unacked hash only while a
message is missing. A message counted missing while in flight (a worker stalled for ``confirm_s`` between the two
round trips) is sent twice: the shard then runs twice with the same seeds, the second run is refused once the first
recorded its outputs, or both store the same bytes.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar, cast

import redis
from kombu.exceptions import OperationalError

from producer.core import constants
from producer.core.callbacks.pending import PendingCallbacks
from producer.core.messages import JobMessage, job_messages, task_id
from producer.core.records import as_text
from producer.core.store import JobStore
from producer.errors import JobNotFound, UnreadableRecord
from worker import telemetry
from worker.settings import SweeperSettings

log = logging.getLogger("genq.sweeper")

# Every queue a job's messages go to (callback messages are found through PendingCallbacks instead).
SWEPT_QUEUES = constants.JOB_QUEUES

# The task id in a kombu message as its Redis transport stores it (json.dumps: '"id": "<task id>"' in the headers);
# other keys ending in "id" (root_id, correlation_id) have no quote before "id", and argsrepr's quotes are escaped.
_TASK_ID = re.compile(rb'"id": "([^"]+)"')
_CHUNK = 500  # list elements per LRANGE
MAX_CALLBACK_RESENDS = 3  # then a kept callback message that keeps vanishing unstarted is forgotten


@dataclass(frozen=True)
class Stranded:
    """A shard of a job whose message is nowhere in the broker."""

    job_id: str
    shard: int
    queue: str

    @property
    def task_id(self) -> str:
        return task_id(self.job_id, self.shard)


@dataclass(frozen=True)
class StrandedCallback:
    """A callback message, kept in :class:`PendingCallbacks` past its due time, that is nowhere in the broker."""

    task_id: str
    queue: str = constants.CALLBACK_QUEUE


Lost = TypeVar("Lost", Stranded, StrandedCallback)


def task_ids_in(elements: Iterable[bytes | str]) -> set[str]:
    """The task ids of kombu messages (queue elements, or unacked entries that wrap the message in a list)."""
    found = set()
    for item in elements:
        element = item.encode() if isinstance(item, str) else item
        match = _TASK_ID.search(element)
        if match is not None:
            found.add(match.group(1).decode())
            continue
        try:  # another serializer's spacing: parse it
            message = json.loads(element)
            headers = (message[0] if isinstance(message, list) else message).get("headers") or {}
            found.add(str(headers["id"]))
        except (ValueError, LookupError, AttributeError, TypeError):
            continue  # not a kombu message: nothing of ours
    return found


class Sweeper:
    """Finds and resends lost messages; :meth:`sweep` once, or :meth:`start` a daemon thread that sweeps forever.

    >>> sweeper = Sweeper(client, store, send, settings.sweeper)
    >>> sweeper.sweep()  # the shards sent again
    [Stranded(job_id='9f...', shard=0, queue='generate')]
    """

    def __init__(
        self,
        client: redis.Redis,
        store: JobStore,
        send: Callable[[JobMessage], None],
        settings: SweeperSettings,
        *,
        queues: tuple[str, ...] = SWEPT_QUEUES,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.redis = client
        self.store = store
        self.send = send
        self.settings = settings
        self.pending = PendingCallbacks(client)
        self.queues = queues
        self.clock = clock
        self.sleep = sleep
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the loop -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Sweep every ``interval_s`` in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="genq-sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            try:
                if self.take_turn():
                    self.sweep()
            except redis.RedisError as exc:  # the next interval tries again
                log.warning("sweep for lost messages failed: %s", exc)
            except Exception:  # a bug here must not end the thread: the next sweep may still resend a lost job
                log.exception("sweep for lost messages failed")

    def take_turn(self) -> bool:
        """True when this worker sweeps now: the lock is held for one interval, so the fleet sweeps once per one."""
        lock_ms = int(self.settings.interval_s * 1000)
        return bool(self.redis.set(constants.SWEEPER_LOCK_KEY, self.token, nx=True, px=lock_ms))

    # -- one sweep ------------------------------------------------------------------------------------------

    def sweep(self) -> list[Stranded | StrandedCallback]:
        """Resend every job shard and callback message missing from the broker in two looks ``confirm_s`` apart;
        returns those sent."""
        shards = self._missing(self._waiting())
        callbacks = self._missing(self._callbacks_due())
        if not shards and not callbacks:
            return []
        self.sleep(self.settings.confirm_s)
        # Look again at the suspects only: those a task started since, or that were in flight, drop out.
        sent: list[Stranded | StrandedCallback] = []
        if shards:
            first = set(shards)
            still = self._missing(self._waiting({s.job_id for s in shards}))
            sent += [s for s in still if s in first and self._resend_one(s)]
        if callbacks:
            again = self._missing(self._callbacks_due({c.task_id for c in callbacks}))
            sent += [c for c in again if self._resend_callback_one(c)]
        return sent

    def _waiting(self, only: set[str] | None = None) -> list[Stranded]:
        """Shards of indexed jobs older than ``stranded_after_s`` that no task has started; drops finished jobs."""
        ceiling = self.clock() - self.settings.stranded_after_s
        waiting: list[Stranded] = []
        for queue in self.queues:
            index = constants.QUEUED_JOBS_KEY.format(queue=queue)
            raw = cast(
                list[bytes], self.redis.zrangebyscore(index, "-inf", ceiling, start=0, num=self.settings.max_jobs)
            )
            job_ids = [as_text(j) for j in raw if only is None or as_text(j) in only]
            if not job_ids:
                continue
            done = []
            for job_id, record in self.store.undelivered(job_ids).items():
                if record is None or not record.waiting:  # expired, ended, or every shard delivered: kombu's now
                    done.append(job_id)
                else:
                    waiting += [Stranded(job_id, k, queue) for k in record.waiting]
            if done:
                self.redis.zrem(index, *done)
        return waiting

    def _callbacks_due(self, only: set[str] | None = None) -> list[StrandedCallback]:
        """Callback messages kept past their due time by more than ``stranded_after_s``: not started yet."""
        ceiling = self.clock() - self.settings.stranded_after_s
        due = self.pending.due_before(ceiling, self.settings.max_jobs)
        return [StrandedCallback(t) for t in due if only is None or t in only]

    def _missing(self, waiting: list[Lost]) -> list[Lost]:
        """Those of ``waiting`` whose message is neither on its queue nor fetched by a worker (unacked)."""
        by_queue: dict[str, set[str]] = {}
        for s in waiting:
            by_queue.setdefault(s.queue, set()).add(s.task_id)
        unseen: set[str] = set()
        for queue, wanted in by_queue.items():
            unseen |= self._not_on_queue(queue, wanted)
        if unseen:
            # A message leaves its queue for a worker's unacked entry: read the queue first, then the entries, so a
            # message moving between the two is seen at least once (or is in flight, and the second look sees it).
            unseen -= task_ids_in(v for _, v in self.redis.hscan_iter(constants.KOMBU_UNACKED_KEY, count=_CHUNK))
        if unseen:
            # A message handed back moves the other way, from its unacked entry to its queue (one transaction): a bulk
            # shard waiting for a bulk slot gives way so to a higher-priority message (worker.jobs.messages_ahead).
            # Read the queue again for those still unseen; a message that moves this way between the reads is on it.
            unseen = {t for queue, wanted in by_queue.items() for t in self._not_on_queue(queue, wanted & unseen)}
        return [s for s in waiting if s.task_id in unseen]

    def _not_on_queue(self, queue: str, wanted: set[str]) -> set[str]:
        """``wanted`` task ids not on ``queue``: its front first (oldest jobs wait there), then all of it."""
        left = set(wanted)
        # kombu pushes on the left and pops on the right: the right end is the front. The front first, chunk by chunk,
        # twice as far as there are ids wanted (pops shift these indexes, so this pass may skip elements) ...
        end, reach = -1, max(2 * len(wanted), _CHUNK)
        while left and -end <= reach:
            chunk = self.redis.lrange(queue, end - _CHUNK + 1, end)
            left -= task_ids_in(chunk)
            if len(chunk) < _CHUNK:
                break
            end -= _CHUNK
        # ... then, for ids still missing, the whole list from the back: pops at the front shift nothing there, and
        # pushes at the back only make this pass read an element twice.
        start = 0
        while left:
            chunk = self.redis.lrange(queue, start, start + _CHUNK - 1)
            left -= task_ids_in(chunk)
            if len(chunk) < _CHUNK:
                break
            start += _CHUNK
        return left

    def _resend_one(self, stranded: Stranded) -> bool:
        """:meth:`_resend`, where one job's failure never stops the sweep for the others (Redis or the broker away
        still does: every other job would fail the same way).

        A job whose record cannot be read (the store dead-lettered it) leaves the queued index: nothing can rebuild
        its message, and reading it again every interval would change nothing."""
        try:
            return self._resend(stranded)
        except UnreadableRecord as exc:
            self.redis.zrem(constants.QUEUED_JOBS_KEY.format(queue=stranded.queue), stranded.job_id)
            log.error(
                "job %s: shard %d lost by the broker cannot be sent again: %s", stranded.job_id, stranded.shard, exc
            )
            return False
        except (redis.RedisError, OperationalError):  # Redis or the broker away: so for every job; the next sweep
            raise
        except Exception:  # a bug met on one job: the others are still owed their messages
            log.exception("job %s: shard %d lost by the broker could not be sent again", *_at(stranded))
            return False

    def _resend(self, stranded: Stranded) -> bool:
        """Rebuild the shard's message from the job record and send it; False when that is no longer possible.

        Raises:
            UnreadableRecord: the job's record cannot be read.
        """
        try:
            job = self.store.spec(stranded.job_id)
            record = self.store.undelivered([stranded.job_id])[stranded.job_id]
        except UnreadableRecord:
            raise
        except JobNotFound:
            return False
        if record is None or stranded.shard not in record.waiting:
            return False
        shard_size = record.shard_size
        if shard_size is None:  # a record from before shard sizes were recorded: only a one-shard job is rebuilt
            if record.shards != 1:
                log.error("job %s: shard %d lost by the broker, but its record lacks shard_size", *_at(stranded))
                return False
            shard_size = job.total_images
        message = next((m for m in job_messages(job, shard_size) if m.task_id == stranded.task_id), None)
        if message is None or message.queue != stranded.queue:
            log.error("job %s: shard %d lost by the broker does not match its record", *_at(stranded))
            return False
        self.send(message)
        telemetry.MESSAGES_RESENT.labels(stranded.queue).inc()
        log.warning(
            "job %s: the message of shard %d was nowhere in the broker (a worker died while fetching it, or a client "
            "while sending it); sent again to %s",
            stranded.job_id,
            stranded.shard,
            stranded.queue,
        )
        return True

    def _resend_callback_one(self, stranded: StrandedCallback) -> bool:
        """:meth:`_resend_callback`, where one message's failure never stops the sweep for the others."""
        try:
            return self._resend_callback(stranded)
        except (redis.RedisError, OperationalError):  # Redis or the broker away: so for every job; the next sweep
            raise
        except Exception:  # a bug met on one kept message: the others are still owed theirs
            log.exception("callback message %s lost by the broker could not be sent again", stranded.task_id)
            return False

    def _resend_callback(self, stranded: StrandedCallback) -> bool:
        """Send a kept callback message again, as it was sent; False when a worker started it meanwhile, or when it
        was sent again ``MAX_CALLBACK_RESENDS`` times already (then it is forgotten)."""
        message = self.pending.message(stranded.task_id)
        if message is None:
            return False
        event = message.args[0] if message.args else {}
        if self.pending.count_resend(stranded.task_id) > MAX_CALLBACK_RESENDS:
            # Run by something that does not forget it (a worker of an older version, a consumer that dead-letters
            # it): sending it again each interval would deliver the event each interval.
            self.pending.started(stranded.task_id)
            log.error(
                "job %s: callback message %s was sent again %d times and never started; forgotten",
                event.get("job_id"),
                stranded.task_id,
                MAX_CALLBACK_RESENDS,
            )
            return False
        self.send(message)
        telemetry.MESSAGES_RESENT.labels(stranded.queue).inc()
        log.warning(
            "job %s: the %s event's callback message %s was nowhere in the broker; sent again to %s",
            event.get("job_id"),
            (event.get("event") or {}).get("type"),
            stranded.task_id,
            stranded.queue,
        )
        return True


def _at(stranded: Stranded) -> tuple[str, int]:
    return stranded.job_id, stranded.shard
