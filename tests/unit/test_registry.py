"""The function registry and its models, on a SQLite file and a blob directory (no server)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from impuls.errors import FunctionExists, FunctionNotFound, InvalidInput
from impuls.functions.models import MAX_ENV_BYTES, Code, Function
from impuls.functions.packages import PackageBuilder
from impuls.functions.registry import FunctionRegistry
from impuls.runtimes import default_registry
from impuls.store.blobs import BlobStore
from impuls.store.db import open_engine
from tests.helpers import make_zip

pytestmark = pytest.mark.skipif(not Path("/usr/bin/python3.11").is_file(),
                                reason="the python3.11 runtime needs /usr/bin/python3.11")

SOURCE = "def handler(event, context):\n    return {'ok': True}\n"
OTHER_SOURCE = "def handler(event, context):\n    return {'ok': False}\n"


class Store:
    """A registry on a fresh store under ``tmp_path``, with what it announced."""

    def __init__(self, root: Path) -> None:
        self.blobs = BlobStore(root / "blobs")
        self.packages = PackageBuilder(root / "packages", root / "build-cache")
        self.registry = FunctionRegistry(open_engine(f"sqlite:///{root}/impuls.db"), self.blobs,
                                         default_registry(), self.packages)
        self.changes: list[str] = []
        self.registry.on_change(lambda name, _qualifier: self.changes.append(name))

    def blob_shas(self) -> set[str]:
        return set(self.blobs.all())


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path)


def body(name: str = "fn", **fields: Any) -> dict[str, Any]:
    """A valid create body (python3.11, single-file code) with ``fields`` on top."""
    out: dict[str, Any] = {"name": name, "runtime": "python3.11", "handler": "handler.handler",
                           "code": SOURCE}
    out.update(fields)
    return out


def invalid(call: Callable[[], Any], field: str) -> str:
    """Run ``call``, expect InvalidInput whose message starts with ``field:``; return the message."""
    with pytest.raises(InvalidInput) as caught:
        call()
    assert caught.value.message.startswith(f"{field}:"), caught.value.message
    return caught.value.message


# --- create / get / list / delete ------------------------------------------------------


def test_create_applies_defaults_and_get_reads_it_back(store: Store) -> None:
    fn = store.registry.create(body("hello", runtime="python3", environment={"A": "1"}))
    assert fn.name == "hello" and fn.runtime == "python3.11"  # alias normalised to the id
    assert (fn.memory_mb, fn.timeout_sec, fn.status, fn.max_concurrency, fn.ephemeral_storage_mb) == (
        128, 30, "active", 10, 512)
    assert fn.description == "" and fn.environment == {"A": "1"}
    assert fn.revision == 1 and fn.code_kind == "source"
    assert fn.code_size == len(SOURCE.encode())
    assert fn.created_at == fn.updated_at and fn.created_at.utcoffset() is not None
    assert fn.code_sha256 in store.blob_shas()
    assert store.registry.get("hello") == fn
    assert store.registry.code(fn) == Code("source", SOURCE.encode())
    api = fn.to_api(store.registry.code(fn))
    assert api["code"] == SOURCE and api["environment"] == {"A": "1"}
    assert api["created_at"].endswith("Z")
    package = store.registry.package(fn)
    assert (package.directory / "handler.py").read_text() == SOURCE


def test_create_with_a_zip(store: Store) -> None:
    code_zip = make_zip({"src/app.py": SOURCE, "src/util.py": "X = 1\n"})
    fn = store.registry.create(body("zipped", handler="src/app.handler", code=None, code_zip=code_zip))
    assert fn.code_kind == "zip" and fn.handler == "src/app.handler"
    assert store.registry.code(fn).data == base64.b64decode(code_zip)
    assert (store.registry.package(fn).directory / "src" / "util.py").read_text() == "X = 1\n"


def test_duplicate_create_is_function_exists_and_leaves_no_stray_blob(store: Store) -> None:
    first = store.registry.create(body("dup"))
    with pytest.raises(FunctionExists) as caught:
        store.registry.create(body("dup", code=OTHER_SOURCE, memory_mb=512))
    assert caught.value.name == "dup"
    assert store.registry.get("dup") == first
    assert store.blob_shas() == {first.code_sha256}  # the loser's blob was removed
    assert store.changes == ["dup"]


def test_missing_function_is_not_found(store: Store) -> None:
    with pytest.raises(FunctionNotFound):
        store.registry.get("ghost")
    with pytest.raises(FunctionNotFound):
        store.registry.update("ghost", {"memory_mb": 256})
    with pytest.raises(FunctionNotFound):
        store.registry.delete("ghost")
    assert store.changes == []


def test_list_pages_in_name_order_with_the_total(store: Store) -> None:
    names = [f"fn-{i:02d}" for i in range(7)]
    for name in reversed(names):
        store.registry.create(body(name))
    page, total = store.registry.list(limit=3)
    assert [f.name for f in page] == names[:3] and total == 7
    page, total = store.registry.list(limit=3, offset=3)
    assert [f.name for f in page] == names[3:6] and total == 7
    page, total = store.registry.list(limit=3, offset=6)
    assert [f.name for f in page] == names[6:] and total == 7
    page, total = store.registry.list(limit=100, offset=50)
    assert page == [] and total == 7
    assert [f.name for f in store.registry.list()[0]] == names


def test_list_bounds_name_the_parameter(store: Store) -> None:
    invalid(lambda: store.registry.list(limit=0), "limit")
    invalid(lambda: store.registry.list(limit=1001), "limit")
    invalid(lambda: store.registry.list(offset=-1), "offset")
    assert store.registry.list(limit=1000) == ([], 0)


def test_list_items_carry_environment_keys_but_never_values(store: Store) -> None:
    store.registry.create(body("secretive", environment={"DB_PASSWORD": "hunter2", "API_KEY": "s3cr3t"}))
    [fn], _ = store.registry.list()
    item = fn.to_api(list_item=True)
    assert item["environment"] == ["API_KEY", "DB_PASSWORD"]
    text = json.dumps(item)
    assert "hunter2" not in text and "s3cr3t" not in text
    assert "code" not in item and "code_zip" not in item
    assert fn.to_api()["environment"] == {"DB_PASSWORD": "hunter2", "API_KEY": "s3cr3t"}


def test_delete_removes_the_function_and_its_blob(store: Store) -> None:
    fn = store.registry.create(body("doomed"))
    store.registry.delete("doomed")
    with pytest.raises(FunctionNotFound):
        store.registry.get("doomed")
    assert store.registry.list() == ([], 0)
    assert fn.code_sha256 not in store.blob_shas()
    assert store.changes == ["doomed", "doomed"]
    again = store.registry.create(body("doomed"))  # the name is free again
    assert again.revision == 1 and again.id != fn.id


# --- update -----------------------------------------------------------------------------


def test_partial_update_merges_onto_the_stored_function(store: Store) -> None:
    created = store.registry.create(body("upd", description="v1", environment={"A": "1"}, memory_mb=256))
    updated = store.registry.update("upd", {"timeout_sec": 60})
    assert updated.timeout_sec == 60
    assert (updated.description, updated.environment, updated.memory_mb) == ("v1", {"A": "1"}, 256)
    assert updated.revision == 2 and updated.id == created.id
    assert updated.code_sha256 == created.code_sha256
    assert updated.created_at == created.created_at and updated.updated_at > created.updated_at
    assert store.registry.get("upd") == updated

    again = store.registry.update("upd", {"name": "upd", "environment": {}, "status": "inactive"})
    assert again.revision == 3 and again.environment == {} and again.status == "inactive"
    assert again.timeout_sec == 60
    assert store.changes == ["upd", "upd", "upd"]


def test_update_cannot_rename(store: Store) -> None:
    store.registry.create(body("fixed"))
    invalid(lambda: store.registry.update("fixed", {"name": "renamed"}), "name")
    assert store.registry.get("fixed").revision == 1
    with pytest.raises(FunctionNotFound):
        store.registry.get("renamed")


def test_update_is_validated_like_create(store: Store) -> None:
    store.registry.create(body("strict"))
    for change, field in [
        ({"memory_mb": 64}, "memory_mb"),
        ({"memory_mb": "256"}, "memory_mb"),
        ({"timeout_sec": 901}, "timeout_sec"),
        ({"runtime": "cobol85"}, "runtime"),
        ({"handler": "no-dot"}, "handler"),
        ({"environment": {"AWS_LAMBDA_X": "1"}}, "environment"),
        ({"bogus": 1}, "bogus"),
        ({"revision": 7}, "revision"),
        ({"code": SOURCE, "code_zip": make_zip({"handler.py": SOURCE})}, "code"),
        ({"code_zip": "!!!"}, "code_zip"),
        ({"code_zip": make_zip({"other.py": SOURCE})}, "code_zip"),
    ]:
        with pytest.raises(InvalidInput, match=rf"^{re.escape(field)}:"):
            store.registry.update("strict", change)
    assert store.registry.get("strict").revision == 1
    assert store.changes == ["strict"]


def test_failed_update_leaves_the_stored_version_intact(store: Store) -> None:
    code_zip = make_zip({"app.py": SOURCE})
    before = store.registry.create(body("keep", handler="app.handler", code=None, code_zip=code_zip,
                                        environment={"K": "v"}))
    blobs = store.blob_shas()
    # a valid field next to an invalid one: nothing of the update is applied
    invalid(lambda: store.registry.update("keep", {"description": "new", "memory_mb": 1}), "memory_mb")
    # a new handler that the stored zip does not contain
    invalid(lambda: store.registry.update("keep", {"handler": "missing.handler"}), "code_zip")
    # new code without the handler's module: its blob is never written
    invalid(lambda: store.registry.update("keep", {"code_zip": make_zip({"x.py": OTHER_SOURCE})}),
            "code_zip")
    after = store.registry.get("keep")
    assert after == before
    assert store.registry.code(after).data == base64.b64decode(code_zip)
    assert store.blob_shas() == blobs
    assert store.changes == ["keep"]


def test_update_changed_concurrently_is_refused_and_its_blob_removed(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    original = store.registry.create(body("raced"))
    build = store.registry._build
    raced: list[bool] = []

    def build_then_race(*args: Any) -> None:
        build(*args)
        if not raced:  # another writer commits while this update is being built
            raced.append(True)
            store.registry.update("raced", {"description": "the other writer"})

    monkeypatch.setattr(store.registry, "_build", build_then_race)
    with pytest.raises(InvalidInput, match="'raced' was changed concurrently"):
        store.registry.update("raced", {"code": OTHER_SOURCE})
    stored = store.registry.get("raced")
    assert stored.description == "the other writer" and stored.revision == 2
    assert stored.code_sha256 == original.code_sha256
    assert store.blob_shas() == {original.code_sha256}  # the refused update's blob is gone


def test_update_code_switches_kind_and_replaces_the_blob(store: Store) -> None:
    old = store.registry.create(body("swap"))
    code_zip = make_zip({"handler.py": OTHER_SOURCE})
    new = store.registry.update("swap", {"code": None, "code_zip": code_zip})
    assert new.code_kind == "zip" and new.revision == 2
    assert new.code_sha256 != old.code_sha256
    assert store.blob_shas() == {new.code_sha256}  # the replaced blob is deleted
    assert store.registry.code(new).data == base64.b64decode(code_zip)


def test_update_with_the_same_code_keeps_the_blob(store: Store) -> None:
    fn = store.registry.create(body("same"))
    again = store.registry.update("same", {"code": SOURCE})
    assert again.code_sha256 == fn.code_sha256 and again.revision == 2
    assert store.blob_shas() == {fn.code_sha256}
    assert store.registry.code(again).data == SOURCE.encode()


# --- blobs ----------------------------------------------------------------------------------


def test_shared_code_blob_lives_until_no_function_uses_it(store: Store) -> None:
    a = store.registry.create(body("a"))
    b = store.registry.create(body("b"))
    assert a.code_sha256 == b.code_sha256 and store.blob_shas() == {a.code_sha256}
    store.registry.update("a", {"code": OTHER_SOURCE})  # a moves away; b still uses it
    assert a.code_sha256 in store.blob_shas()
    assert store.registry.code(store.registry.get("b")).data == SOURCE.encode()
    store.registry.create(body("c"))
    store.registry.delete("b")
    assert a.code_sha256 in store.blob_shas()  # c uses it
    store.registry.delete("c")
    assert a.code_sha256 not in store.blob_shas()
    assert store.blob_shas() == {store.registry.get("a").code_sha256}


def test_collect_garbage_removes_only_stray_blobs(store: Store) -> None:
    fn = store.registry.create(body("kept"))
    stray = store.blobs.put(b"left behind by a crash")
    assert store.blob_shas() == {fn.code_sha256, stray}
    assert store.registry.collect_garbage() == 1
    assert store.blob_shas() == {fn.code_sha256}
    assert store.registry.collect_garbage() == 0
    assert store.registry.code(store.registry.get("kept")).data == SOURCE.encode()


# --- listeners --------------------------------------------------------------------------------


def test_change_listeners_hear_each_committed_change(store: Store) -> None:
    heard: list[tuple[str, int | None]] = []

    def listener(name: str, _qualifier: str | None) -> None:  # called after the commit: visible
        try:
            heard.append((name, store.registry.get(name).revision))
        except FunctionNotFound:
            heard.append((name, None))

    store.registry.on_change(listener)
    store.registry.create(body("l1"))
    store.registry.create(body("l2"))
    store.registry.update("l1", {"memory_mb": 512})
    with pytest.raises(InvalidInput):
        store.registry.update("l1", {"memory_mb": 5})
    with pytest.raises(FunctionExists):
        store.registry.create(body("l2"))
    store.registry.delete("l2")
    assert heard == [("l1", 1), ("l2", 1), ("l1", 2), ("l2", None)]
    assert store.changes == ["l1", "l2", "l1", "l2"]  # every listener, in order


# --- validation on create ----------------------------------------------------------------------


@pytest.mark.parametrize("fields,field", [
    ({"name": "-leading-dash"}, "name"),
    ({"name": "has space"}, "name"),
    ({"name": "x" * 65}, "name"),
    ({"name": ""}, "name"),
    ({"memory_mb": 127}, "memory_mb"),
    ({"memory_mb": 10241}, "memory_mb"),
    ({"timeout_sec": 0}, "timeout_sec"),
    ({"max_concurrency": 0}, "max_concurrency"),
    ({"ephemeral_storage_mb": 100}, "ephemeral_storage_mb"),
    ({"status": "paused"}, "status"),
    ({"description": "d" * 257}, "description"),
    ({"unknown_field": True}, "unknown_field"),
    ({"runtime": "cobol85"}, "runtime"),
    ({"handler": "handler"}, "handler"),
    ({"handler": "../up.handler"}, "handler"),
    ({"environment": {"_HANDLER": "x"}}, "environment"),
    ({"environment": {"LAMBDA_TASK_ROOT": "x"}}, "environment"),
    ({"environment": {"AWS_LAMBDA_FUNCTION_NAME": "x"}}, "environment"),
    ({"environment": {"1BAD": "x"}}, "environment"),
    ({"environment": {"BIG": "x" * MAX_ENV_BYTES}}, "environment"),
    ({"environment": {"N": 1}}, "environment.N"),
    ({"id": "abc"}, "id"),
    ({"code_sha256": "0" * 64}, "code_sha256"),
    ({"created_at": "2020-01-01T00:00:00Z"}, "created_at"),
    ({"code_zip": make_zip({"handler.py": SOURCE})}, "code"),
    ({"code": None}, "code"),
    ({"code": 42}, "code"),
    ({"code": None, "code_zip": "not base64!"}, "code_zip"),
    ({"code": None, "code_zip": base64.b64encode(b"not a zip").decode()}, "code_zip"),
    ({"code": None, "code_zip": make_zip({"../handler.py": SOURCE, "handler.py": SOURCE})}, "code_zip"),
    ({"code": None, "code_zip": make_zip({"/etc/handler.py": SOURCE})}, "code_zip"),
    ({"code": None, "code_zip": make_zip({"handler.py": SOURCE}, symlinks={"link": "/etc/passwd"})},
     "code_zip"),
    ({"code": None, "code_zip": make_zip({"other.py": SOURCE})}, "code_zip"),
])
def test_create_validation_names_the_field(store: Store, fields: dict[str, Any], field: str) -> None:
    invalid(lambda: store.registry.create({**body("v"), **fields}), field)
    assert store.registry.list() == ([], 0)
    assert store.blob_shas() == set()
    assert store.changes == []


def test_validation_messages_say_what_is_wrong(store: Store) -> None:
    create = store.registry.create
    assert "unknown field" in invalid(lambda: create(body(extra=1)), "extra")
    assert "read-only" in invalid(lambda: create(body(revision=3)), "revision")
    assert "exactly one" in invalid(lambda: create(body(code_zip=make_zip({"handler.py": ""}))), "code")
    assert "base64" in invalid(lambda: create(body(code=None, code_zip="%%%")), "code_zip")
    assert "escapes" in invalid(
        lambda: create(body(code=None, code_zip=make_zip({"a/../../evil.py": "", "handler.py": ""}))),
        "code_zip")
    assert "symlink" in invalid(
        lambda: create(body(code=None, code_zip=make_zip({"handler.py": ""}, symlinks={"s": "/"}))),
        "code_zip")
    assert "handler.py" in invalid(
        lambda: create(body(code=None, code_zip=make_zip({"src/handler.py": ""}))), "code_zip")
    assert "reserved" in invalid(lambda: create(body(environment={"_HANDLER": "x"})), "environment")
    big = {f"K{i}": "v" * 100 for i in range(40)}
    assert str(MAX_ENV_BYTES) in invalid(lambda: create(body(environment=big)), "environment")
    assert "cobol85" in invalid(lambda: create(body(runtime="cobol85")), "runtime")
    assert "128" in invalid(lambda: create(body(memory_mb=64)), "memory_mb")
    assert "required" in invalid(lambda: create({k: v for k, v in body().items() if k != "code"}), "code")
    assert "JSON object" in invalid(lambda: create(["not", "a", "dict"]), "body")


def test_environment_at_the_size_limit_is_accepted(store: Store) -> None:
    env = {"BIG": "x" * (MAX_ENV_BYTES - len("BIG"))}
    fn = store.registry.create(body("roomy", environment=env))
    assert fn.environment == env
    invalid(lambda: store.registry.update("roomy", {"environment": {"BIG": env["BIG"] + "x"}}),
            "environment")


def test_function_record_round_trips_every_field(store: Store) -> None:
    fields = {"description": "all set", "memory_mb": 1024, "timeout_sec": 900, "status": "inactive",
              "max_concurrency": 1000, "ephemeral_storage_mb": 10240, "environment": {"X": "y"},
              "init_once": False}
    fn: Function = store.registry.create(body("full", **fields))
    assert {k: getattr(fn, k) for k in fields} == fields
    assert fn.config() == {"name": "full", "runtime": "python3.11", "handler": "handler.handler",
                           **fields}
