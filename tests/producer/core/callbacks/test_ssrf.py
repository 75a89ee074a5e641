"""The SSRF guard: which addresses a callback may reach, allow-listing, and the refusal at submit time."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime

import pytest

from producer.contract import GenerateRequest, LabelCount, ModelEntry, ModelVersionInfo
from producer.core.callbacks.ssrf import AllowList, address_refusal, check_callback_url
from producer.core.resolve import resolve_request
from producer.core.settings import Limits, WebhookSettings
from producer.errors import CallbackHostUnresolved, CallbackUrlRefused, InvalidJob
from producer.settings import ClientSettings


def _resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    def resolve(host: str) -> list[str]:
        if host not in table:
            raise OSError(-2, "Name or service not known")
        return table[host]

    return resolve


def _never(host: str) -> list[str]:
    raise AssertionError(f"{host!r} is a literal address: it must not be looked up")


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),  # unique local
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("100.64.0.1", "not globally routable"),  # carrier-grade NAT shared space
        ("::ffff:127.0.0.1", "loopback (127.0.0.1 inside an IPv6 address)"),
        ("::ffff:169.254.169.254", "cloud metadata (169.254.169.254 inside an IPv6 address)"),
        ("::ffff:10.1.2.3", "private (10.1.2.3 inside an IPv6 address)"),
        ("64:ff9b::a9fe:a9fe", "cloud metadata (169.254.169.254 inside an IPv6 address)"),  # NAT64
        ("2002:7f00:1::", "loopback (127.0.0.1 inside an IPv6 address)"),  # 6to4
        ("93.184.216.34", None),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_address_classification(address: str, reason: str | None) -> None:
    assert address_refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", ["240.0.0.1", "255.255.255.255", "192.0.2.1", "::127.0.0.1"])
def test_reserved_and_documentation_blocks_are_refused(address: str) -> None:
    # Which name the ipaddress module files them under varies between Python versions; refused they are.
    assert address_refusal(ipaddress.ip_address(address)) in {"private", "reserved", "not globally routable"}


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "https://user:pw@127.0.0.1/hook",
        "http://[fd00:ec2::254]/",
    ],
)
def test_literal_internal_addresses_are_refused_without_a_lookup(url: str) -> None:
    with pytest.raises(CallbackUrlRefused) as info:
        check_callback_url(url, resolve=_never)
    assert info.value.field == "callback.url"
    assert "GENQ_WEBHOOK__ALLOW_HOSTS" in str(info.value)


def test_a_name_resolving_to_loopback_is_refused_naming_host_and_address() -> None:
    resolve = _resolver({"hooks.attacker.test": ["127.0.0.1"]})
    with pytest.raises(CallbackUrlRefused, match=r"'hooks.attacker.test' resolves to 127.0.0.1 \(loopback\)"):
        check_callback_url("https://hooks.attacker.test/h", resolve=resolve)


def test_one_internal_address_among_public_ones_is_enough_to_refuse() -> None:
    resolve = _resolver({"shop.test": ["93.184.216.34", "10.0.0.7"]})
    with pytest.raises(CallbackUrlRefused, match="10.0.0.7"):
        check_callback_url("https://shop.test/h", resolve=resolve)


def test_a_public_host_passes() -> None:
    resolve = _resolver({"shop.test": ["93.184.216.34", "2606:4700:4700::1111"]})
    check_callback_url("https://shop.test/hooks/genq", resolve=resolve)
    check_callback_url("https://8.8.8.8/hook", resolve=_never)


def test_a_host_that_does_not_resolve_is_an_invalid_job_of_its_own_kind() -> None:
    with pytest.raises(CallbackHostUnresolved) as info:
        check_callback_url("https://typo.test/h", resolve=_resolver({}))
    assert isinstance(info.value, InvalidJob) and info.value.field == "callback.url"
    assert "does not resolve" in str(info.value)
    with pytest.raises(CallbackHostUnresolved, match="no address"):
        check_callback_url("https://empty.test/h", resolve=_resolver({"empty.test": []}))


@pytest.mark.parametrize(
    "url", ["http://localhost:9/hook", "http://0x7f000001/", "http://2130706433/", "http://127.1/"]
)
def test_real_lookups_of_loopback_spellings_are_refused(url: str) -> None:
    # The system resolver: ``localhost`` from /etc/hosts; hex, decimal and short forms as inet_aton reads them.
    with pytest.raises(CallbackUrlRefused, match="loopback"):
        check_callback_url(url)


@pytest.mark.parametrize(
    ("allow", "url"),
    [
        (["127.0.0.1"], "http://127.0.0.1:8080/hook"),
        (["[::1]"], "http://[::1]/hook"),
        (["::1"], "http://[::1]/hook"),
        (["10.0.0.0/8"], "http://10.20.30.40/hook"),
        (["hooks.internal"], "http://hooks.internal/hook"),  # by name: trusted whatever it resolves to
        (["HOOKS.internal."], "http://hooks.internal/hook"),
        (["127.0.0.1"], "http://localhost-alias.test/hook"),  # by address: any name resolving there
    ],
)
def test_allow_listed_hosts_addresses_and_networks_pass(allow: list[str], url: str) -> None:
    resolve = _resolver({"hooks.internal": ["10.9.9.9"], "localhost-alias.test": ["127.0.0.1"]})
    check_callback_url(url, allow, resolve=resolve)


def test_allow_listing_one_address_opens_only_that_address() -> None:
    with pytest.raises(CallbackUrlRefused, match="127.0.0.2"):
        check_callback_url("http://127.0.0.2/", ["127.0.0.1"])
    with pytest.raises(CallbackUrlRefused, match="::1"):
        check_callback_url("http://[::1]/", ["127.0.0.1"])


def test_a_network_never_opens_a_metadata_address_but_naming_it_exactly_does() -> None:
    with pytest.raises(CallbackUrlRefused, match="cloud metadata"):
        check_callback_url("http://169.254.169.254/", ["169.254.0.0/16"])
    check_callback_url("http://169.254.169.254/", ["169.254.169.254"])


@pytest.mark.parametrize("entry", ["", "  ", "10.0.0.0/33", "not a host", "::1/200", "a/b"])
def test_malformed_allow_list_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError):
        AllowList.parse([entry])


def test_settings_read_the_allow_list_and_schedule_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_WEBHOOK__ALLOW_HOSTS", '["127.0.0.1", "10.0.0.0/8", "hooks.internal"]')
    monkeypatch.setenv("GENQ_WEBHOOK__RETRY_SCHEDULE_S", "[0, 0.2, 0.2]")
    monkeypatch.setenv("GENQ_WEBHOOK__JITTER", "0")
    webhook = ClientSettings().webhook
    assert webhook.allow_hosts == ["127.0.0.1", "10.0.0.0/8", "hooks.internal"]
    assert webhook.retry_schedule_s == [0, 0.2, 0.2] and webhook.jitter == 0


def test_defaults_are_the_standard_webhooks_schedule_and_an_empty_allow_list() -> None:
    webhook = WebhookSettings()
    assert webhook.retry_schedule_s == [0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400]
    assert webhook.allow_hosts == [] and webhook.progress_interval_s == 0.5


@pytest.mark.parametrize(
    "fields",
    [
        {"retry_schedule_s": []},
        {"retry_schedule_s": [5, 10]},
        {"retry_schedule_s": [0, -1]},
        {"jitter": 1.5},
        {"allow_hosts": ["10.0.0.0/40"]},
    ],
)
def test_bad_webhook_settings_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        WebhookSettings.model_validate(fields)


CATALOG = {
    "fmnist-cgan": ModelEntry(
        name="fmnist-cgan",
        versions={"1": ModelVersionInfo(arch="cgan", class_names=["tshirt", "bag"], resolution=28, channels=1)},
        aliases={"latest": "1"},
    )
}
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _request(url: str) -> GenerateRequest:
    return GenerateRequest.model_validate({"model": "fmnist-cgan", "label": "bag", "callback": {"url": url}})


def test_resolve_refuses_an_internal_callback_naming_the_field() -> None:
    with pytest.raises(InvalidJob) as info:
        resolve_request(_request("http://10.0.0.1/hook"), CATALOG, Limits(), job_id="job-12345678", now=NOW)
    assert info.value.field == "callback.url" and str(info.value).startswith("callback.url: callback host")


def test_resolve_accepts_an_allow_listed_callback() -> None:
    job = resolve_request(
        _request("http://127.0.0.1:9/hook"),
        CATALOG,
        Limits(),
        job_id="job-12345678",
        now=NOW,
        allow_hosts=["127.0.0.1"],
    )
    assert job.callback is not None and str(job.callback.url) == "http://127.0.0.1:9/hook"
    assert job.items == [LabelCount(index=1, name="bag", count=1)]
