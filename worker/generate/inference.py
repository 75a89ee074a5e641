"""The inference thread: one per worker process, merging sample requests from many job threads into forward passes.

Job threads (Celery's threads pool) call :meth:`InferenceEngine.submit` and get a future; the engine's single thread
groups pending requests with :class:`~worker.generate.batcher.Collector` and runs each due batch. Why a thread of
our own and not celery-batches: each job stays its own Celery message, acknowledged only after *its* outputs are stored,
and a failing forward pass can be bisected so one poisoned request fails alone (celery-batches acks a whole batch
even when it raised, and pins ``celery<5.7``).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from models.generator import ImageGenerator
from worker import telemetry
from worker.generate.batcher import Batch, BatchKey, Collector, Request

log = logging.getLogger("genq.inference")

ModelLoader = Callable[[str, str], ImageGenerator]


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the allocator's plain RuntimeError on the CPU."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


@dataclass
class _Result:
    request: Request
    future: Future[torch.Tensor]
    parts: dict[int, torch.Tensor] = field(default_factory=dict)  # start row -> images
    filled: int = 0


class InferenceEngine:
    """Dynamic batching over one model loader. Thread-safe :meth:`submit`; :meth:`close` drains and stops."""

    def __init__(
        self,
        load_model: ModelLoader,
        *,
        max_batch: int,
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.load_model = load_model
        self.collector = Collector(max_batch, max_wait_s)
        self.clock = clock
        self.batch_sizes: Counter[int] = Counter()  # forward passes by size, for metrics and benchmarks
        self._inbox: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._results: dict[int, _Result] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="genq-inference", daemon=True)
        self._thread.start()

    def submit(
        self, model_name: str, model_version: str, labels: Sequence[int], seeds: Sequence[int]
    ) -> Future[torch.Tensor]:
        """Queue samples; the future gives uint8 images (len(labels), C, H, W) in request order."""
        future: Future[torch.Tensor] = Future()
        request = Request(
            id=next(self._ids),
            key=BatchKey(model_name, model_version),
            labels=tuple(labels),
            seeds=tuple(seeds),
            arrived=self.clock(),
        )
        with self._lock:
            self._results[request.id] = _Result(request, future)
        self._inbox.put(request)
        return future

    def sample(self, model_name: str, model_version: str, labels: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        """Blocking form of :meth:`submit`."""
        return self.submit(model_name, model_version, labels, seeds).result()

    def close(self, timeout: float = 30.0) -> None:
        """Run what is pending, then stop the thread."""
        self._inbox.put(None)
        self._thread.join(timeout)

    # -- the inference thread ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        running = True
        while running:
            deadline = self.collector.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            try:
                item = self._inbox.get(timeout=timeout)
                while True:  # take everything already waiting: it may fill the batch
                    if item is None:
                        running = False
                    else:
                        self.collector.add(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            batches = self.collector.pop_due(self.clock()) if running else self.collector.drain()
            for batch in batches:
                try:
                    self._run(batch)
                except Exception as exc:  # never let the thread die: waiting jobs would hang forever
                    log.exception("inference thread error")
                    self._fail(batch, exc)

    def _run(self, batch: Batch) -> None:
        try:
            model = self.load_model(batch.key.model_name, batch.key.model_version)
        except Exception as exc:  # the model itself is broken: every request for it fails with the reason
            self._fail(batch, exc)
            return
        started = time.perf_counter()
        try:
            images = model.sample(list(batch.labels), list(batch.seeds))  # (B, C, H, W) uint8
        except Exception as exc:
            if is_out_of_memory(exc) and batch.size > 1:
                log.warning("out of memory at batch %d; halving", batch.size)
                for half in batch.split_rows(batch.size // 2):
                    self._run(half)
            elif len(batch.request_ids()) > 1:
                log.warning("forward pass of %d requests failed (%s); bisecting", len(batch.request_ids()), exc)
                for half in batch.split_requests():
                    self._run(half)
            else:
                self._fail(batch, exc)
            return
        self.batch_sizes[batch.size] += 1
        telemetry.BATCH_SIZE.observe(batch.size)
        telemetry.FORWARD_SECONDS.labels(batch.key.model_name).observe(time.perf_counter() - started)
        self._deliver(batch, images)

    def _deliver(self, batch: Batch, images: torch.Tensor) -> None:
        for s in batch.slices:
            with self._lock:
                result = self._results.get(s.request_id)
                if result is None:  # the request already failed in another batch
                    continue
                result.parts[s.start] = images[s.offset : s.offset + s.size]
                result.filled += s.size
                done = result.filled == result.request.size
                if done:
                    del self._results[s.request_id]
            if done:
                result.future.set_result(torch.cat([result.parts[k] for k in sorted(result.parts)]))

    def _fail(self, batch: Batch, exc: BaseException) -> None:
        for request_id in batch.request_ids():
            with self._lock:
                result = self._results.pop(request_id, None)
            if result is not None:
                result.future.set_exception(exc)
