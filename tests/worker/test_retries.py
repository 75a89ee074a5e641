"""The job retry policy, pure: which failures run again, after how long, how often."""

from __future__ import annotations

import random

import pytest

from producer.errors import InvalidJob, Permanent, Retryable
from worker.errors import IncompleteJob, StorageError, StorageUnavailable
from worker.retries import RetryPolicy, compute_backoff, retry_delay

NO_JITTER = RetryPolicy(retries=3, backoff_s=10.0, max_backoff_s=300.0, jitter=0.0)


@pytest.mark.parametrize(("retries_done", "expected"), [(0, 10.0), (1, 20.0), (2, 40.0), (5, 300.0), (12, 300.0)])
def test_backoff_doubles_from_the_base_up_to_the_cap(retries_done: int, expected: float) -> None:
    assert compute_backoff(retries_done, NO_JITTER) == expected


def test_jitter_spreads_delays_within_the_band() -> None:
    policy = RetryPolicy(backoff_s=100.0, max_backoff_s=1000.0, jitter=0.1)
    rand = random.Random(7)
    delays = [compute_backoff(0, policy, rand) for _ in range(200)]
    assert all(90.0 <= d <= 110.0 for d in delays)
    assert max(delays) - min(delays) > 10.0  # spread, not one value


@pytest.mark.parametrize(
    "exc",
    [StorageUnavailable("S3 put still failing"), Retryable("a transient fault")],
)
def test_a_retryable_failure_runs_again_until_the_retries_are_used_up(exc: Exception) -> None:
    assert [retry_delay(exc, n, NO_JITTER) for n in range(5)] == [10.0, 20.0, 40.0, None, None]


@pytest.mark.parametrize(
    "exc",
    [
        StorageError("bucket 'genq' does not exist"),
        IncompleteJob("index 3 missing"),
        InvalidJob("unknown label", field="label"),
        Permanent("no"),
        RuntimeError("a bug"),
        MemoryError(),
    ],
)
def test_any_other_failure_fails_the_job_at_once(exc: Exception) -> None:
    assert retry_delay(exc, 0, NO_JITTER) is None


def test_no_retries_fails_a_retryable_failure_at_once() -> None:
    assert retry_delay(StorageUnavailable("down"), 0, RetryPolicy(retries=0)) is None


def test_the_error_tree_puts_every_worker_error_under_one_branch() -> None:
    import worker.errors as errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    own = [c for c in classes if c.__module__ == errors.__name__]
    assert len(own) >= 6
    assert all(issubclass(c, Retryable) != issubclass(c, Permanent) for c in own), own


def test_a_retry_never_waits_longer_than_half_the_visibility_timeout() -> None:
    from worker.settings import CelerySettings

    policy = CelerySettings(visibility_timeout_s=60, retry_backoff_s=45, retry_backoff_max_s=300).retry_policy
    assert policy.backoff_s == 30.0 and policy.max_backoff_s == 30.0
