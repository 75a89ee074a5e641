"""The SSRF guard on the real stack: internal callback URLs refused at submit (client and HTTP API, nothing
enqueued), and refused again at delivery by a worker whose allow-list does not cover them."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis
from api_server import ApiServer, api_settings, make_key, publish_catalog, session_for
from stack import Stack, deliveries_until, recorded, worker_env
from stack_fixtures import WorkerFactory
from webhook_receiver import WebhookReceiver

import producer.core.callbacks.ssrf
from producer.api import create_app
from producer.client import Client
from producer.contract import GenerateRequest, JobStatus
from producer.core import constants
from producer.core.settings import RedisSettings, S3Settings
from producer.errors import InvalidJob
from producer.settings import ClientSettings

pytestmark = pytest.mark.integration

REBOUND = "rebound.attacker.test"  # a public-looking name whose DNS answer is 127.0.0.1


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The system resolver, except that REBOUND resolves to 127.0.0.1 (as a rebinding attacker's DNS would)."""
    real: Callable[[str], list[str]] = producer.core.callbacks.ssrf.resolve_host
    monkeypatch.setattr(
        producer.core.callbacks.ssrf, "resolve_host", lambda host: ["127.0.0.1"] if host == REBOUND else real(host)
    )


@pytest.fixture
def strict_client(stack: Stack) -> Client:
    """A client with the default settings: nothing allow-listed."""
    settings = ClientSettings(redis=RedisSettings(url=stack.redis_url), s3=S3Settings(bucket=stack.bucket))
    assert settings.webhook.allow_hosts == []
    return Client(settings)


def _nothing_enqueued(db: redis.Redis) -> bool:
    queues = [constants.CALLBACK_QUEUE, *constants.GENERATE_QUEUES.values()]
    return sum(db.llen(queue) for queue in queues) == 0 and not db.keys("genq:job:*") and not db.keys("genq:idem:*")


INTERNAL_URLS = [
    "http://10.0.0.1/hook",
    "http://169.254.169.254/latest/meta-data/iam/",
    "http://localhost:8080/hook",
    f"https://{REBOUND}/hook",
    "http://[::1]:8080/hook",
    "http://0x7f000001/hook",
]


@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_internal_callback_urls_are_refused_before_anything_is_enqueued(
    stack: Stack, strict_client: Client, dns: None, url: str
) -> None:
    publish_catalog(stack.redis)
    request = GenerateRequest.model_validate(
        {"model": "fmnist-cgan", "label": "bag", "callback": {"url": url}, "idempotency_key": "order-1"}
    )
    with pytest.raises(InvalidJob) as info:
        strict_client.submit(request)
    assert info.value.field == "callback.url"
    assert "GENQ_WEBHOOK__ALLOW_HOSTS" in str(info.value)
    assert _nothing_enqueued(stack.redis)  # and the idempotency key was given back


@pytest.mark.parametrize("url", ["http://10.0.0.1/hook", "http://169.254.169.254/", "http://[::1]/hook"])
def test_allow_listing_loopback_opens_nothing_else(stack: Stack, url: str) -> None:
    publish_catalog(stack.redis)
    assert stack.client.settings.webhook.allow_hosts == ["127.0.0.1"]
    with pytest.raises(InvalidJob) as info:
        stack.client.submit(
            GenerateRequest.model_validate({"model": "fmnist-cgan", "label": "bag", "callback": {"url": url}})
        )
    assert info.value.field == "callback.url"
    assert _nothing_enqueued(stack.redis)


def test_the_api_answers_422_naming_callback_url_and_enqueues_nothing(stack: Stack) -> None:
    publish_catalog(stack.redis)
    with (
        ApiServer(create_app(api_settings(stack.redis_url, stack.bucket))) as api,
        session_for(api, make_key(stack.redis, "acme")) as acme,
    ):
        for url in ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/hook", "http://[::1]/hook"]:
            answer = acme.post("/v1/jobs", json={"model": "fmnist-cgan", "label": "bag", "callback": {"url": url}})
            assert answer.status_code == 422, answer.text
            [detail] = answer.json()["detail"]
            assert detail["loc"] == ["body", "callback", "url"] and detail["type"] == "invalid_job"
            assert "GENQ_WEBHOOK__ALLOW_HOSTS" in detail["msg"]
    assert _nothing_enqueued(stack.redis)


def test_a_worker_refuses_at_delivery_what_its_own_allow_list_does_not_cover(
    stack: Stack, start_worker: WorkerFactory, webhook_receiver: WebhookReceiver
) -> None:
    # The client allowed 127.0.0.1 at submit; the worker does not: as if DNS had changed since.
    start_worker(worker_env(stack, GENQ_WEBHOOK__ALLOW_HOSTS="[]", GENQ_WEBHOOK__RETRY_SCHEDULE_S="[0, 0.2, 0.2]"))
    job = stack.client.submit(
        GenerateRequest.model_validate(
            {"model": "tiny-cgan", "label": "bag", "callback": {"url": webhook_receiver.url}}
        )
    )
    assert stack.client.wait(job.id, timeout=60).status is JobStatus.SUCCEEDED  # the job itself is unaffected

    records = deliveries_until(stack, job.id, recorded("queued", "running", "succeeded"))
    assert {r["type"] for r in records} >= {"queued", "running", "succeeded"}
    for record in records:
        assert not record["sent"] and not record["ok"] and record["attempt"] == 1 and record["next_retry_at"] is None
        assert record["error"].startswith("not sent: callback host '127.0.0.1' is 127.0.0.1 (loopback)")
    time.sleep(0.5)  # a retry, had one been scheduled, would have run by now
    assert webhook_receiver.received == []
    assert len(stack.client.deliveries(job.id)) == len(records)
