"""Tags, reserved concurrency, event-invoke and URL configurations in the registry, their
audit entries, and migration 0004 of an existing store (SQLite in a temporary folder)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import column, create_engine, insert, table, text

from impuls.auth import audit
from impuls.errors import (
    AliasNotFound,
    EventConfigNotFound,
    FunctionNotFound,
    InvalidInput,
    UrlConfigExists,
    UrlConfigNotFound,
    VersionNotFound,
)
from impuls.functions.packages import PackageBuilder
from impuls.functions.registry import FunctionRegistry
from impuls.runtimes import default_registry
from impuls.store.blobs import BlobStore
from impuls.store.db import MIGRATIONS, migrate
from tests.unit.test_registry import body, invalid
from tests.unit.test_versions import ALICE, Heard, published

pytestmark = pytest.mark.skipif(not Path("/usr/bin/python3.11").is_file(),
                                reason="the python3.11 runtime needs /usr/bin/python3.11")


@pytest.fixture
def store(tmp_path: Path) -> Heard:
    heard = Heard(tmp_path)
    published(heard)
    heard.registry.create_alias("fn", "live", "1", ALICE)
    heard.heard.clear()
    return heard


# --- tags -------------------------------------------------------------------------------------


def test_tags_are_added_replaced_and_removed(store: Heard) -> None:
    before = store.registry.get("fn")
    tagged = store.registry.tag("fn", {"team": "a", "env": "dev"}, ALICE)
    assert tagged.tags == {"team": "a", "env": "dev"} and tagged.revision_id != before.revision_id
    assert tagged.revision == before.revision  # no new code or configuration
    assert store.registry.tag("fn", {"env": "prod"}, ALICE).tags == {"team": "a", "env": "prod"}
    assert store.registry.untag("fn", ["team", "never-set"], ALICE).tags == {"env": "prod"}
    assert store.registry.get("fn", "1").tags == {"env": "prod"}  # tags belong to the function
    assert store.registry.get("fn").to_api()["tags"] == {"env": "prod"}
    assert store.heard == [("fn", "$LATEST")] * 3
    assert [(a, d) for a, _, d in store.actions() if a.startswith("function.") and "tag" in a] == [
        ("function.tag", {"keys": ["env", "team"]}), ("function.tag", {"keys": ["env"]}),
        ("function.untag", {"keys": ["never-set", "team"]})]


@pytest.mark.parametrize("tags", [
    {"aws:reserved": "x"}, {"": "x"}, {"k" * 129: "x"}, {"k": "v" * 257}, {"k": 1}, ["k"],
    {f"k{i}": "v" for i in range(51)},
])
def test_tag_rules(store: Heard, tags: Any) -> None:
    with pytest.raises(InvalidInput, match=r"^tags:"):
        store.registry.tag("fn", tags, ALICE)
    with pytest.raises(InvalidInput, match=r"^tags:"):
        store.registry.create(body("other", tags=tags))
    assert store.registry.get("fn").tags == {}


def test_tags_on_create_and_their_total(store: Heard) -> None:
    fn = store.registry.create(body("other", tags={f"k{i}": "v" for i in range(50)}))
    assert len(fn.tags) == 50
    with pytest.raises(InvalidInput, match="at most 50"):
        store.registry.tag("other", {"one-more": "v"}, ALICE)
    with pytest.raises(InvalidInput, match=r"^tags:"):
        store.registry.update("other", {"tags": {}})
    with pytest.raises(InvalidInput, match=r"^keys:"):
        store.registry.untag("other", "k1", ALICE)
    with pytest.raises(FunctionNotFound):
        store.registry.tag("ghost", {"a": "b"}, ALICE)


# --- reserved concurrency ---------------------------------------------------------------------


def test_reserved_concurrency(store: Heard) -> None:
    assert store.registry.get("fn").concurrency_limit == 10
    fn = store.registry.put_concurrency("fn", 0, ALICE)
    assert fn.reserved_concurrency == 0 and fn.concurrency_limit == 0
    assert store.registry.get("fn", "1").reserved_concurrency == 0  # every version
    assert store.registry.put_concurrency("fn", 1000, ALICE).concurrency_limit == 1000
    for bad in (-1, 1001, True, 2.5, "3"):
        with pytest.raises(InvalidInput, match=r"^reserved_concurrency:"):
            store.registry.put_concurrency("fn", bad, ALICE)  # type: ignore[arg-type]
    cleared = store.registry.delete_concurrency("fn", ALICE)
    assert cleared.reserved_concurrency is None and cleared.to_api()["reserved_concurrency"] is None
    assert store.heard == [("fn", "$LATEST")] * 3
    assert [d for a, _, d in store.actions() if a == "function.concurrency"] == [
        {"reserved_concurrency": 0}, {"reserved_concurrency": 1000}, {"reserved_concurrency": None}]
    with pytest.raises(InvalidInput, match="reserved_concurrency: read-only"):
        store.registry.update("fn", {"reserved_concurrency": 3})


def test_the_maximum_is_the_servers(tmp_path: Path) -> None:
    registry = FunctionRegistry(Heard(tmp_path).registry.db, BlobStore(tmp_path / "blobs"),
                                default_registry(), PackageBuilder(tmp_path / "p", tmp_path / "c"),
                                max_reserved_concurrency=5)
    registry.create(body("fn"))
    assert registry.put_concurrency("fn", 5).reserved_concurrency == 5
    with pytest.raises(InvalidInput, match="from 0 to 5"):
        registry.put_concurrency("fn", 6)


# --- event-invoke configs ----------------------------------------------------------------------


def test_event_configs_put_update_get_list_delete(store: Heard) -> None:
    put = store.registry.put_event_config("fn", "$LATEST", {"maximum_retry_attempts": 0}, ALICE)
    assert (put.qualifier, put.maximum_retry_attempts, put.maximum_event_age_seconds) == ("$LATEST", 0, 21600)
    assert put.on_success is None and put.on_failure is None
    dest = "arn:aws:lambda:us-east-1:000000000000:function:failures"
    merged = store.registry.put_event_config("fn", "$LATEST", {"on_failure": dest}, ALICE, replace=False)
    assert merged.maximum_retry_attempts == 0 and merged.on_failure == dest  # kept, added
    replaced = store.registry.put_event_config("fn", "$LATEST", {"maximum_event_age_seconds": 60}, ALICE)
    assert replaced.maximum_retry_attempts == 2 and replaced.on_failure is None  # defaults again
    store.registry.put_event_config("fn", "live", {}, ALICE)
    store.registry.put_event_config("fn", "1", {"on_success": dest}, ALICE)
    assert [c.qualifier for c in store.registry.list_event_configs("fn")] == ["$LATEST", "1", "live"]
    assert store.registry.get_event_config("fn", "1").to_api()["on_success"] == dest
    store.registry.delete_event_config("fn", "$LATEST", ALICE)
    with pytest.raises(EventConfigNotFound):
        store.registry.get_event_config("fn", "$LATEST")
    with pytest.raises(EventConfigNotFound):
        store.registry.delete_event_config("fn", "$LATEST", ALICE)
    with pytest.raises(EventConfigNotFound):
        store.registry.put_event_config("fn", "$LATEST", {}, ALICE, replace=False)
    store.registry.delete_alias("fn", "live", ALICE)  # its configuration goes with it
    assert [c.qualifier for c in store.registry.list_event_configs("fn")] == ["1"]
    assert [a for a, _, _ in store.actions() if a.startswith("event_config.")] == [
        "event_config.put"] * 5 + ["event_config.delete"]


@pytest.mark.parametrize(("fields", "field"), [
    ({"maximum_retry_attempts": 3}, "maximum_retry_attempts"),
    ({"maximum_retry_attempts": -1}, "maximum_retry_attempts"),
    ({"maximum_retry_attempts": True}, "maximum_retry_attempts"),
    ({"maximum_event_age_seconds": 59}, "maximum_event_age_seconds"),
    ({"maximum_event_age_seconds": 21601}, "maximum_event_age_seconds"),
    ({"on_success": "not-an-arn"}, "on_success"),
    ({"on_failure": "arn:aws:sqs:" + "x" * 400}, "on_failure"),
    ({"bogus": 1}, "bogus"),
])
def test_event_config_rules(store: Heard, fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput, match=rf"^{field}:"):
        store.registry.put_event_config("fn", "$LATEST", fields, ALICE)
    assert store.registry.list_event_configs("fn") == []


def test_event_config_qualifiers_must_exist(store: Heard) -> None:
    with pytest.raises(VersionNotFound):
        store.registry.put_event_config("fn", "7", {}, ALICE)
    with pytest.raises(AliasNotFound):
        store.registry.put_event_config("fn", "nope", {}, ALICE)
    with pytest.raises(FunctionNotFound):
        store.registry.put_event_config("ghost", "$LATEST", {}, ALICE)
    with pytest.raises(InvalidInput, match=r"^qualifier:"):
        store.registry.put_event_config("fn", "", {}, ALICE)


# --- function URL configs -------------------------------------------------------------------


def test_url_configs_create_update_get_list_delete(store: Heard) -> None:
    cors = {"allow_origins": ["https://example.com"], "allow_methods": ["GET", "post"], "max_age": 60,
            "allow_credentials": True}
    url = store.registry.put_url_config("fn", "$LATEST", {"auth_type": "NONE", "cors": cors}, ALICE,
                                        create=True)
    assert (url.auth_type, url.invoke_mode, url.cors) == ("NONE", "BUFFERED", cors)
    assert len(url.url_id) == 32 and url.url_id.isalnum() and url.url_id.islower()
    with pytest.raises(UrlConfigExists):
        store.registry.put_url_config("fn", "$LATEST", {"auth_type": "NONE"}, ALICE, create=True)
    changed = store.registry.put_url_config("fn", "$LATEST", {"invoke_mode": "RESPONSE_STREAM"}, ALICE,
                                            create=False)
    assert (changed.auth_type, changed.invoke_mode, changed.cors, changed.url_id) == (
        "NONE", "RESPONSE_STREAM", cors, url.url_id)
    assert changed.created_at == url.created_at and changed.updated_at >= url.updated_at
    with pytest.raises(UrlConfigNotFound):
        store.registry.put_url_config("fn", "live", {"auth_type": "KEY"}, ALICE, create=False)
    store.registry.put_url_config("fn", "live", {"auth_type": "AWS_IAM"}, ALICE)
    assert [u.qualifier for u in store.registry.list_url_configs("fn")] == ["$LATEST", "live"]
    assert store.registry.find_url(url.url_id).qualifier == "$LATEST"
    assert store.registry.get_url_config("fn", "live").to_api()["auth_type"] == "AWS_IAM"
    store.registry.delete_url_config("fn", "$LATEST", ALICE)
    with pytest.raises(UrlConfigNotFound):
        store.registry.find_url(url.url_id)
    with pytest.raises(UrlConfigNotFound):
        store.registry.delete_url_config("fn", "$LATEST", ALICE)
    store.registry.delete_alias("fn", "live", ALICE)
    assert store.registry.list_url_configs("fn") == []
    assert [a for a, _, _ in store.actions() if a.startswith("url.")] == ["url.put"] * 3 + ["url.delete"]


@pytest.mark.parametrize(("qualifier", "fields", "error", "match"), [
    ("$LATEST", {}, InvalidInput, "^auth_type: required"),
    ("$LATEST", {"auth_type": "OPEN"}, InvalidInput, "^auth_type:"),
    ("$LATEST", {"auth_type": "NONE", "invoke_mode": "FAST"}, InvalidInput, "^invoke_mode:"),
    ("$LATEST", {"auth_type": "NONE", "cors": {"allow_methods": ["TRACE"]}}, InvalidInput, "^cors.allow"),
    ("$LATEST", {"auth_type": "NONE", "cors": {"max_age": 86401}}, InvalidInput, "^cors.max_age"),
    ("$LATEST", {"auth_type": "NONE", "cors": {"allow_origins": "*"}}, InvalidInput, "^cors.allow_origins"),
    ("$LATEST", {"auth_type": "NONE", "cors": {"allow_credentials": "yes"}}, InvalidInput, "^cors.allow_cr"),
    ("$LATEST", {"auth_type": "NONE", "cors": {"origins": []}}, InvalidInput, "^cors.origins"),
    ("$LATEST", {"auth_type": "NONE", "extra": 1}, InvalidInput, "^extra:"),
    ("1", {"auth_type": "NONE"}, InvalidInput, "^qualifier: must be \\$LATEST or an alias"),
    ("nope", {"auth_type": "NONE"}, AliasNotFound, "nope"),
])
def test_url_config_rules(store: Heard, qualifier: str, fields: dict[str, Any], error: type[Exception],
                          match: str) -> None:
    with pytest.raises(error, match=match):
        store.registry.put_url_config("fn", qualifier, fields, ALICE)
    assert store.registry.list_url_configs("fn") == []


# --- audit ----------------------------------------------------------------------------------


def test_every_action_is_audited_with_its_actor_and_failures_are_not(store: Heard) -> None:
    entries_before = len(store.actions())
    with pytest.raises(AliasNotFound):
        store.registry.update_alias("fn", "nope", ALICE, description="x")
    with pytest.raises(InvalidInput):
        store.registry.put_concurrency("fn", -1, ALICE)
    assert len(store.actions()) == entries_before
    entries, _ = audit.query(store.registry.db, 100, 0)
    mine = [e for e in entries if e["key_name"] == "alice"]
    assert {e["action"] for e in mine} == {"function.publish", "alias.create"}
    assert all(e["source"] == "10.0.0.1" for e in mine)


# --- migration ---------------------------------------------------------------------------------


# --- init once ----------------------------------------------------------------------------------


def test_init_once_is_on_by_default_and_kept_by_updates_and_versions(store: Heard) -> None:
    assert store.registry.get("fn").init_once is True
    off = store.registry.create(body("other", init_once=False))
    assert off.init_once is False and off.to_api()["init_once"] is False
    on = store.registry.update("other", {"init_once": True})
    assert on.init_once is True and on.revision == off.revision + 1  # a new revision: a new template
    assert store.registry.publish("other").init_once is True
    store.registry.update("other", {"init_once": False})
    assert store.registry.get("other", "1").init_once is True  # the version keeps its own
    assert store.registry.get("other").init_once is False


@pytest.mark.parametrize("value", ["false", 0, None])
def test_init_once_must_be_a_boolean(store: Heard, value: Any) -> None:
    invalid(lambda: store.registry.create(body("other", init_once=value)), "init_once")


def test_migration_0004_makes_existing_functions_active(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    engine = create_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    blobs = BlobStore(tmp_path / "blobs")
    sha = blobs.put(b"def handler(e, c):\n    return 1\n")
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(insert(table("functions", *(column(c) for c in _COLUMNS_0003))).values(
            id=str(uuid.uuid4()), name="old", description="", runtime="python3.11",
            handler="handler.handler", code_sha256=sha, code_size=31, code_kind="source", memory_mb=128,
            timeout_sec=3, environment="{}", status="active", max_concurrency=10, ephemeral_storage_mb=512,
            revision=4, created_at=now, updated_at=now))
    migrate(engine)
    with engine.connect() as conn:
        head = ScriptDirectory.from_config(cfg).get_current_head()
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == head
    registry = FunctionRegistry(engine, blobs, default_registry(),
                                PackageBuilder(tmp_path / "p", tmp_path / "c"))
    fn = registry.get("old")
    assert (fn.state, fn.last_update_status, fn.runtime_given, fn.revision) == (
        "Active", "Successful", "python3.11", 4)
    assert len(fn.revision_id) == 36 and fn.tags == {} and fn.role == "" and fn.reserved_concurrency is None
    assert fn.init_once is True  # migration 0010: existing functions keep the default
    assert registry.publish("old").version == "1"
    assert json.loads(json.dumps(fn.to_api()))["state"] == "Active"
    assert registry.collect_garbage() == 0


_COLUMNS_0003 = ("id", "name", "description", "runtime", "handler", "code_sha256", "code_size", "code_kind",
                 "memory_mb", "timeout_sec", "environment", "status", "max_concurrency",
                 "ephemeral_storage_mb", "revision", "created_at", "updated_at")
