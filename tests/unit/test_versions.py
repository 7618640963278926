"""Versions and aliases in the registry, on SQLite in a temporary folder (no server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from impuls.auth import audit
from impuls.auth.audit import Actor
from impuls.errors import (
    AliasExists,
    AliasNotFound,
    FunctionNotFound,
    InvalidInput,
    PreconditionFailed,
    VersionInUse,
    VersionNotFound,
)
from impuls.functions.aliases import Route
from tests.unit.test_registry import OTHER_SOURCE, SOURCE, Store, body

pytestmark = pytest.mark.skipif(not Path("/usr/bin/python3.11").is_file(),
                                reason="the python3.11 runtime needs /usr/bin/python3.11")
ALICE = Actor("alice", "10.0.0.1")


class Heard(Store):
    """A Store whose listener keeps (name, qualifier)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.heard: list[tuple[str, str | None]] = []
        self.registry.on_change(lambda name, qualifier: self.heard.append((name, qualifier)))

    def actions(self) -> list[tuple[str, str, dict[str, Any]]]:
        """The audit log, oldest first: (action, target, detail)."""
        entries, _ = audit.query(self.registry.db, 1000, 0)
        return [(e["action"], e["target"], e["detail"]) for e in reversed(entries)]


@pytest.fixture
def store(tmp_path: Path) -> Heard:
    return Heard(tmp_path)


def published(store: Heard, name: str = "fn", **fields: Any) -> None:
    """``name`` with version 1 (SOURCE, memory 128) and $LATEST (OTHER_SOURCE, memory 256)."""
    store.registry.create(body(name, **fields))
    store.registry.publish(name, ALICE)
    store.registry.update(name, {"code": OTHER_SOURCE, "memory_mb": 256})


# --- publish ----------------------------------------------------------------------------


def test_publish_freezes_code_and_configuration(store: Heard) -> None:
    created = store.registry.create(body("fn", description="first", environment={"A": "1"}))
    v1 = store.registry.publish("fn", ALICE)
    assert v1.version == "1" and v1.description == "first" and v1.revision_id != created.revision_id
    assert (v1.id, v1.code_sha256, v1.environment) == (created.id, created.code_sha256, {"A": "1"})
    store.registry.update("fn", {"code": OTHER_SOURCE, "environment": {"A": "2"}, "memory_mb": 512})
    latest, frozen = store.registry.get("fn"), store.registry.get("fn", "1")
    assert latest.version == "$LATEST" and latest.environment == {"A": "2"} and latest.memory_mb == 512
    assert frozen == v1 and frozen.memory_mb == 128
    assert store.registry.code(frozen).data == SOURCE.encode()
    assert store.registry.code(latest).data == OTHER_SOURCE.encode()
    assert (store.registry.package(frozen).directory / "handler.py").read_text() == SOURCE
    v2 = store.registry.publish("fn", ALICE, description="second")
    assert v2.version == "2" and v2.description == "second" and v2.memory_mb == 512
    assert [f.version for f in store.registry.versions("fn")] == ["$LATEST", "1", "2"]
    assert [f.to_api()["version"] for f in store.registry.versions("fn")] == ["$LATEST", "1", "2"]
    assert [a for a, _, _ in store.actions()].count("function.publish") == 2
    assert ("function.publish", "fn", {"version": 2, "code_sha256": v2.code_sha256}) in store.actions()


def test_publish_without_a_change_returns_the_newest_version(store: Heard) -> None:
    store.registry.create(body("fn"))
    first = store.registry.publish("fn", ALICE)
    assert store.registry.publish("fn", ALICE, description="again") == first
    store.registry.tag("fn", {"team": "a"}, ALICE)  # tags belong to the function, not a version
    assert store.registry.publish("fn", ALICE).version == "1"
    store.registry.update("fn", {"timeout_sec": 9})
    assert store.registry.publish("fn", ALICE).version == "2"
    assert [a for a, _, _ in store.actions()].count("function.publish") == 2


def test_version_numbers_are_never_reused(store: Heard) -> None:
    published(store)
    store.registry.publish("fn", ALICE)
    store.registry.delete("fn", ALICE, "2")
    store.registry.update("fn", {"timeout_sec": 5})
    assert store.registry.publish("fn", ALICE).version == "3"
    assert [f.version for f in store.registry.versions("fn")] == ["$LATEST", "1", "3"]


def test_publish_preconditions(store: Heard) -> None:
    fn = store.registry.create(body("fn"))
    with pytest.raises(InvalidInput, match=r"^code_sha256:"):
        store.registry.publish("fn", ALICE, code_sha256="0" * 64)
    with pytest.raises(PreconditionFailed, match="revision_id"):
        store.registry.publish("fn", ALICE, revision_id="not-the-current-one")
    with pytest.raises(InvalidInput, match=r"^description:"):
        store.registry.publish("fn", ALICE, description="d" * 257)
    with pytest.raises(FunctionNotFound):
        store.registry.publish("ghost", ALICE)
    assert store.registry.versions("fn") == [fn]
    v1 = store.registry.publish("fn", ALICE, code_sha256=fn.code_sha256, revision_id=fn.revision_id)
    assert v1.version == "1"


def test_qualifiers_of_get(store: Heard) -> None:
    published(store)
    store.registry.create_alias("fn", "live", "1", ALICE)
    store.registry.create_alias("fn", "edge", "$LATEST", ALICE)
    assert store.registry.get("fn", "$LATEST") == store.registry.get("fn")
    assert store.registry.get("fn", "live") == store.registry.get("fn", "1")
    assert store.registry.get("fn", "edge") == store.registry.get("fn")
    assert store.registry.get("fn", "01").version == "1"
    with pytest.raises(VersionNotFound, match="'fn:7' not found"):
        store.registry.get("fn", "7")
    with pytest.raises(AliasNotFound, match="'fn:nope' not found"):
        store.registry.get("fn", "nope")
    with pytest.raises(FunctionNotFound):
        store.registry.get("ghost", "1")
    with pytest.raises(FunctionNotFound):
        store.registry.versions("ghost")


# --- deleting -----------------------------------------------------------------------------


def test_deleting_a_version_an_alias_uses_is_refused(store: Heard) -> None:
    published(store)
    store.registry.publish("fn", ALICE)
    store.registry.create_alias("fn", "live", "1", ALICE)
    store.registry.create_alias("fn", "canary", "2", ALICE, weights={"1": 0.1})
    with pytest.raises(VersionInUse) as caught:
        store.registry.delete("fn", ALICE, "1")
    assert caught.value.aliases == ["canary", "live"]
    store.registry.delete_alias("fn", "live", ALICE)
    with pytest.raises(VersionInUse, match="'canary'"):  # as its additional version
        store.registry.delete("fn", ALICE, "1")
    store.registry.update_alias("fn", "canary", ALICE, weights={})
    store.heard.clear()
    store.registry.delete("fn", ALICE, "1")
    assert store.heard == [("fn", "1")]
    with pytest.raises(VersionNotFound):
        store.registry.get("fn", "1")
    assert ("version.delete", "fn", {"version": 1}) in store.actions()


def test_delete_qualifiers_that_are_not_versions(store: Heard) -> None:
    published(store)
    store.registry.create_alias("fn", "live", "1", ALICE)
    for qualifier in ("$LATEST", "live"):
        with pytest.raises(InvalidInput, match=r"^qualifier:"):
            store.registry.delete("fn", ALICE, qualifier)
    with pytest.raises(VersionNotFound):
        store.registry.delete("fn", ALICE, "9")
    assert [f.version for f in store.registry.versions("fn")] == ["$LATEST", "1"]


def test_version_blobs_live_as_long_as_the_version(store: Heard) -> None:
    published(store)
    v1, latest = store.registry.get("fn", "1"), store.registry.get("fn")
    assert store.blob_shas() == {v1.code_sha256, latest.code_sha256}
    assert store.registry.collect_garbage() == 0  # a version's blob is not garbage
    store.registry.update("fn", {"code": "def handler(e, c):\n    return 3\n"})
    assert v1.code_sha256 in store.blob_shas() and latest.code_sha256 not in store.blob_shas()
    store.registry.delete("fn", ALICE, "1")
    assert store.blob_shas() == {store.registry.get("fn").code_sha256}


def test_deleting_the_function_deletes_everything_it_has(store: Heard) -> None:
    published(store)
    store.registry.create_alias("fn", "live", "1", ALICE)
    store.registry.put_event_config("fn", "live", {"maximum_retry_attempts": 1}, ALICE)
    store.registry.put_url_config("fn", "$LATEST", {"auth_type": "NONE"}, ALICE)
    store.heard.clear()
    store.registry.delete("fn", ALICE)
    assert store.heard == [("fn", None)]
    assert store.blob_shas() == set()
    store.registry.create(body("fn"))  # a new function of that name starts empty
    assert [f.version for f in store.registry.versions("fn")] == ["$LATEST"]
    assert store.registry.list_aliases("fn") == [] and store.registry.list_event_configs("fn") == []
    assert store.registry.list_url_configs("fn") == []
    assert store.registry.publish("fn", ALICE).version == "1"


# --- aliases ------------------------------------------------------------------------------


def test_alias_create_get_list_update_delete(store: Heard) -> None:
    published(store)
    store.registry.publish("fn", ALICE)
    store.heard.clear()
    live = store.registry.create_alias("fn", "live", "1", ALICE, description="prod")
    assert (live.function_name, live.name, live.function_version, live.description, live.weights) == (
        "fn", "live", "1", "prod", {})
    assert live.to_api()["routing"] == {} and live.to_api()["created_at"].endswith("Z")
    store.registry.create_alias("fn", "beta", "2", ALICE, weights={"1": 0.25})
    assert store.registry.get_alias("fn", "beta").weights == {"1": 0.25}
    assert [a.name for a in store.registry.list_aliases("fn")] == ["beta", "live"]
    assert [a.name for a in store.registry.list_aliases("fn", "1")] == ["live"]
    moved = store.registry.update_alias("fn", "live", ALICE, version="2", revision_id=live.revision_id)
    assert moved.function_version == "2" and moved.description == "prod"
    assert moved.revision_id != live.revision_id and moved.updated_at >= live.updated_at
    with pytest.raises(PreconditionFailed):
        store.registry.update_alias("fn", "live", ALICE, description="x", revision_id=live.revision_id)
    store.registry.delete_alias("fn", "live", ALICE)
    with pytest.raises(AliasNotFound):
        store.registry.get_alias("fn", "live")
    with pytest.raises(AliasNotFound):
        store.registry.delete_alias("fn", "live", ALICE)
    assert store.heard == [("fn", "alias:live"), ("fn", "alias:beta"), ("fn", "alias:live"),
                           ("fn", "alias:live")]
    assert [(a, t) for a, t, _ in store.actions() if a.startswith("alias.")] == [
        ("alias.create", "fn:live"), ("alias.create", "fn:beta"), ("alias.update", "fn:live"),
        ("alias.delete", "fn:live")]


def test_alias_names_follow_lambdas_rule(store: Heard) -> None:
    published(store)
    for bad in ("123", "", "a" * 129, "has space", "$LATEST", "dot.ted", 7):
        with pytest.raises(InvalidInput, match=r"^name:"):
            store.registry.create_alias("fn", bad, "1", ALICE)  # type: ignore[arg-type]
    for good in ("v1", "1a", "a-b_C", "x" * 128):
        assert store.registry.create_alias("fn", good, "1", ALICE).name == good
    with pytest.raises(AliasExists, match="'fn:v1' already exists"):
        store.registry.create_alias("fn", "v1", "$LATEST", ALICE)
    with pytest.raises(FunctionNotFound):
        store.registry.create_alias("ghost", "v1", "1", ALICE)


@pytest.mark.parametrize(("version", "weights", "error", "match"), [
    ("7", None, VersionNotFound, "fn:7"),
    ("latest", None, InvalidInput, "^function_version:"),
    (1, None, InvalidInput, "^function_version:"),
    ("1", {"2": 0.5, "3": 0.1}, InvalidInput, "at most one"),
    ("1", {"9": 0.5}, VersionNotFound, "fn:9"),
    ("1", {"1": 0.5}, InvalidInput, "already the alias's version"),
    ("1", {"$LATEST": 0.5}, InvalidInput, "published version"),
    ("$LATEST", {"1": 0.5}, InvalidInput, "not \\$LATEST"),
    ("1", {"2": 1.5}, InvalidInput, "0.0 to 1.0"),
    ("1", {"2": -0.1}, InvalidInput, "0.0 to 1.0"),
    ("1", {"2": True}, InvalidInput, "0.0 to 1.0"),
    ("1", {"2": "0.5"}, InvalidInput, "0.0 to 1.0"),
    ("1", [["2", 0.5]], InvalidInput, "^routing:"),
])
def test_alias_targets_and_weights_are_checked(store: Heard, version: Any, weights: Any,
                                               error: type[Exception], match: str) -> None:
    published(store)
    store.registry.publish("fn", ALICE)
    with pytest.raises(error, match=match):
        store.registry.create_alias("fn", "a", version, ALICE, weights=weights)
    assert store.registry.list_aliases("fn") == []
    store.registry.create_alias("fn", "a", "2", ALICE)
    with pytest.raises(error, match=match):
        store.registry.update_alias("fn", "a", ALICE, version=version, weights=weights)
    assert store.registry.get_alias("fn", "a").function_version == "2"


def test_moving_an_alias_checks_its_routing_again(store: Heard) -> None:
    published(store)
    store.registry.publish("fn", ALICE)
    store.registry.create_alias("fn", "a", "2", ALICE, weights={"1": 0.5})
    with pytest.raises(InvalidInput, match="already the alias's version"):
        store.registry.update_alias("fn", "a", ALICE, version="1")
    with pytest.raises(InvalidInput, match="not \\$LATEST"):
        store.registry.update_alias("fn", "a", ALICE, version="$LATEST")
    edge = store.registry.update_alias("fn", "a", ALICE, version="$LATEST", weights={})
    assert edge.function_version == "$LATEST" and edge.weights == {}


@pytest.mark.parametrize(("weight", "draws", "picked"), [
    (0.3, [0.0, 0.29, 0.3, 0.99], ["2", "2", "1", "1"]),
    (0.0, [0.0, 0.5], ["1", "1"]),
    (1.0, [0.0, 0.999999], ["2", "2"]),
])
def test_route_picks_the_additional_version_with_the_weights_probability(
        store: Heard, weight: float, draws: list[float], picked: list[str]) -> None:
    published(store)
    store.registry.publish("fn", ALICE)
    store.registry.create_alias("fn", "live", "1", ALICE, weights={"2": weight})
    route = store.registry.route("fn", "live")
    assert route == Route("1", "2", weight)
    assert [route.pick(d) for d in draws] == picked
    assert store.registry.route("fn", None) == Route("$LATEST") == store.registry.route("fn", "$LATEST")
    assert store.registry.route("fn", "02") == Route("2")
    with pytest.raises(AliasNotFound):
        store.registry.route("fn", "nope")
