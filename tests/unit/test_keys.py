"""The key store and scopes in-process, on SQLite in a temporary folder."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from impuls.auth import keys as keys_module
from impuls.auth.audit import Actor
from impuls.auth.keys import KeyStore, load_server_secret
from impuls.auth.principal import Principal, Scope
from impuls.errors import Forbidden, InvalidInput, KeyExists, KeyNotFound
from impuls.store.db import open_engine
from impuls.store.schema import api_keys

ADMIN = Actor("tester", "127.0.0.1")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    db = open_engine(f"sqlite:///{tmp_path}/impuls.db")
    yield KeyStore(db, load_server_secret(tmp_path, ""), env_admin_key="env-admin-key-value")
    db.dispose()


def test_a_new_key_authenticates_with_its_scope(store: KeyStore) -> None:
    new = store.create("ci", "deploy", "orders-*", ADMIN)
    assert new.key.startswith("impuls_") and len(new.key) > 40
    assert store.authenticate(new.key) == Principal("ci", Scope.DEPLOY, "orders-*")
    assert store.cached(new.key) == Principal("ci", Scope.DEPLOY, "orders-*")
    assert store.authenticate(new.key[:-1] + ("A" if new.key[-1] != "A" else "B")) is None
    assert store.authenticate("garbage") is None


def test_only_hashes_are_stored(store: KeyStore) -> None:
    new = store.create("ci", "read")
    with store.db.connect() as conn:
        row = conn.execute(select(api_keys)).one()._mapping
    values = " ".join(str(v) for v in row.values())
    assert new.key not in values and new.secret_access_key not in values
    assert new.key.rsplit("_", 1)[1] not in values


def test_aws_credentials_are_derived_not_stored(store: KeyStore, tmp_path: Path) -> None:
    new = store.create("boto", "invoke")
    assert new.access_key_id.startswith("AKIA") and len(new.access_key_id) == 20
    assert len(new.secret_access_key) == 40
    found = store.credentials(new.access_key_id)
    assert found == (Principal("boto", Scope.INVOKE), new.secret_access_key)
    assert store.credentials("AKIAUNKNOWN000000000") is None
    other = KeyStore(store.db, b"another server secret")
    assert other.secret_access_key(new.access_key_id) != new.secret_access_key
    store.revoke("boto", ADMIN)
    assert store.credentials(new.access_key_id) is None


def test_revoke_ends_a_cached_key_at_once(store: KeyStore) -> None:
    new = store.create("ci", "read")
    assert store.authenticate(new.key) is not None and store.cached(new.key) is not None
    store.revoke("ci", ADMIN)
    assert store.cached(new.key) is None and store.authenticate(new.key) is None
    with pytest.raises(InvalidInput, match="already revoked"):
        store.revoke("ci", ADMIN)
    with pytest.raises(KeyNotFound):
        store.revoke("nope", ADMIN)


def test_a_revoke_elsewhere_is_seen_once_the_cache_expires(store: KeyStore, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Another node's revoke reaches this node's cache within CACHE_SECONDS."""
    new = store.create("ci", "read")
    assert store.authenticate(new.key) is not None
    elsewhere = KeyStore(store.db, b"")
    elsewhere.revoke("ci", ADMIN)
    assert store.cached(new.key) is not None  # still cached here...
    now = keys_module.time.monotonic()
    monkeypatch.setattr(keys_module.time, "monotonic", lambda: now + keys_module.CACHE_SECONDS + 0.01)
    assert store.cached(new.key) is None and store.authenticate(new.key) is None  # ...not for longer


def test_environment_admin_key(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    assert store.authenticate("env-admin-key-value") == Principal("IMPULS_ADMIN_KEY", Scope.ADMIN)
    assert store.authenticate("env-admin-key-valu") is None
    # known without the database (every request with it stays on the event loop)
    monkeypatch.setattr(store, "db", None)
    assert store.cached("env-admin-key-value") == Principal("IMPULS_ADMIN_KEY", Scope.ADMIN)
    assert store.cached("env-admin-key-valu") is None


def test_invalid_keys_are_refused(store: KeyStore) -> None:
    with pytest.raises(InvalidInput, match=r"^name"):
        store.create("has space", "read")
    with pytest.raises(InvalidInput, match=r"^scope"):
        store.create("k", "superuser")
    with pytest.raises(InvalidInput, match=r"^functions"):
        store.create("k", "read", "../x")
    store.create("k", "read")
    with pytest.raises(KeyExists):
        store.create("k", "admin")


def test_bootstrap_writes_one_admin_key(tmp_path: Path) -> None:
    db = open_engine(f"sqlite:///{tmp_path}/impuls.db")
    store = KeyStore(db, b"s")
    key_file = tmp_path / "admin-key"
    assert store.bootstrap(key_file) == key_file
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert store.authenticate(key) == Principal("admin", Scope.ADMIN)
    assert store.bootstrap(key_file) is None  # a key exists: nothing new
    assert KeyStore(db, b"s", env_admin_key="x").bootstrap(tmp_path / "other") is None
    db.dispose()


def test_server_secret_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    first = load_server_secret(tmp_path, "")
    assert load_server_secret(tmp_path, "") == first and len(first) == 64
    assert stat.S_IMODE((tmp_path / "server-secret").stat().st_mode) == 0o600
    assert load_server_secret(tmp_path, "shared") == b"shared"


@pytest.mark.parametrize(("scope", "needed", "allowed"), [
    (Scope.READ, Scope.READ, True), (Scope.READ, Scope.INVOKE, False),
    (Scope.INVOKE, Scope.READ, True), (Scope.DEPLOY, Scope.ADMIN, False), (Scope.ADMIN, Scope.DEPLOY, True),
])
def test_scopes_include_the_ones_below(scope: Scope, needed: Scope, allowed: bool) -> None:
    principal = Principal("k", scope)
    if allowed:
        principal.require(needed)
    else:
        with pytest.raises(Forbidden, match=f"needs '{needed.label}'"):
            principal.require(needed)


def test_function_globs() -> None:
    p = Principal("k", Scope.ADMIN, "orders-*")
    p.require(Scope.READ, "orders-eu")
    assert p.may_touch("orders-") and not p.may_touch("Orders-eu") and not p.may_touch("billing")
    with pytest.raises(Forbidden, match="limited to functions matching 'orders-\\*'"):
        p.require(Scope.READ, "billing")
    assert Principal("k", Scope.READ, "a?c").may_touch("abc")


def test_a_signature_is_checked_against_the_credentials_looked_up_for_it(
        store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lookup handed to the verifier keeps what was found, even once the cache expires
    (it used to re-read the cache: rare 403s under load)."""
    import asyncio

    from impuls.api.auth import sigv4_lookup

    new = store.create("boto", "invoke")
    headers = [("Authorization", f"AWS4-HMAC-SHA256 Credential={new.access_key_id}/20260101/us-east-1/"
                                 "lambda/aws4_request, SignedHeaders=host, Signature=00")]
    lookup = asyncio.run(sigv4_lookup(store, headers, ""))
    now = keys_module.time.monotonic()
    monkeypatch.setattr(keys_module.time, "monotonic", lambda: now + keys_module.CACHE_SECONDS + 1)
    assert store.cached_credentials(new.access_key_id) is None
    assert lookup(new.access_key_id) == (Principal("boto", Scope.INVOKE), new.secret_access_key)
    assert lookup("AKIAOTHER") is None
