"""Submitting against a real Redis: the queued event is written with the job's record, and a job whose messages
cannot be sent ends failed and says so to its callback."""

from __future__ import annotations

import pytest
import redis
from api_server import publish_catalog
from stack import LOOPBACK_ALLOWED

from producer.client import Client
from producer.contract import GenerateRequest, JobStatus
from producer.core import constants
from producer.core.callbacks.outbox import Outbox
from producer.core.messages import JobMessage
from producer.core.settings import RedisSettings, WebhookSettings
from producer.settings import ClientSettings

HOOK = "http://127.0.0.1:9/hook"  # never called: nothing here relays


@pytest.fixture
def client(redis_client: redis.Redis, redis_url: str) -> Client:
    publish_catalog(redis_client)
    return Client(
        ClientSettings(redis=RedisSettings(url=redis_url), webhook=WebhookSettings(allow_hosts=LOOPBACK_ALLOWED))
    )


def _request(callback: dict[str, object]) -> GenerateRequest:
    return GenerateRequest.model_validate({"model": "fmnist-cgan", "label": "bag", "callback": callback})


def _outbox(client: Client) -> list[tuple[str, str, int]]:
    entries = Outbox(client.redis, "test").read(0, count=100)
    return [(e.job_id, e.event, e.seq) for e in entries]


def test_the_queued_event_is_written_with_the_record_and_no_callbacks_message_is_sent(client: Client) -> None:
    job = client.submit(_request({"url": HOOK}))
    quiet = client.submit(_request({"url": HOOK, "events": ["succeeded"]}))

    assert _outbox(client) == [(job.id, "queued", 1)]  # the second job's callback does not ask for it
    assert client.redis.llen(constants.CALLBACK_QUEUE) == 0 and client.redis.zcard(constants.CALLBACKS_PENDING_KEY) == 0
    assert client.redis.hget(constants.JOB_KEY.format(job_id=job.id), "event_seq") == b"1"
    assert client.redis.hget(constants.JOB_KEY.format(job_id=quiet.id), "event_seq") is None


def test_a_job_whose_messages_cannot_be_sent_fails_and_announces_it_after_its_queued_event(client: Client) -> None:
    def broker_away(message: JobMessage, countdown: float = 0.0) -> None:
        raise ConnectionError("broker away")

    client.intake.publish = broker_away
    with pytest.raises(ConnectionError):
        client.submit(_request({"url": HOOK}))

    [(job_id, _, _), failed] = _outbox(client)
    assert failed == (job_id, "failed", 2)
    view = client.status(job_id)
    assert view.status is JobStatus.FAILED and view.error is not None and view.error.type == "EnqueueFailed"
