"""When a failed job runs again: a :class:`~producer.errors.Retryable` failure is retried later, with exponential
backoff, a bounded number of times; anything else fails the job now.

Pure: the error, the retries made so far and the policy in, a delay (or None) out — like dramatiq's
``common.compute_backoff``. The task turns a delay into a Celery retry (:class:`RetryLater`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from producer.errors import Retryable


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how late a job that failed with a transient fault runs again."""

    retries: int = 3  # runs after the first; 0: fail at once
    backoff_s: float = 15.0  # before the first retry; doubled for each further one
    max_backoff_s: float = 300.0
    jitter: float = 0.1  # each delay scaled by a random factor in 1 ± jitter, so a fleet's retries spread out


class RetryLater(Exception):
    """Raised by the job runner, caught by the task: send the message again after ``delay_s`` seconds."""

    def __init__(self, delay_s: float, cause: BaseException) -> None:
        super().__init__(f"retry in {delay_s:.1f} s: {type(cause).__name__}: {cause}")
        self.delay_s = delay_s
        self.cause = cause


def compute_backoff(retries_done: int, policy: RetryPolicy, rand: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``retries_done + 1``: ``backoff_s * 2**retries_done``, capped, jittered."""
    delay = min(policy.max_backoff_s, policy.backoff_s * 2.0**retries_done)
    factor = 1.0 + (rand or random).uniform(-policy.jitter, policy.jitter)
    return max(0.0, delay * factor)


def retry_delay(
    exc: BaseException, retries_done: int, policy: RetryPolicy, rand: random.Random | None = None
) -> float | None:
    """The delay before running a job again after ``exc``, or None when it must fail now.

    Args:
        exc: what the run raised.
        retries_done: how many times this message was already retried (Celery's ``request.retries``).
        policy: the worker's retry settings.
        rand: a seeded generator for tests; the module's by default.

    Returns:
        None for a failure that is not :class:`~producer.errors.Retryable` (a :class:`~producer.errors.Permanent`
        one, or any other exception) and once ``policy.retries`` retries were made; else the backoff.
    """
    if not isinstance(exc, Retryable) or retries_done >= policy.retries:
        return None
    return compute_backoff(retries_done, policy, rand)
