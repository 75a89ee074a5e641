"""Per-image seeds depend on (job seed, index) only."""

from __future__ import annotations

import pytest

from producer.contract import MAX_SEED, plan_shards
from producer.core.seeds import image_seed, new_job_seed


def test_image_seed_is_a_pure_function_of_job_seed_and_index() -> None:
    assert image_seed(42, 3) == image_seed(42, 3)


def test_image_seed_derivation_is_pinned() -> None:
    # Changing the derivation would silently change every image a caller can reproduce from a manifest.
    assert image_seed(0, 0) == 6039517478391788172
    assert image_seed(42, 7) == 5909564942333381813


@pytest.mark.parametrize("job_seed", [0, 1, 42, 2**31 - 1, MAX_SEED])
def test_image_seeds_are_distinct_and_in_range(job_seed: int) -> None:
    seeds = [image_seed(job_seed, i) for i in range(2000)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s <= MAX_SEED for s in seeds)


def test_neighbouring_jobs_do_not_share_image_seeds() -> None:
    assert not {image_seed(1, i) for i in range(500)} & {image_seed(2, i) for i in range(500)}


def test_negative_index_is_refused() -> None:
    with pytest.raises(ValueError):
        image_seed(1, -1)


def test_new_job_seed_is_json_safe() -> None:
    assert all(0 <= new_job_seed() < 2**31 for _ in range(100))


@pytest.mark.parametrize(
    ("total", "size", "expected"),
    [
        (1, 1000, [(0, 1)]),
        (1000, 1000, [(0, 1000)]),
        (1001, 1000, [(0, 1000), (1000, 1001)]),
        (7, 3, [(0, 3), (3, 6), (6, 7)]),
    ],
)
def test_plan_shards_covers_every_index_once(total: int, size: int, expected: list[tuple[int, int]]) -> None:
    shards = plan_shards(total, size)
    assert [(s.start, s.stop) for s in shards] == expected
    assert [s.index for s in shards] == list(range(len(expected))) and {s.count for s in shards} == {len(expected)}


def test_plan_shards_refuses_empty_jobs() -> None:
    with pytest.raises(ValueError):
        plan_shards(0, 10)
