"""Dead-letter records in Redis, and the Celery app wiring that routes poison messages to them."""

from __future__ import annotations

import json

import pytest
import redis

from producer.core import constants, records
from producer.core.settings import RedisSettings
from worker import deadletter
from worker.app import create_app
from worker.settings import CelerySettings, WorkerSettings


def test_a_dead_letter_keeps_the_reason_and_a_truncated_raw_body(redis_client: redis.Redis) -> None:
    body = b"\xff" + b"x" * 10_000
    entry = deadletter.record(redis_client, "not a kombu message", body, stage="transport", queue="generate")
    (stored,) = redis_client.lrange(constants.DEADLETTER_KEY, 0, -1)
    assert json.loads(stored) == json.loads(entry.model_dump_json())
    assert entry.body.startswith("\\xffxxx") and len(entry.body) == deadletter.MAX_BODY_CHARS
    assert entry.body_size == len(body) and entry.reason == "not a kombu message" and entry.queue == "generate"


def test_the_list_keeps_only_the_newest_entries(redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deadletter, "MAX_ENTRIES", 3)
    for i in range(5):
        deadletter.record(redis_client, f"reason {i}", b"{}", stage="task")
    reasons = [json.loads(raw)["reason"] for raw in redis_client.lrange(constants.DEADLETTER_KEY, 0, -1)]
    assert reasons == ["reason 4", "reason 3", "reason 2"]


def test_recording_without_redis_logs_instead_of_raising(caplog: pytest.LogCaptureFixture) -> None:
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    entry = deadletter.record(unreachable, "no job record", b"[]", stage="task")
    assert entry.reason == "no job record"
    assert "could not store the dead letter" in caplog.text and "no job record" in caplog.text


@pytest.mark.parametrize(
    ("url", "guarded"),
    [("redis://127.0.0.1:6379/0", True), ("rediss://cache.example:6380/0", False)],
)
def test_the_app_serves_queues_in_order_and_dead_letters_poison(url: str, guarded: bool) -> None:
    app = create_app(WorkerSettings(redis=RedisSettings(url=url)))
    assert app.conf.broker_transport_options["queue_order_strategy"] == "priority"
    assert app.conf.worker_consumer == "worker.deadletter:Consumer"
    transport = app.connection_for_read().transport_cls
    assert (transport == "worker.deadletter:Transport") is guarded


def test_the_lock_on_restoring_dead_workers_messages_lapses_within_three_restore_intervals(redis_url: str) -> None:
    # kombu holds it for 300 s by default: a worker killed while restoring stopped every restore for 5 minutes.
    settings = WorkerSettings(redis=RedisSettings(url=redis_url), celery=CelerySettings(unacked_restore_interval_s=2))
    with create_app(settings).connection_for_read() as connection:
        assert connection.default_channel.unacked_mutex_expire == 6  # the option kombu's channel reads


def test_dead_letters_of_unreadable_job_records_are_truncated_and_capped_like_the_workers() -> None:
    # producer.core.records writes stage "record" entries itself (the producer never imports the worker).
    assert (records.DEADLETTER_BODY_CHARS, records.DEADLETTER_MAX_ENTRIES) == (
        deadletter.MAX_BODY_CHARS,
        deadletter.MAX_ENTRIES,
    )
