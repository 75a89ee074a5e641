"""Riding out a Redis outage in a worker: a job that meets one is neither failed nor acknowledged, the task hands its
message back once Redis answers, and what had to be written meanwhile (dead letters) is written then; callback
events are written in the same step as their transition, so none waits. Redis "goes away" behind a TCP proxy switched
off, or is a port nothing listens on."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.exceptions import Reject
from kombu import Connection
from redis.backoff import NoBackoff
from redis.retry import Retry
from tcp_proxy import TcpProxy, redis_through
from tiny_runtime import tiny_job, tiny_runtime

from producer.contract import Callback, GenerateJob, JobError, JobStatus, OutputRef, Shard
from producer.core import constants
from producer.core.callbacks.delivery import Deliverer
from producer.core.store import JobStore
from worker import deadletter, tasks
from worker.errors import StorageError
from worker.jobs import RedisUnavailable, execute_generate
from worker.outage import Backlog, wait_for_redis
from worker.reporting import RedisReporter
from worker.retries import RetryLater
from worker.runtime import Runtime
from worker.settings import CelerySettings, WorkerSettings
from worker.storage.local import LocalStorage


@pytest.fixture
def runtime(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[Runtime]:
    with tiny_runtime(
        redis_url,
        tmp_path,
        celery=CelerySettings(redis_wait_s=5.0),
    ) as runtime:
        yield runtime


def _job(job_id: str, count: int, callback: Callback | None = None) -> GenerateJob:
    return tiny_job(job_id, count, callback=callback)


class RedisGoesAway(RedisReporter):
    """Redis stops answering at the job's first progress write (after the first chunk is stored)."""

    def progress(self, job: GenerateJob, shard: Shard, done: int) -> None:
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


# -- the job runner ------------------------------------------------------------------------------------------------


def test_a_job_that_loses_redis_midway_is_left_running_not_failed(runtime: Runtime, redis_client: redis.Redis) -> None:
    job = _job("job-outage", 8)  # two chunks of 4
    runtime.store.create(job)

    with pytest.raises(RedisUnavailable) as down:
        execute_generate(job, runtime, RedisGoesAway(runtime.store, lambda message: None))

    assert isinstance(down.value.cause, redis.ConnectionError)
    view = runtime.store.get(job.job_id)
    assert view.status is JobStatus.RUNNING and view.error is None  # its message goes back; the rerun ends it
    assert redis_client.llen(constants.DEADLETTER_KEY) == 0

    assert execute_generate(job, runtime, RedisReporter(runtime.store))  # Redis is back
    assert runtime.store.get(job.job_id).status is JobStatus.SUCCEEDED


def test_a_failure_whose_record_meets_the_outage_is_handed_back_not_lost(runtime: Runtime) -> None:
    class Refused(LocalStorage):
        def put(self, key: str, data: bytes, content_type: str) -> None:
            raise StorageError(f"access denied to S3 put of {key!r}")

    class CannotRecordIt(RedisReporter):
        def failed(self, job: GenerateJob | Any, error: JobError, outputs: list[OutputRef]) -> None:
            raise redis.ConnectionError("Connection closed by server.")

    runtime.storage = Refused(runtime.settings.local_dir)
    job = _job("job-refused", 2)
    runtime.store.create(job)

    with pytest.raises(RedisUnavailable):  # not swallowed, not acked: the rerun fails the job with its reason
        execute_generate(job, runtime, CannotRecordIt(runtime.store, lambda message: None))
    assert runtime.store.get(job.job_id).status is JobStatus.RUNNING


def test_a_delivery_that_cannot_be_counted_is_handed_back(runtime: Runtime, redis_url: str) -> None:
    job = _job("job-uncounted", 1)
    runtime.store.create(job)
    runtime.store = JobStore(redis.Redis(port=1, retry=Retry(NoBackoff(), 0)), runtime.settings.job_ttl_s)

    with pytest.raises(RedisUnavailable):
        execute_generate(job, runtime, RedisReporter(runtime.store))


# -- the task: handing the message back ----------------------------------------------------------------------------


def test_the_task_hands_the_message_back_once_redis_answers_and_lists_the_shard(
    runtime: Runtime, redis_client: redis.Redis
) -> None:
    rejected = tasks._hand_back(runtime, "job-x.2", redis.ConnectionError("refused"))

    assert isinstance(rejected, Reject) and rejected.requeue  # kombu puts it back on its queue
    assert redis_client.zscore(constants.RUNNING_SHARDS_KEY, "job-x.2") is not None  # watched until it runs again


def test_a_task_whose_redis_never_comes_back_still_never_acks(caplog: pytest.LogCaptureFixture) -> None:
    settings = WorkerSettings(celery=CelerySettings(redis_wait_s=0.3))
    gone = SimpleNamespace(settings=settings, redis=redis.Redis(port=1, retry=Retry(NoBackoff(), 0)))
    started = time.monotonic()

    rejected = tasks._hand_back(gone, "job-y.0", redis.ConnectionError("refused"))  # type: ignore[arg-type]

    assert isinstance(rejected, Reject) and rejected.requeue  # its reject fails: the message stays in unacked
    assert time.monotonic() - started < 5
    assert "the message stays unacknowledged" in caplog.text


def test_a_retry_celery_cannot_publish_is_handed_back_instead_of_dropped(runtime: Runtime) -> None:
    class BrokerDown:
        """A bound task whose retry cannot be published: Celery then raises Reject(requeue=False)."""

        def retry(self, **options: Any) -> Exception:
            raise Reject(redis.ConnectionError("refused"), requeue=False)

    later = RetryLater(15.0, StorageError("s3 away"))

    raised = tasks._retry(BrokerDown(), later, runtime, "job-z.0")

    assert isinstance(raised, Reject) and raised.requeue


def test_waiting_for_redis_gives_up_after_its_timeout() -> None:
    assert not wait_for_redis(redis.Redis(port=1, retry=Retry(NoBackoff(), 0)), 0.3)


# -- what is written while Redis is away ---------------------------------------------------------------------------


def test_a_dead_letter_recorded_while_redis_is_away_is_written_once_it_answers(
    proxy: TcpProxy, redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deadletter, "BACKLOG", Backlog("test-dead-letters", limit=10, first_wait_s=0.05))
    client = redis_through(proxy, redis_url)
    proxy.down()

    deadletter.record(client, "no job record", b"[]", stage="task", message_id="job-9.0")

    assert redis_client.llen(constants.DEADLETTER_KEY) == 0 and len(deadletter.BACKLOG) == 1
    proxy.up()
    assert deadletter.BACKLOG.wait_written(10)
    (stored,) = redis_client.lrange(constants.DEADLETTER_KEY, 0, -1)
    assert json.loads(stored)["message_id"] == "job-9.0" and json.loads(stored)["reason"] == "no job record"


def test_a_dead_letter_the_full_backlog_cannot_keep_is_logged_whole(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deadletter, "BACKLOG", Backlog("test-full", limit=0))
    deadletter.record(redis.Redis(port=1, retry=Retry(NoBackoff(), 0)), "poison", b"\x00body", stage="transport")
    assert "wait already" in caplog.text and '"reason":"poison"' in caplog.text


def test_a_transition_that_meets_the_outage_announces_nothing_and_one_that_applied_has_its_event(
    proxy: TcpProxy, redis_url: str, redis_client: redis.Redis
) -> None:
    # The event is written in the transition's own Lua step (the outbox): there is no moment at which the job has
    # moved and its event is still to be sent, so nothing waits in the worker's memory for Redis to come back.
    store = JobStore(redis_client, 3600)
    job = _job("job-callback-1", 1, Callback(url="https://hooks.example/genq"))
    store.create(job)
    reporter = RedisReporter(JobStore(redis_through(proxy, redis_url), 3600))
    reporter.failed(job, JobError(type="StorageError", message="denied"), [])  # applied, with its event
    proxy.down()

    with pytest.raises(redis.ConnectionError):  # the task hands its message back; the next run announces it
        reporter.succeeded(job, [], 0, "jobs/job-callback-1/manifest.json")

    entries = redis_client.xrange(constants.CALLBACK_OUTBOX_KEY)
    assert [(e[b"job"], e[b"event"], e[b"seq"]) for _id, e in entries] == [(b"job-callback-1", b"failed", b"1")]
    assert store.get(job.job_id).status is JobStatus.FAILED


# -- the broker channel outlives a lost connection -----------------------------------------------------------------


def test_a_message_fetched_before_the_connection_was_lost_is_acked_through_its_old_channel(
    redis_client: redis.Redis, redis_url: str
) -> None:
    with Connection(redis_url, transport="worker.deadletter:Transport") as connection:
        connection.SimpleQueue("outage-test").put({"n": 1})
        channel = connection.channel()
        message = channel.basic_get("outage-test", no_ack=False)
        assert message is not None and redis_client.hlen(constants.KOMBU_UNACKED_KEY) == 1
        # What Celery's consumer does with a connection it lost: collect it (the transport forgets the broker), then
        # close it. Before, the close raised AttributeError ("Unrecoverable error": the worker stopped).
        channel._disconnect_pools()
        channel.connection.client = None

        message.ack()  # the task that ran through the outage acks when it ends
        channel.close()

    assert redis_client.hlen(constants.KOMBU_UNACKED_KEY) == 0 and redis_client.llen("outage-test") == 0


def test_a_callback_delivery_that_meets_the_outage_is_handed_back_not_acked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = WorkerSettings(celery=CelerySettings(redis_wait_s=0.3))
    gone = redis.Redis(port=1, retry=Retry(NoBackoff(), 0))
    monkeypatch.setattr(tasks, "_callbacks", (gone, Deliverer(settings.webhook)))
    monkeypatch.setattr(tasks, "settings_of", lambda app: settings)

    with pytest.raises(Reject) as rejected:
        tasks.deliver_callback.run({"job_id": "job-z", "url": "http://receiver.example/hook"})

    assert rejected.value.requeue  # back on its queue once Redis answers (or restored from unacked): not lost
    assert "the callback event goes back to its queue" in caplog.text
