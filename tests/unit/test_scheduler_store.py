"""Schedule records: the store (validation, audit, the function's delete), the API routes on an
in-process app, and the ``impuls schedules`` commands against it (no server)."""

from __future__ import annotations

import json
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, insert, select
from starlette import types

from impuls import cli
from impuls.api import schedules as schedules_api
from impuls.api.auth import PRINCIPAL
from impuls.api.errors import error_response, status_of
from impuls.auth.audit import Actor
from impuls.auth.principal import Principal, Scope
from impuls.errors import FunctionNotFound, ImpulsError, InvalidInput, ScheduleExists, ScheduleNotFound
from impuls.events.scheduler import MAX_PAYLOAD, ScheduleStore
from impuls.functions.packages import PackageBuilder
from impuls.functions.registry import FunctionRegistry
from impuls.runtimes import default_registry
from impuls.store.blobs import BlobStore
from impuls.store.db import open_engine
from impuls.store.schema import audit_log, functions, schedules

with warnings.catch_warnings():  # "install httpx2": the starlette release pinned here asks for it
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

T0 = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def add_function(db: Engine, name: str) -> None:
    now = datetime.now(UTC)
    with db.begin() as conn:
        conn.execute(insert(functions).values(
            id=str(uuid.uuid4()), name=name, description="", runtime="python3.11", handler="h.handler",
            code_sha256="0" * 64, code_size=1, code_kind="source", memory_mb=128, timeout_sec=30,
            environment="{}", status="active", max_concurrency=10, ephemeral_storage_mb=512, revision=1,
            created_at=now, updated_at=now))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Engine]:
    engine = open_engine(f"sqlite:///{tmp_path}/impuls.db")
    add_function(engine, "fn")
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def store(db: Engine, clock: Clock) -> ScheduleStore:
    return ScheduleStore(db, clock=clock)


def invalid(call: Any, field: str) -> str:
    with pytest.raises(InvalidInput) as caught:
        call()
    assert caught.value.message.startswith(f"{field}:"), caught.value.message
    return caught.value.message


def audit_entries(db: Engine) -> list[tuple[str, str, str]]:
    with db.connect() as conn:
        rows = conn.execute(select(audit_log).order_by(audit_log.c.id)).all()
    return [(r.action, r.target, r.key_name) for r in rows]


# --- the store -----------------------------------------------------------------------------


def test_create_applies_defaults_and_computes_the_next_slot(store: ScheduleStore) -> None:
    s = store.create("fn", {"name": "nightly", "expression": " cron(0 2 * * ? *) "})
    assert (s.function_name, s.name, s.expression, s.timezone, s.payload, s.enabled, s.catch_up) == (
        "fn", "nightly", "cron(0 2 * * ? *)", "UTC", None, True, "one")
    assert s.created_at == s.updated_at == T0 and s.last_slot is None
    assert s.next_slot == datetime(2024, 5, 2, 2, tzinfo=UTC)
    assert store.get("fn", "nightly") == s
    assert s.to_api() == {
        "function_name": "fn", "name": "nightly", "expression": "cron(0 2 * * ? *)", "timezone": "UTC",
        "payload": None, "enabled": True, "catch_up": "one", "created_at": "2024-05-01T10:00:00.000Z",
        "updated_at": "2024-05-01T10:00:00.000Z", "last_slot": None, "next_slot": "2024-05-02T02:00:00.000Z"}


def test_create_with_every_field(store: ScheduleStore) -> None:
    s = store.create("fn", {"name": "b.e_r-1", "expression": "0 9 * * MON-FRI", "timezone": "Europe/Berlin",
                            "payload": {"a": [1, None]}, "enabled": False, "catch_up": "none"})
    assert (s.timezone, s.enabled, s.catch_up, s.next_slot) == ("Europe/Berlin", False, "none", None)
    assert s.to_api()["payload"] == {"a": [1, None]}


def test_list_in_name_order(store: ScheduleStore) -> None:
    for name in ("b", "a", "c"):
        store.create("fn", {"name": name, "expression": "rate(1 hour)"})
    assert [s.name for s in store.list("fn")] == ["a", "b", "c"]


def test_not_found_and_exists(store: ScheduleStore) -> None:
    store.create("fn", {"name": "a", "expression": "rate(1 hour)"})
    with pytest.raises(ScheduleExists, match="schedule 'fn:a' already exists"):
        store.create("fn", {"name": "a", "expression": "rate(2 hours)"})
    with pytest.raises(ScheduleNotFound, match="schedule 'fn:zz' not found"):
        store.get("fn", "zz")
    with pytest.raises(ScheduleNotFound):
        store.update("fn", "zz", {"enabled": False})
    with pytest.raises(ScheduleNotFound):
        store.delete("fn", "zz")
    for call in (lambda: store.create("nope", {"name": "a", "expression": "rate(1 hour)"}),
                 lambda: store.get("nope", "a"), lambda: store.list("nope"),
                 lambda: store.delete("nope", "a")):
        with pytest.raises(FunctionNotFound, match="function 'nope' not found"):
            call()


def test_validation_names_the_field(store: ScheduleStore) -> None:
    ok = {"name": "a", "expression": "rate(1 hour)"}
    invalid(lambda: store.create("fn", {**ok, "name": ""}), "name")
    invalid(lambda: store.create("fn", {**ok, "name": "a b"}), "name")
    invalid(lambda: store.create("fn", {**ok, "name": "x" * 65}), "name")
    invalid(lambda: store.create("fn", {**ok, "name": 5}), "name")
    invalid(lambda: store.create("fn", {"name": "a"}), "expression")
    invalid(lambda: store.create("fn", {**ok, "expression": 5}), "expression")
    invalid(lambda: store.create("fn", {**ok, "expression": "cron(0 12 * * * *)"}), "expression")
    invalid(lambda: store.create("fn", {**ok, "timezone": "Mars/Olympus"}), "timezone")
    invalid(lambda: store.create("fn", {**ok, "enabled": "yes"}), "enabled")
    invalid(lambda: store.create("fn", {**ok, "catch_up": "all"}), "catch_up")
    invalid(lambda: store.create("fn", {**ok, "payload": "x" * MAX_PAYLOAD}), "payload")
    invalid(lambda: store.create("fn", {**ok, "payload": float("nan")}), "payload")
    assert "allowed: name, expression" in invalid(lambda: store.create("fn", {**ok, "cron": "x"}), "cron")
    message = invalid(lambda: store.create("fn", {**ok, "expression": "cron(0 0 1 1 ? 2020)"}), "expression")
    assert "no time left" in message
    assert store.list("fn") == []


def test_update_recomputes_the_next_slot_when_the_timing_changes(store: ScheduleStore, clock: Clock) -> None:
    store.create("fn", {"name": "r", "expression": "rate(1 hour)"})  # slots at hh:00 from T0
    clock.now = T0 + timedelta(minutes=90)
    s = store.update("fn", "r", {"expression": "rate(2 hours)"})  # still counted from the creation
    assert s.next_slot == T0 + timedelta(hours=2) and s.updated_at == clock.now and s.created_at == T0
    s = store.update("fn", "r", {"expression": "cron(0 12 * * ? *)", "timezone": "America/New_York"})
    assert s.next_slot == datetime(2024, 5, 1, 16, tzinfo=UTC)
    s = store.update("fn", "r", {"enabled": False})
    assert (s.enabled, s.next_slot) == (False, None)
    clock.now = T0 + timedelta(days=1)
    s = store.update("fn", "r", {"enabled": True})
    assert s.next_slot == datetime(2024, 5, 2, 16, tzinfo=UTC)
    s = store.update("fn", "r", {"payload": [1, 2], "catch_up": "none"})  # no change of timing
    assert (s.payload, s.catch_up, s.next_slot) == ("[1,2]", "none", datetime(2024, 5, 2, 16, tzinfo=UTC))
    assert store.update("fn", "r", {"payload": None}).payload is None


def test_update_validates(store: ScheduleStore) -> None:
    store.create("fn", {"name": "r", "expression": "rate(1 hour)"})
    invalid(lambda: store.update("fn", "r", {"name": "s"}), "name")
    invalid(lambda: store.update("fn", "r", {"expression": "rate(1 fortnight)"}), "expression")
    invalid(lambda: store.update("fn", "r", {"timezone": "Nowhere"}), "timezone")
    invalid(lambda: store.update("fn", "r", {"enabled": 1}), "enabled")
    invalid(lambda: store.update("fn", "r", {"catch_up": None}), "catch_up")
    invalid(lambda: store.update("fn", "r", {"bogus": 1}), "bogus")
    assert store.get("fn", "r").expression == "rate(1 hour)"


def test_changes_are_audited(store: ScheduleStore, db: Engine) -> None:
    who = Actor("deployer", "10.0.0.1")
    store.create("fn", {"name": "a", "expression": "rate(1 hour)"}, who)
    store.update("fn", "a", {"enabled": False}, who)
    store.delete("fn", "a", who)
    assert audit_entries(db) == [("schedule.create", "fn:a", "deployer"),
                                 ("schedule.update", "fn:a", "deployer"),
                                 ("schedule.delete", "fn:a", "deployer")]
    with pytest.raises(ScheduleNotFound):
        store.get("fn", "a")
    with pytest.raises(ScheduleNotFound):  # a failed change writes no entry
        store.delete("fn", "a", who)
    assert len(audit_entries(db)) == 3


def test_deleting_the_function_deletes_its_schedules(store: ScheduleStore, db: Engine,
                                                     tmp_path: Path) -> None:
    add_function(db, "other")
    store.create("fn", {"name": "a", "expression": "rate(1 hour)"})
    store.create("fn", {"name": "b", "expression": "rate(1 hour)"})
    store.create("other", {"name": "a", "expression": "rate(1 hour)"})
    registry = FunctionRegistry(db, BlobStore(tmp_path / "blobs"), default_registry(),
                                PackageBuilder(tmp_path / "packages", tmp_path / "build-cache"))
    try:
        registry.delete("fn")
    finally:
        registry.close()
    with db.connect() as conn:
        left = conn.execute(select(schedules.c.function_name, schedules.c.name)).all()
    assert [tuple(r) for r in left] == [("other", "a")]


# --- the routes -----------------------------------------------------------------------------


class Platform:
    """What the routes read from the platform."""

    def __init__(self, db: Engine) -> None:
        self.db = db


class WithPrincipal:
    """Stands in for the auth gate: every request acts as ``principal``."""

    def __init__(self, app: types.ASGIApp, principal: Principal) -> None:
        self.app, self.principal = app, principal

    async def __call__(self, scope: types.Scope, receive: types.Receive, send: types.Send) -> None:
        scope[PRINCIPAL] = self.principal
        await self.app(scope, receive, send)


def make_app(db: Engine, principal: Principal) -> WithPrincipal:
    app = FastAPI()
    app.state.platform = Platform(db)

    async def impuls_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ImpulsError)
        return error_response(status_of(exc), exc.message)

    app.add_exception_handler(ImpulsError, impuls_error)
    app.include_router(schedules_api.router)
    return WithPrincipal(app, principal)


@pytest.fixture
def api(db: Engine) -> TestClient:
    return TestClient(make_app(db, Principal("deployer", Scope.DEPLOY)))


BASE = "/api/v1/functions/fn/schedules"


def test_routes_create_list_get_patch_delete(api: TestClient, db: Engine) -> None:
    created = api.post(BASE, json={"name": "tick", "expression": "rate(5 minutes)", "payload": {"k": 1}})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == "tick" and body["payload"] == {"k": 1} and body["next_slot"].endswith("Z")
    assert body["last_slot"] is None and body["enabled"] is True and body["catch_up"] == "one"
    assert api.get(BASE).json() == {"schedules": [body]}
    assert api.get(f"{BASE}/tick").json() == body
    patched = api.patch(f"{BASE}/tick", json={"enabled": False})
    assert patched.status_code == 200 and patched.json()["enabled"] is False
    assert patched.json()["next_slot"] is None
    deleted = api.delete(f"{BASE}/tick")
    assert deleted.status_code == 200
    assert deleted.json() == {"message": "Schedule deleted", "function_name": "fn", "name": "tick"}
    assert api.get(BASE).json() == {"schedules": []}
    assert [a for a, _, _ in audit_entries(db)] == ["schedule.create", "schedule.update", "schedule.delete"]


def test_routes_answer_conditions(api: TestClient) -> None:
    ok = {"name": "a", "expression": "rate(1 hour)"}
    assert api.post(BASE, json=ok).status_code == 201
    cases = [
        (api.post(BASE, json=ok), 409, "schedule 'fn:a' already exists"),
        (api.post(BASE, json={**ok, "name": "b", "expression": "rate(0 hours)"}), 400, "expression: "),
        (api.post(BASE, json={**ok, "name": "b", "extra": 1}), 400, "extra: unknown field"),
        (api.post(BASE, json=[1]), 400, "body: must be a JSON object"),
        (api.post(BASE, content=b"{", headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
        (api.post("/api/v1/functions/nope/schedules", json=ok), 404, "function 'nope' not found"),
        (api.get(f"{BASE}/zz"), 404, "schedule 'fn:zz' not found"),
        (api.patch(f"{BASE}/zz", json={"enabled": True}), 404, "schedule 'fn:zz' not found"),
        (api.delete(f"{BASE}/zz"), 404, "schedule 'fn:zz' not found"),
        (api.get("/api/v1/functions/nope/schedules"), 404, "function 'nope' not found"),
        (api.patch(f"{BASE}/a", json={"timezone": "Nowhere"}), 400, "timezone: "),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (response.status_code, response.text)
        assert response.json()["error"] is True and words in response.json()["message"], response.text


def test_routes_check_scopes(db: Engine) -> None:
    ScheduleStore(db).create("fn", {"name": "a", "expression": "rate(1 hour)"})
    reader = TestClient(make_app(db, Principal("reader", Scope.READ)))
    assert reader.get(BASE).status_code == 200
    assert reader.get(f"{BASE}/a").status_code == 200
    assert reader.post(BASE, json={"name": "b", "expression": "rate(1 hour)"}).status_code == 403
    assert reader.patch(f"{BASE}/a", json={"enabled": False}).status_code == 403
    assert reader.delete(f"{BASE}/a").status_code == 403
    other = TestClient(make_app(db, Principal("orders", Scope.ADMIN, "orders-*")))
    assert other.get(BASE).status_code == 403
    assert other.post(BASE, json={"name": "b", "expression": "rate(1 hour)"}).status_code == 403


# --- the CLI -------------------------------------------------------------------------------


@pytest.fixture
def run_cli(db: Engine, monkeypatch: pytest.MonkeyPatch) -> Any:
    app = make_app(db, Principal("deployer", Scope.DEPLOY))

    def client_init(self: cli.Client, url: str, api_key: str, ca_cert: Path | None = None) -> None:
        self.url = url
        self.http = TestClient(app, base_url=url)

    monkeypatch.setattr(cli.Client, "__init__", client_init)

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli.main, ["--url", "http://testserver", "--api-key", "k", *args])

    return run


def test_cli_add_ls_rm(run_cli: Any, db: Engine) -> None:
    out = run_cli("schedules", "add", "fn", "nightly", "--expression", "cron(30 2 * * ? *)",
                  "--timezone", "Europe/Berlin", "--payload", '{"job": "report"}', "--catch-up", "none")
    assert out.exit_code == 0, out.output
    assert "added schedule fn:nightly cron(30 2 * * ? *) (Europe/Berlin, next " in out.output
    s = ScheduleStore(db).get("fn", "nightly")
    assert (s.timezone, s.payload, s.catch_up) == ("Europe/Berlin", '{"job":"report"}', "none")
    out = run_cli("schedules", "add", "fn", "fast", "--expression", "rate(1 second)", "--disabled", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["enabled"] is False
    out = run_cli("schedules", "ls", "fn")
    assert out.exit_code == 0 and "nightly" in out.output and "fast" in out.output
    listed = json.loads(run_cli("schedules", "ls", "fn", "--json").output)
    assert [s["name"] for s in listed] == ["fast", "nightly"]
    out = run_cli("schedules", "rm", "fn", "nightly")
    assert out.exit_code == 0 and "deleted schedule fn:nightly" in out.output
    assert [s.name for s in ScheduleStore(db).list("fn")] == ["fast"]


def test_cli_reports_errors(run_cli: Any) -> None:
    out = run_cli("schedules", "add", "fn", "x", "--expression", "rate(5 fortnights)")
    assert out.exit_code == 1 and "400: expression: rate(5 fortnights): the unit" in out.output
    out = run_cli("schedules", "add", "fn", "x", "--expression", "rate(5 minutes)", "--payload", "{nope")
    assert out.exit_code == 1 and "--payload: not valid JSON" in out.output
    out = run_cli("schedules", "rm", "fn", "missing")
    assert out.exit_code == 1 and "404: schedule 'fn:missing' not found" in out.output
