"""Dynamic batching, the pure part: which pending samples share a forward pass, and when it is due.

Requests with the same :class:`BatchKey` (model and version: same weights, resolution and sampling parameters) are
merged into batches of at most ``max_batch`` samples, in arrival order. A batch is due when it is full, or when
``max_wait_s`` has passed since the oldest pending sample of its key arrived. Labels and seeds ride per sample, so
one batch may mix labels. A request larger than ``max_batch`` spans several batches; :class:`Slice` says which part
of which request each row of a batch belongs to. No threads, clocks or devices here: time is an argument.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchKey:
    """What must be equal for samples to share a forward pass."""

    model_name: str
    model_version: str


@dataclass(frozen=True)
class Request:
    """Samples one caller wants from one model: ``labels[i]`` with ``seeds[i]``."""

    id: int
    key: BatchKey
    labels: tuple[int, ...]
    seeds: tuple[int, ...]
    arrived: float

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.seeds) or not self.labels:
            raise ValueError(f"request {self.id}: need as many seeds as labels, at least one")

    @property
    def size(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Slice:
    """Rows ``[start, stop)`` of request ``request_id`` occupy rows ``[offset, offset + stop - start)`` of a batch."""

    request_id: int
    start: int
    stop: int
    offset: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Batch:
    """One forward pass: its key, per-row labels and seeds, and which request each row belongs to."""

    key: BatchKey
    labels: tuple[int, ...]
    seeds: tuple[int, ...]
    slices: tuple[Slice, ...]

    @property
    def size(self) -> int:
        return len(self.labels)

    def request_ids(self) -> list[int]:
        return list(dict.fromkeys(s.request_id for s in self.slices))

    def split_rows(self, at: int) -> tuple[Batch, Batch]:
        """Two batches of rows ``[0, at)`` and ``[at, size)`` (used to halve a batch after out-of-memory)."""
        if not 0 < at < self.size:
            raise ValueError(f"cannot split a batch of {self.size} at {at}")
        first: list[Slice] = []
        second: list[Slice] = []
        for s in self.slices:
            end = s.offset + s.size
            if end <= at:
                first.append(s)
            elif s.offset >= at:
                second.append(Slice(s.request_id, s.start, s.stop, s.offset - at))
            else:  # the slice straddles the cut
                cut = s.start + (at - s.offset)
                first.append(Slice(s.request_id, s.start, cut, s.offset))
                second.append(Slice(s.request_id, cut, s.stop, 0))
        return (
            Batch(self.key, self.labels[:at], self.seeds[:at], tuple(first)),
            Batch(self.key, self.labels[at:], self.seeds[at:], tuple(second)),
        )

    def split_requests(self) -> tuple[Batch, Batch]:
        """Two batches holding the first and the second half of this batch's *requests* (bisecting a failure)."""
        ids = self.request_ids()
        if len(ids) < 2:
            raise ValueError("a batch of one request cannot be split by request")
        left = set(ids[: len(ids) // 2])
        return _subset(self, [s for s in self.slices if s.request_id in left]), _subset(
            self, [s for s in self.slices if s.request_id not in left]
        )


def _subset(batch: Batch, slices: list[Slice]) -> Batch:
    labels: list[int] = []
    seeds: list[int] = []
    out: list[Slice] = []
    for s in slices:
        out.append(Slice(s.request_id, s.start, s.stop, len(labels)))
        labels += batch.labels[s.offset : s.offset + s.size]
        seeds += batch.seeds[s.offset : s.offset + s.size]
    return Batch(batch.key, tuple(labels), tuple(seeds), tuple(out))


@dataclass
class _Pending:
    request: Request
    taken: int = 0  # rows already placed in earlier batches

    @property
    def remaining(self) -> int:
        return self.request.size - self.taken


class Collector:
    """Pending requests per key, and the rule that turns them into due batches."""

    def __init__(self, max_batch: int, max_wait_s: float) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._pending: OrderedDict[BatchKey, deque[_Pending]] = OrderedDict()

    def add(self, request: Request) -> None:
        self._pending.setdefault(request.key, deque()).append(_Pending(request))

    def __len__(self) -> int:
        """Pending samples, all keys together."""
        return sum(p.remaining for queue in self._pending.values() for p in queue)

    def next_deadline(self) -> float | None:
        """When the oldest pending sample's wait runs out (None when nothing is pending)."""
        oldest = [queue[0].request.arrived for queue in self._pending.values() if queue]
        return min(oldest) + self.max_wait_s if oldest else None

    def pop_due(self, now: float) -> list[Batch]:
        """Every batch due at ``now``: full ones first, then what waited ``max_wait_s``, keys in arrival order."""
        due: list[Batch] = []
        for key in list(self._pending):
            queue = self._pending[key]
            while sum(p.remaining for p in queue) >= self.max_batch:
                due.append(self._take(key, queue))
            if queue and now - queue[0].request.arrived >= self.max_wait_s:
                due.append(self._take(key, queue))
            if not queue:
                del self._pending[key]
        return due

    def drain(self) -> list[Batch]:
        """Everything pending, as batches (shutdown)."""
        return self.pop_due(float("inf"))

    def _take(self, key: BatchKey, queue: deque[_Pending]) -> Batch:
        labels: list[int] = []
        seeds: list[int] = []
        slices: list[Slice] = []
        while queue and len(labels) < self.max_batch:
            pending = queue[0]
            n = min(pending.remaining, self.max_batch - len(labels))
            start = pending.taken
            slices.append(Slice(pending.request.id, start, start + n, len(labels)))
            labels += pending.request.labels[start : start + n]
            seeds += pending.request.seeds[start : start + n]
            pending.taken += n
            if pending.remaining == 0:
                queue.popleft()
        return Batch(key, tuple(labels), tuple(seeds), tuple(slices))
