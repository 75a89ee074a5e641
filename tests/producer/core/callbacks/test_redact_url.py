"""Callback URLs often carry a receiver's token in their path, query or userinfo: log lines show only the origin."""

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
        ("https://hooks.example.com/services/T0001/B0002/XXXXsecretXXXX", "https://hooks.example.com/…"),  # Slack
        ("https://x.example/hook/SECRET", "https://x.example/…"),
        ("https://webhook.example/SECRET", "https://webhook.example/…"),  # the first segment is the token
        ("https://shop.example/hook?token=SECRET", "https://shop.example/…"),
        ("https://shop.example?token=SECRET", "https://shop.example/…"),
        ("https://user:SECRET@shop.example:8443/hook", "https://shop.example:8443/…"),
        ("https://u:p@w@shop.example/a?b=c#frag", "https://shop.example/…"),
        ("https://shop.example/hook#SECRET", "https://shop.example/…"),
        ("https://shop.example\\SECRET/x", "https://shop.example/…"),  # a backslash ends the host as a slash would
        ("https://[2001:db8::1]:8443/SECRET", "https://[2001:db8::1]:8443/…"),
        ("https://shop.example/", "https://shop.example/"),
        ("https://shop.example", "https://shop.example"),
        ("http://[::1/x?SECRET", "http://[::1/…"),  # malformed: redacted all the same, never raises
        ("shop.example/SECRET", "…"),  # no scheme: no host to tell apart from the rest
        ("", ""),
    ],
)
def test_redact_url_keeps_only_scheme_host_and_port(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_url_bounds_what_it_returns() -> None:
    redacted = redact_url("https://" + "a" * 500 + ".example/SECRET")
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
    """Delivered, retried, dead-lettered, gone (410) and refused: no log line, DEBUG up, holds the URL's secrets."""
    webhook_receiver.script([200, 500, 410, 500])
    # A token in each place receivers put one: the userinfo, the path (Slack-style) and the query.
    secret_url = webhook_receiver.url.replace("http://", "http://hookuser:SECRET1@") + "/T0001/SECRET3?token=SECRET2"
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
    assert redact_url(secret_url) == webhook_receiver.url.removesuffix("/hook") + "/…"
    for secret in ("SECRET1", "SECRET2", "SECRET3", "T0001", "hookuser"):
        assert secret not in logged, secret
    assert [r.path for r in webhook_receiver.received][:1] == ["/hook/T0001/SECRET3?token=SECRET2"]  # sent whole
