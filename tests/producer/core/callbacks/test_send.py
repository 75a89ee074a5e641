"""Callback delivery over real loopback HTTP, against the recording receiver in tests/webhook_receiver.py."""

from __future__ import annotations

import dataclasses
import socket
import time
from datetime import UTC, datetime

import pytest
from keepalive_receiver import KeepAliveReceiver
from webhook_receiver import WebhookReceiver

from producer.contract import EventType, JobStatus, JobView, Progress, WebhookEvent
from producer.core.callbacks.send import USER_AGENT, DeliveryResult, WebhookClient, deliver
from producer.core.callbacks.signing import msg_id_for, sign
from producer.core.settings import DEV_WEBHOOK_SECRET

JOB_ID = "job_12345678"
MSG_ID = msg_id_for(JOB_ID, EventType.SUCCEEDED, 2)


def _event() -> WebhookEvent:
    created = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    view = JobView(
        id=JOB_ID,
        status=JobStatus.SUCCEEDED,
        model="fmnist-cgan",
        model_version="v1",
        seed=42,
        progress=Progress(done=4, total=4),
        metadata={"order": "A-17", "tags": ["shoes", "ünïcode"]},
        created_at=created,
        finished_at=created.replace(second=9),
    )
    return WebhookEvent(type=EventType.SUCCEEDED, timestamp=created.replace(second=9), data=view)


def _deliver(url: str, **kwargs: object) -> DeliveryResult:
    options: dict = {"secret": DEV_WEBHOOK_SECRET, "msg_id": MSG_ID, "timeout_s": 5.0} | kwargs
    return deliver(url, _event(), **options)


def test_delivered_event_verifies_and_parses_back_into_the_event(webhook_receiver: WebhookReceiver) -> None:
    result = _deliver(webhook_receiver.url)

    assert result.ok and result.status_code == 200 and result.error is None and not result.gone
    assert result.duration_ms > 0
    [received] = webhook_receiver.wait_for(1)
    assert received.method == "POST" and received.path == "/hook"
    assert received.verified, received.verify_error
    assert WebhookEvent.model_validate_json(received.body) == _event()


def test_body_is_sent_byte_for_byte_as_signed_with_the_standard_headers(webhook_receiver: WebhookReceiver) -> None:
    _deliver(webhook_receiver.url)

    [received] = webhook_receiver.wait_for(1)
    assert received.body == _event().model_dump_json().encode()
    assert received.headers["webhook-id"] == MSG_ID
    assert received.headers["content-type"] == "application/json"
    assert received.headers["user-agent"] == USER_AGENT == "genq-webhooks/1"
    timestamp = int(received.headers["webhook-timestamp"])
    assert received.headers["webhook-signature"] == sign(DEV_WEBHOOK_SECRET, MSG_ID, timestamp, received.body)


def test_receiver_with_another_secret_rejects_the_delivery() -> None:
    with WebhookReceiver(secret="whsec_" + "b3RoZXItc2VjcmV0LW9mLTI0LWJ5dGVz") as receiver:
        _deliver(receiver.url)
        [received] = receiver.wait_for(1)
    assert not received.verified
    assert received.verify_error is not None and "no v1 signature" in received.verify_error


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_any_2xx_counts_as_delivered(webhook_receiver: WebhookReceiver, status: int) -> None:
    webhook_receiver.script([status])
    result = _deliver(webhook_receiver.url)
    assert result.ok and result.status_code == status and result.error is None


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
def test_non_2xx_is_not_delivered_and_keeps_the_status_code(webhook_receiver: WebhookReceiver, status: int) -> None:
    webhook_receiver.script([status])
    result = _deliver(webhook_receiver.url)
    assert not result.ok and result.status_code == status and not result.gone
    assert result.error == f"HTTP {status}"


def test_410_means_the_receiver_is_gone(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.script([410])
    result = _deliver(webhook_receiver.url)
    assert not result.ok and result.status_code == 410 and result.gone


def test_redirect_is_not_followed(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.script([307])
    result = _deliver(webhook_receiver.url)
    assert not result.ok and result.status_code == 307
    assert len(webhook_receiver.received) == 1  # deliver returned: a followed redirect would already be here


def test_retries_of_one_event_carry_the_same_webhook_id_and_all_verify(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.script([500, 500])
    results = [_deliver(webhook_receiver.url) for _ in range(3)]

    assert [r.status_code for r in results] == [500, 500, 200]
    assert [r.ok for r in results] == [False, False, True]
    received = webhook_receiver.wait_for(3)
    assert {r.headers["webhook-id"] for r in received} == {MSG_ID}
    assert all(r.verified for r in received)
    assert [r.status for r in received] == [500, 500, 200]


def test_receiver_slower_than_the_timeout_gives_a_timeout_error(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.script([200], delay_s=3.0)
    result = _deliver(webhook_receiver.url, timeout_s=0.3)

    assert not result.ok and result.status_code is None
    assert result.error is not None and "Timeout" in result.error
    assert 250 <= result.duration_ms < 2500


def test_closed_port_gives_a_connection_error_instead_of_raising() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _deliver(f"http://127.0.0.1:{port}/hook", timeout_s=2.0)

    assert not result.ok and result.status_code is None
    assert result.error is not None and result.error.startswith("ConnectError")


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/hook", "http://", "not a url"])
def test_unusable_url_gives_an_error_instead_of_raising(url: str) -> None:
    result = _deliver(url, timeout_s=1.0)
    assert not result.ok and result.status_code is None and result.error


def test_a_given_client_is_used_and_left_open(webhook_receiver: WebhookReceiver) -> None:
    with WebhookClient() as client:
        first = _deliver(webhook_receiver.url, client=client)
        second = _deliver(webhook_receiver.url, client=client)
        assert not client.is_closed
    assert client.is_closed
    assert first.ok and second.ok
    assert all(r.verified for r in webhook_receiver.wait_for(2))


def test_a_reused_client_sends_a_hosts_events_over_one_kept_alive_connection() -> None:
    with KeepAliveReceiver() as receiver, WebhookClient() as client:
        results = [_deliver(receiver.url(), client=client) for _ in range(5)]
        assert client.connections() == 1
    assert all(r.ok for r in results), results
    assert len({request.peer for request in receiver.requests}) == 1  # one client socket carried all five


def test_two_host_names_at_one_address_never_share_a_connection() -> None:
    # TLS would verify a connection for one name only: another host's events must not ride on it.
    with KeepAliveReceiver() as receiver, WebhookClient() as client:
        for name in ("hooks.a.invalid", "hooks.b.invalid", "hooks.a.invalid", "hooks.b.invalid"):
            assert _deliver(f"http://{name}:{receiver.port}/hook", client=client, connect_to=["127.0.0.1"]).ok
    first_a, first_b, second_a, second_b = receiver.requests
    assert first_a.peer == second_a.peer and first_b.peer == second_b.peer and first_a.peer != first_b.peer
    assert [r.host.split(":")[0] for r in receiver.requests] == ["hooks.a.invalid", "hooks.b.invalid"] * 2


def test_a_kept_alive_connection_is_used_only_for_an_address_vetted_again() -> None:
    # The same host, vetted to 127.0.0.2 this time: the pooled connection to 127.0.0.1 must not carry it.
    with KeepAliveReceiver(hosts=("127.0.0.1", "127.0.0.2")) as receiver, WebhookClient() as client:
        url = f"http://hooks.shop.invalid:{receiver.port}/hook"
        for address in ("127.0.0.1", "127.0.0.2", "127.0.0.1"):
            assert _deliver(url, client=client, connect_to=[address]).ok
    assert [r.local_address for r in receiver.requests] == ["127.0.0.1", "127.0.0.2", "127.0.0.1"]
    assert receiver.requests[0].peer == receiver.requests[2].peer  # back on 127.0.0.1's kept-alive connection


def test_idle_hosts_and_hosts_beyond_the_cap_have_their_connections_closed() -> None:
    with KeepAliveReceiver() as receiver, WebhookClient(keepalive_s=0.3, max_hosts=2) as client:

        def send(name: str) -> None:
            assert _deliver(f"http://{name}:{receiver.port}/hook", client=client, connect_to=["127.0.0.1"]).ok

        send("hooks.a.invalid")
        time.sleep(0.4)
        send("hooks.b.invalid")
        assert client.connections() == 1  # a's, idle past the keep-alive, closed at this attempt
        send("hooks.c.invalid")
        send("hooks.d.invalid")
        assert client.connections() == 2  # b's closed too: two hosts at most


def test_a_receiver_trickling_its_answer_is_cut_off_at_the_attempt_deadline() -> None:
    # One byte every 0.3 s never trips the 5 s per-read timeout; the 1 s deadline for the whole attempt does.
    with KeepAliveReceiver(trickle_s=0.3) as tarpit, WebhookClient() as client:
        result = _deliver(tarpit.url(), client=client, timeout_s=5.0, deadline_s=1.0)
        assert client.connections() == 0  # a connection cut off mid-answer is never reused
    assert not result.ok and result.status_code is None
    assert result.error is not None and result.error.startswith("no answer within the attempt deadline of 1 s")
    assert 950 <= result.duration_ms < 2000


def test_without_a_deadline_only_the_per_read_timeout_applies() -> None:
    with KeepAliveReceiver(trickle_s=0.05) as slow:
        result = _deliver(slow.url(), timeout_s=1.0)  # 38 bytes, 0.05 s apart: ~2 s in all, no read over 1 s
    assert result.ok and result.duration_ms > 1500


def test_malformed_secret_raises_before_anything_is_sent(webhook_receiver: WebhookReceiver) -> None:
    with pytest.raises(ValueError, match="webhook secret"):
        _deliver(webhook_receiver.url, secret="whsec_not base64!")
    assert webhook_receiver.received == []


def test_delivery_result_is_frozen() -> None:
    result = DeliveryResult(ok=True, status_code=200, error=None, duration_ms=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.ok = False  # type: ignore[misc]


def test_connect_to_pins_the_address_and_keeps_the_host_header(webhook_receiver: WebhookReceiver) -> None:
    port = webhook_receiver.url.split(":")[2].split("/")[0]
    # The name does not resolve anywhere: only the given address can have carried the request.
    result = _deliver(f"http://hooks.shop.invalid:{port}/hook", connect_to=["127.0.0.1"])

    assert result.ok, result.error
    [received] = webhook_receiver.wait_for(1)
    assert received.headers["host"] == f"hooks.shop.invalid:{port}" and received.path == "/hook"
    assert received.verified


def test_connect_to_moves_on_to_the_next_address_when_connecting_fails(webhook_receiver: WebhookReceiver) -> None:
    port = webhook_receiver.url.split(":")[2].split("/")[0]
    # 127.0.0.2 is loopback too, but the receiver listens on 127.0.0.1 only: refused, nothing sent.
    result = _deliver(f"http://hooks.shop.invalid:{port}/hook", connect_to=["127.0.0.2", "127.0.0.1"])

    assert result.ok, result.error
    assert len(webhook_receiver.wait_for(1)) == 1
