"""Listing and revoking API keys in the real Redis: a revoked key gets 401 from its next request, stays listed, and
no listing ever shows a secret; ``genq keys list`` / ``genq keys revoke``."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import redis
from api_server import ApiServer, make_key, session_for
from typer.testing import CliRunner

from producer.api.auth import ApiKey, KeyStore, key_id
from producer.cli import app
from producer.core import constants
from producer.errors import KeyNotFound, Unauthorized


def _plant(client: redis.Redis, kid: str, tenant: str, name: str) -> None:
    """A key record under a chosen id, as `create` stores it: ids that share a prefix cannot be made otherwise."""
    record = ApiKey(tenant=tenant, name=name, created_at=datetime(2026, 1, 1, tzinfo=UTC))
    client.set(constants.API_KEY.format(key_id=kid), record.model_dump_json())
    client.sadd(constants.API_KEYS_INDEX_KEY, kid)


def test_list_shows_every_key_oldest_first_and_filters_by_tenant(catalog: redis.Redis) -> None:
    store = KeyStore(catalog)
    secrets = [make_key(catalog, tenant) for tenant in ("acme", "globex", "acme")]
    listed = store.list()
    assert [k.key_id for k in listed] == [key_id(s) for s in secrets]
    assert [k.key.tenant for k in listed] == ["acme", "globex", "acme"]
    assert [k.short_id for k in listed] == [key_id(s)[:12] for s in secrets]
    assert [k.key_id for k in store.list(tenant="acme")] == [key_id(secrets[0]), key_id(secrets[2])]
    assert store.list(tenant="initech") == []
    assert not any(s in k.key.model_dump_json() for s in secrets for k in listed)


def test_keys_are_listed_from_an_index_not_a_keyspace_scan(catalog: redis.Redis) -> None:
    secret = make_key(catalog, "acme")
    assert catalog.smembers(constants.API_KEYS_INDEX_KEY) == {key_id(secret).encode()}
    catalog.delete(constants.API_KEY.format(key_id=key_id(secret)))  # a record deleted by hand is not listed
    catalog.set(constants.API_KEY.format(key_id="f" * 64), "{}")  # nor one outside the index
    assert KeyStore(catalog).list() == []


def test_a_revoked_key_is_refused_from_its_next_request_and_stays_listed(api: ApiServer, catalog: redis.Redis) -> None:
    store = KeyStore(catalog)
    revoked_secret, kept_secret = make_key(catalog, "acme"), make_key(catalog, "acme")
    with session_for(api, revoked_secret) as revoked, session_for(api, kept_secret) as kept:
        assert revoked.get("/v1/jobs").status_code == 200

        stored, changed = store.revoke(key_id(revoked_secret)[:8])
        assert changed and stored.key_id == key_id(revoked_secret) and stored.key.revoked_at is not None

        refused = revoked.get("/v1/jobs")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'Bearer realm="genq", error="invalid_token"'
        (detail,) = refused.json()["detail"]
        assert detail["loc"] == ["header", "Authorization"] and "revoked at" in detail["msg"]
        assert kept.get("/v1/jobs").status_code == 200  # the tenant's other key is untouched

    with pytest.raises(Unauthorized, match="revoked"):
        store.authenticate(revoked_secret)
    by_id = {k.key_id: k.key for k in store.list()}
    assert by_id[key_id(revoked_secret)].revoked_at == stored.key.revoked_at
    assert by_id[key_id(kept_secret)].revoked_at is None

    again, changed = store.revoke(key_id(revoked_secret))  # the whole id works too; revoking twice changes nothing
    assert not changed and again.key.revoked_at == stored.key.revoked_at


def test_revoke_refuses_unknown_ambiguous_and_malformed_prefixes(catalog: redis.Redis) -> None:
    store = KeyStore(catalog)
    _plant(catalog, "abcdef01" + "0" * 56, "acme", "shop")
    _plant(catalog, "abcdef02" + "0" * 56, "globex", "ci")
    with pytest.raises(KeyNotFound, match=r"2 API key ids start with 'abcdef'.*abcdef010000 \(acme, 'shop'\)"):
        store.revoke("abcdef")
    with pytest.raises(KeyNotFound, match="no API key id starts with '123456'"):
        store.revoke("123456")
    for bad in ("abc", "genq_abcdef", "abcdefgh"):
        with pytest.raises(ValueError, match="at least 6 hex characters"):
            store.revoke(bad)
    assert all(k.key.revoked_at is None for k in store.list())

    stored, _ = store.revoke("ABCDEF02")  # hex in either case
    assert stored.key.tenant == "globex"
    assert [k.key.revoked_at is not None for k in store.list()] == [False, True]


def test_keys_list_and_revoke_commands(redis_url: str, catalog: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_REDIS__URL", redis_url)
    monkeypatch.setenv("COLUMNS", "200")  # rich sizes its table to the terminal; CliRunner has none
    runner = CliRunner()
    empty = runner.invoke(app, ["keys", "list"])
    assert empty.exit_code == 0 and "no API keys" in empty.output and empty.stdout == ""
    secret = make_key(catalog, "acme", max_queued=7)
    other = make_key(catalog, "globex")
    short = key_id(secret)[:12]

    listed = runner.invoke(app, ["keys", "list"])
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.stdout.splitlines() if short in line)
    assert "acme" in row and "test" in row and "max_queued 7" in row
    assert key_id(other)[:12] in listed.stdout and key_id(secret) not in listed.stdout
    assert secret not in listed.output and other not in listed.output

    revoked = runner.invoke(app, ["keys", "revoke", short])
    assert revoked.exit_code == 0, revoked.output
    assert f"API key {short} (tenant acme, 'test') revoked" in revoked.output
    with pytest.raises(Unauthorized):
        KeyStore(catalog).authenticate(secret)
    only_acme = runner.invoke(app, ["keys", "list", "--tenant", "acme"])
    assert short in only_acme.stdout and key_id(other)[:12] not in only_acme.stdout
    row = next(line for line in only_acme.stdout.splitlines() if short in line)
    assert row.count(datetime.now(UTC).strftime("%Y-%m-%d ")) == 2  # created, and revoked

    unknown = runner.invoke(app, ["keys", "revoke", "0123456789"])
    assert unknown.exit_code == 1 and "no API key id starts with '0123456789'" in unknown.output
    malformed = runner.invoke(app, ["keys", "revoke", "xyz"])
    assert malformed.exit_code == 2 and "at least 6 hex characters" in malformed.output
