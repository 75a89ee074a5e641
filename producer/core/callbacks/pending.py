"""Callback messages sent and not started yet, kept in Redis so the sweeper can send again one the broker lost."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import cast

import redis

from producer.core import constants
from producer.core.messages import JobMessage


class PendingCallbacks:
    """Callback messages sent and not started yet, kept so that the sweeper can send again one the broker lost.

    >>> pending = PendingCallbacks(client)
    >>> pending.send(callback_task(event), send_task, countdown=0)  # kept, then sent
    >>> pending.started(task_id)  # the delivery task, first thing: from now on kombu's unacked hash keeps it
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def send(self, message: JobMessage, send: Callable[[JobMessage, float], None], countdown: float = 0.0) -> None:
        """Keep ``message`` (due in ``countdown`` s), then ``send(message, countdown)``; forgotten if that raises."""
        pipe = self.redis.pipeline()
        pipe.zadd(constants.CALLBACKS_PENDING_KEY, {message.task_id: time.time() + countdown})
        pipe.hset(constants.CALLBACKS_PENDING_ARGS_KEY, message.task_id, json.dumps(message.args))
        pipe.execute()
        try:
            send(message, countdown)
        except Exception:
            self.started(message.task_id)
            raise

    def started(self, task_id: str) -> None:
        """Forget a message a worker has started (or one that could not be sent)."""
        pipe = self.redis.pipeline()
        pipe.zrem(constants.CALLBACKS_PENDING_KEY, task_id)
        pipe.hdel(constants.CALLBACKS_PENDING_ARGS_KEY, task_id)
        pipe.hdel(constants.CALLBACKS_RESENT_KEY, task_id)
        pipe.execute()

    def count_resend(self, task_id: str) -> int:
        """Count one more time the sweeper sent the message again; returns the count."""
        return int(self.redis.hincrby(constants.CALLBACKS_RESENT_KEY, task_id, 1))

    def due_before(self, ceiling: float, limit: int) -> list[str]:
        """Task ids of kept messages due before ``ceiling`` (Unix s), the earliest first, at most ``limit``."""
        raw = cast(list[bytes], self.redis.zrangebyscore(constants.CALLBACKS_PENDING_KEY, "-inf", ceiling, 0, limit))
        return [r.decode() for r in raw]

    def message(self, task_id: str) -> JobMessage | None:
        """The kept message with ``task_id``, or None once started."""
        raw = self.redis.hget(constants.CALLBACKS_PENDING_ARGS_KEY, task_id)
        if raw is None:
            return None
        return JobMessage(constants.CALLBACK_TASK, constants.CALLBACK_QUEUE, json.loads(raw), task_id)
