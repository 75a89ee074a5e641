"""Callback URLs often carry a receiver's token in their query or userinfo: log lines show them redacted."""

from __future__ import annotations

import logging
import random
from datetime import UTC, datetime

import pytest
import redis
from webhook_receiver import WebhookReceiver

from producer.contract import Callback, EventType, JobStatus, JobView, Progress
from producer.core.callbacks.delivery import CallbackLedger, Outcome, run_delivery
from producer.core.callbacks.events import CallbackMessage, callback_message
from producer.core.callbacks.ssrf import redact_url, vetted_addresses
from producer.core.settings import WebhookSettings
from producer.errors import CallbackUrlRefused


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://shop.example/hook?token=SECRET", "https://shop.example/hook?…"),
        ("https://user:SECRET@shop.example:8443/hook", "https://…@shop.example:8443/hook"),
        ("https://u:p@w@shop.example/a?b=c#frag", "https://…@shop.example/a?…"),
        ("https://shop.example/hook#SECRET", "https://shop.example/hook#…"),
        ("https://shop.example/hook#x?SECRET", "https://shop.example/hook#…"),
        ("https://shop.example/hook", "https://shop.example/hook"),
        ("http://[::1/x?SECRET", "http://[::1/x?…"),  # malformed: redacted all the same, never raises
        ("", ""),
    ],
)
def test_redact_url_hides_query_fragment_and_userinfo_and_keeps_the_receiver(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_url_bounds_what_it_returns() -> None:
    redacted = redact_url("https://shop.example/" + "a" * 500 + "?token=SECRET")
    assert len(redacted) == 200 and redacted.endswith("…") and "SECRET" not in redacted


def test_a_refused_malformed_url_does_not_quote_its_token() -> None:
    with pytest.raises(CallbackUrlRefused) as refused:
        vetted_addresses("http://[::1/hook?token=SECRET", [])
    assert "SECRET" not in str(refused.value)


def _message(url: str, job_id: str) -> CallbackMessage:
    view = JobView(
        id=job_id,
        status=JobStatus.SUCCEEDED,
        model="fmnist-cgan",
        model_version="fmnist-cgan@1",
        seed=1,
        progress=Progress(done=1, total=1),
        created_at=datetime(2026, 3, 1, tzinfo=UTC),
    )
    message = callback_message(Callback.model_validate({"url": url}), EventType.SUCCEEDED, view, 1)
    assert message is not None
    return message


def test_no_delivery_log_line_prints_a_callback_urls_token(
    redis_client: redis.Redis, webhook_receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """Delivered, retried, dead-lettered, gone (410) and refused: every log line, DEBUG up, with the URL's token."""
    webhook_receiver.script([200, 500, 410, 500])
    secret_url = webhook_receiver.url.replace("http://", "http://hookuser:SECRET1@") + "?token=SECRET2"
    ledger = CallbackLedger(redis_client, ttl_s=3600)

    def run(job_id: str, **webhook: object) -> Outcome:
        settings = WebhookSettings.model_validate(
            {"retry_schedule_s": [0, 0.2], "jitter": 0.0, "allow_hosts": ["127.0.0.1"], **webhook}
        )
        return run_delivery(
            _message(secret_url, job_id),
            webhook=settings,
            ledger=ledger,
            requeue=lambda message, countdown: None,
            max_hop_s=1800.0,
            rng=random.Random(7),
        )

    with caplog.at_level(logging.DEBUG):
        outcomes = [run("job-1"), run("job-2"), run("job-3"), run("job-4", allow_hosts=[])]
        outcomes.append(run("job-5", retry_schedule_s=[0]))  # a single attempt: dead-lettered
    assert outcomes == [Outcome.DELIVERED, Outcome.RETRYING, Outcome.GONE, Outcome.REFUSED, Outcome.DEAD_LETTERED]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "answered 410" in logged and redact_url(secret_url) in logged  # the receiver is still named
    assert "SECRET1" not in logged and "SECRET2" not in logged and "hookuser" not in logged
