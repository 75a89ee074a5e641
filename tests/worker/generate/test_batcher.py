"""Dynamic batching: grouping, order, splitting outputs back per request, the wait bound; and the engine's faults."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
import torch

from worker.generate.batcher import Batch, BatchKey, Collector, Request, Slice
from worker.generate.inference import InferenceEngine, is_out_of_memory

A, B = BatchKey("cgan", "1"), BatchKey("cvae", "1")


def req(id: int, key: BatchKey = A, n: int = 1, arrived: float = 0.0, label: int = 0) -> Request:
    return Request(id, key, tuple([label] * n), tuple(range(id * 100, id * 100 + n)), arrived)


def rows(batch: Batch) -> list[tuple[int, int]]:
    """(request id, row within the request) for every row of a batch."""
    return [(s.request_id, s.start + i) for s in batch.slices for i in range(s.size)]


def test_nothing_is_due_before_the_wait_or_a_full_batch() -> None:
    c = Collector(max_batch=4, max_wait_s=0.010)
    c.add(req(1, arrived=0.0))
    assert c.pop_due(now=0.009) == []
    assert c.next_deadline() == pytest.approx(0.010)
    (batch,) = c.pop_due(now=0.010)
    assert rows(batch) == [(1, 0)] and len(c) == 0 and c.next_deadline() is None


def test_a_full_batch_is_due_at_once_and_keeps_arrival_order() -> None:
    c = Collector(max_batch=4, max_wait_s=10)
    for i, n in enumerate([1, 2, 1, 3]):
        c.add(req(i, n=n, arrived=0.001 * i))
    (batch,) = c.pop_due(now=0.004)
    assert rows(batch) == [(0, 0), (1, 0), (1, 1), (2, 0)]
    assert batch.seeds == (0, 100, 101, 200)
    assert len(c) == 3  # request 3 waits for more company or its deadline
    (rest,) = c.pop_due(now=10.003)
    assert rows(rest) == [(3, 0), (3, 1), (3, 2)]


def test_keys_never_share_a_batch() -> None:
    c = Collector(max_batch=8, max_wait_s=0)
    c.add(req(1, A))
    c.add(req(2, B))
    c.add(req(3, A))
    batches = c.pop_due(now=0)
    assert [(b.key, [r for r, _ in rows(b)]) for b in batches] == [(A, [1, 3]), (B, [2])]


def test_labels_of_one_model_mix_in_one_batch() -> None:
    c = Collector(max_batch=2, max_wait_s=10)
    c.add(req(1, label=7))
    c.add(req(2, label=3))
    (batch,) = c.pop_due(now=0)
    assert batch.labels == (7, 3)


def test_a_request_larger_than_max_batch_spans_batches() -> None:
    c = Collector(max_batch=4, max_wait_s=0)
    c.add(req(1, n=10))
    batches = c.pop_due(now=0)
    assert [b.size for b in batches] == [4, 4, 2]
    assert [s for b in batches for s in b.slices] == [Slice(1, 0, 4, 0), Slice(1, 4, 8, 0), Slice(1, 8, 10, 0)]


@pytest.mark.parametrize("at", [1, 2, 3])
def test_halving_a_batch_keeps_every_row_exactly_once(at: int) -> None:
    c = Collector(max_batch=4, max_wait_s=0)
    c.add(req(1, n=3))
    c.add(req(2, n=1))
    (batch,) = c.pop_due(now=0)
    first, second = batch.split_rows(at)
    assert rows(first) + rows(second) == rows(batch)
    assert first.seeds + second.seeds == batch.seeds


def test_bisecting_by_request_separates_requests() -> None:
    c = Collector(max_batch=8, max_wait_s=0)
    for i in range(4):
        c.add(req(i, n=2))
    (batch,) = c.pop_due(now=0)
    left, right = batch.split_requests()
    assert left.request_ids() == [0, 1] and right.request_ids() == [2, 3]
    assert left.seeds == (0, 1, 100, 101) and right.seeds == (200, 201, 300, 301)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        Collector(max_batch=0, max_wait_s=0)
    with pytest.raises(ValueError):
        Request(1, A, (1, 2), (1,), 0.0)


class FakeModel:
    """Every pixel is the seed mod 256; label 99 is poison; batches above ``oom_above`` run out of memory."""

    def __init__(self, oom_above: int = 10**9) -> None:
        self.oom_above = oom_above
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def sample(self, labels: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        with self.lock:
            self.calls.append(len(labels))
        if len(labels) > self.oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if 99 in labels:
            raise ValueError("label index 99 out of range 0..9")
        return (
            torch.tensor(seeds, dtype=torch.int64).remainder(256).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
        )


def _engine(model: FakeModel, max_batch: int = 64, max_wait_s: float = 0.05) -> InferenceEngine:
    return InferenceEngine(lambda name, version: model, max_batch=max_batch, max_wait_s=max_wait_s)  # type: ignore[arg-type,return-value]


def test_engine_merges_concurrent_requests_and_returns_each_its_own_rows() -> None:
    model = FakeModel()
    engine = _engine(model, max_batch=8, max_wait_s=0.2)
    futures = [engine.submit("m", "1", [0, 0], [10 * i, 10 * i + 1]) for i in range(4)]
    results = [f.result(timeout=5) for f in futures]
    engine.close()
    assert model.calls == [8]  # one forward pass for four requests
    for i, images in enumerate(results):
        assert images[:, 0, 0, 0].tolist() == [10 * i, 10 * i + 1]


def test_a_poisoned_request_fails_alone_and_the_others_succeed() -> None:
    model = FakeModel()
    engine = _engine(model, max_batch=16, max_wait_s=0.2)
    good = [engine.submit("m", "1", [1], [i]) for i in range(5)]
    bad = engine.submit("m", "1", [99], [42])
    more = [engine.submit("m", "1", [2], [i]) for i in range(5, 8)]
    assert [f.result(timeout=5)[0, 0, 0, 0].item() for f in good + more] == list(range(8))
    with pytest.raises(ValueError, match="out of range"):
        bad.result(timeout=5)
    engine.close()


def test_out_of_memory_halves_the_batch_until_it_fits() -> None:
    model = FakeModel(oom_above=3)
    engine = _engine(model, max_batch=16, max_wait_s=0.1)
    futures = [engine.submit("m", "1", [0, 0, 0], [3 * i, 3 * i + 1, 3 * i + 2]) for i in range(4)]
    images = torch.cat([f.result(timeout=5) for f in futures])
    engine.close()
    assert images[:, 0, 0, 0].tolist() == list(range(12))
    assert model.calls == [12, 6, 3, 3, 6, 3, 3]  # halved depth-first until each pass fits
    assert engine.batch_sizes == {3: 4}


def test_a_model_that_fails_to_load_fails_its_requests() -> None:
    def broken(name: str, version: str) -> FakeModel:
        raise OSError("weights unreadable")

    engine = InferenceEngine(broken, max_batch=4, max_wait_s=0)  # type: ignore[arg-type]
    with pytest.raises(OSError, match="unreadable"):
        engine.sample("m", "1", [0], [0])
    engine.close()


def test_out_of_memory_is_recognised() -> None:
    assert is_out_of_memory(RuntimeError("CUDA out of memory."))
    assert is_out_of_memory(torch.OutOfMemoryError("boom"))
    assert not is_out_of_memory(ValueError("out of range"))
