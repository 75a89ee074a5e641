"""Settings refused when a process starts, not when they are first used: the webhook secret's format; and where a
worker creates its bucket by default."""

from __future__ import annotations

import pytest

from producer.core.settings import DEV_WEBHOOK_SECRET, S3Settings, WebhookSettings, is_loopback_url
from producer.errors import ConfigurationError
from producer.settings import ClientSettings
from producer.webhooks import generate_secret


@pytest.mark.parametrize(
    "secret",
    ["my shop secret", "myshopsecret", "whsec_", "whsec_not base64!", "ZGV2LW9ubHktc2VjcmV0", "", "  "],
)
def test_a_malformed_webhook_secret_is_refused_naming_the_setting_and_the_command_never_the_value(secret: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        WebhookSettings(secret=secret)

    message = str(refused.value)
    assert message.startswith("GENQ_WEBHOOK__SECRET is not a Standard Webhooks secret ('whsec_' followed by base64")
    assert "`genq keys webhook-secret`" in message and "\n" not in message
    assert secret.strip() in ("", "whsec_") or secret not in message


def test_a_malformed_webhook_secret_from_the_environment_stops_the_settings_loading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GENQ_WEBHOOK__SECRET", "my shop secret")

    with pytest.raises(ConfigurationError, match="GENQ_WEBHOOK__SECRET"):
        ClientSettings()


@pytest.mark.parametrize(
    "secret",
    [DEV_WEBHOOK_SECRET, generate_secret(), f"{generate_secret()}\n"],
    ids=["dev", "generated", "generated-with-newline"],  # the generated ones differ on every collection
)
def test_standard_webhooks_secrets_are_accepted_without_the_whitespace_of_a_secret_file(secret: str) -> None:
    assert WebhookSettings(secret=secret).secret == secret.strip()


@pytest.mark.parametrize(
    ("endpoint", "created"),
    [
        ("http://127.0.0.1:9000", True),
        ("http://127.0.0.2:9000", True),
        ("http://localhost:9000", True),
        ("http://[::1]:9000", True),
        ("https://s3.eu-west-1.amazonaws.com", False),
        ("http://minio:9000", False),
        ("http://10.0.0.5:9000", False),
        ("", False),
        (None, False),
    ],
)
def test_workers_create_a_missing_bucket_by_default_only_on_a_loopback_endpoint(
    endpoint: str | None, created: bool
) -> None:
    assert S3Settings().creates_bucket(endpoint) is created
    assert S3Settings(create_bucket=True).creates_bucket(endpoint) is True
    assert S3Settings(create_bucket=False).creates_bucket(endpoint) is False


def test_create_bucket_set_empty_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_S3__CREATE_BUCKET", "")
    assert ClientSettings().s3.create_bucket is None
    monkeypatch.setenv("GENQ_S3__CREATE_BUCKET", "false")
    assert ClientSettings().s3.create_bucket is False


def test_only_urls_to_this_machine_are_loopback() -> None:
    assert is_loopback_url("http://127.0.0.1") and is_loopback_url("http://app.localhost:9000")
    assert not is_loopback_url("127.0.0.1:9000") and not is_loopback_url("http://127.0.0.1.example.com")
