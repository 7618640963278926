"""The clock jumps: idle expiry, invocation timeouts, schedules and retries of asynchronous
events when the wall clock (``time.time``; the scheduler's and the dispatcher's ``clock``)
jumps forward or back by hours, or the engine's monotonic clock source jumps forward.

In-process, with a real SQLite store and real engine objects: a running server's clock cannot
be changed by a test, so the wall clock of this process is shifted (``WallClock``) and the
scheduler and dispatcher are given a clock of their own, as they are in the other unit tests.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from impuls.engine.invoker import Invoker
from impuls.engine.results import Outcome
from impuls.events import store
from impuls.events.dispatcher import POLL_SECONDS, Dispatcher
from impuls.events.scheduler import Scheduler
from impuls.sandbox.process import ProcessDriver
from tests.unit.test_invoker import World, world  # noqa: F401 (the fixture)
from tests.unit.test_schedules import T0, Clock, db, queued, store_at  # noqa: F401 (the fixture)

HOURS = 6 * 3600.0


class WallClock:
    """This process's wall clock (``time.time``, ``time.time_ns``), ``offset`` seconds off."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset = 0.0
        real, real_ns = time.time, time.time_ns
        monkeypatch.setattr(time, "time", lambda: real() + self.offset)
        monkeypatch.setattr(time, "time_ns", lambda: real_ns() + int(self.offset * 1e9))


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> WallClock:
    return WallClock(monkeypatch)


async def until(ready: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    """Poll ``ready()`` until true (a liveness bound, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while not await _value(ready()):
        assert time.monotonic() < deadline, f"still waiting for {what} after {timeout:.0f} s"
        await asyncio.sleep(0.02)


async def _value(value: bool | Awaitable[bool]) -> bool:
    return await value if inspect.isawaitable(value) else value


def run(w: World, scenario: Callable[[], Awaitable[None]], *more: Any) -> None:
    """``scenario`` with the invoker (and ``more``: started, closed after) running."""
    async def main() -> None:
        await w.invoker.start()
        for part in more:
            await part.start()
        try:
            await scenario()
        finally:
            for part in more:
                await part.close()
            await w.invoker.close()
            w.registry.close()
            w.db.dispose()

    asyncio.run(main())


# --- idle expiry ----------------------------------------------------------------------------


def test_idle_expiry_follows_monotonic_time_not_the_wall_clock(tmp_path: Path, wall: WallClock) -> None:
    """The engine's default clock is ``time.monotonic``: wall-clock jumps of hours either way
    neither expire a warm instance at once nor keep it: it goes once it idled the timeout."""
    w = World(tmp_path, idle_timeout=2.0)
    w.invoker = Invoker(w.settings, w.registry, w.driver, None, w.recorder, w.hub)  # the default clock

    async def scenario() -> None:
        w.create()
        before = time.monotonic()
        assert (await w.invoke({})).outcome is Outcome.SUCCESS
        for jump in (HOURS, -HOURS):
            wall.offset = jump
            young = time.monotonic() - before < w.settings.idle_timeout
            assert w.invoker.expire_idle() == 0 or not young
        wall.offset = -HOURS  # and it stays back
        await until(lambda: w.invoker.stats()["instances"] == 0, "the idle instance to expire")
        assert time.monotonic() - before >= w.settings.idle_timeout  # not before the timeout
        await until(lambda: w.driver.instances[0].destroyed, "the expired instance destroyed")

    run(w, scenario)


def test_a_forward_jump_of_the_monotonic_clock_expires_each_idle_instance_once(world: World) -> None:  # noqa: F811
    """An (injected) monotonic clock source that jumps hours forward: the
    instances idle then go, once each; a busy one is left alone and idles from its release."""
    async def scenario() -> None:
        w = world
        w.create()
        gate = w.driver.gate = asyncio.Event()
        calls = [asyncio.ensure_future(w.invoke({"do": "hold"})) for _ in range(3)]
        await until(lambda: w.invoker.stats()["instances"] == 3, "three instances")
        gate.set()
        await asyncio.gather(*calls)  # three idle
        gate.clear()
        busy = asyncio.ensure_future(w.invoke({"do": "hold"}))
        await until(lambda: w.invoker.stats()["idle"] == 2, "a busy instance")
        w.clock.now += HOURS
        assert w.invoker.expire_idle() == 2 and w.invoker.expire_idle() == 0
        gate.set()
        assert (await busy).outcome is Outcome.SUCCESS
        assert w.invoker.expire_idle() == 0 and w.invoker.stats()["idle"] == 1
        w.clock.now += w.settings.idle_timeout
        assert w.invoker.expire_idle() == 1

    run(world, scenario)


# --- invocation timeouts --------------------------------------------------------------------

TIMED = """import time


def handler(event, context):
    time.sleep(event.get("sleep", 0))
    return {"remaining_ms": context.get_remaining_time_in_millis()}
"""


def test_timeouts_follow_monotonic_time_and_the_deadline_is_the_wall_clocks(
        tmp_path: Path, wall: WallClock) -> None:
    """A real runtime (the process sandbox).  The timeout is enforced on the event loop's
    monotonic clock: a wall-clock jump mid-call neither ends the call early nor lets it
    run on.  ``deadline_ms`` is the wall clock's at dispatch plus the timeout (Lambda's
    contract): after a jump the function's remaining time is off by the jump."""
    w = World(tmp_path)
    w.invoker = Invoker(w.settings, w.registry, ProcessDriver(tmp_path / "work"), None, w.recorder, w.hub)
    timeout = 2

    async def call(event: dict[str, Any], jump: float) -> tuple[Any, float]:
        started = time.monotonic()
        task = asyncio.ensure_future(w.invoke(event))
        await asyncio.sleep(0.2)
        wall.offset = jump
        result = await task
        return result, time.monotonic() - started

    async def scenario() -> None:
        w.create(code=TIMED, timeout_sec=timeout)
        assert (await w.invoke({})).outcome is Outcome.SUCCESS  # warm: no cold start below
        for jump in (HOURS, -HOURS):
            wall.offset = 0.0
            result, took = await call({"sleep": 0.5}, jump)  # shorter than the timeout
            assert result.outcome is Outcome.SUCCESS, (jump, result.error_message)
            result, took = await call({"sleep": 30}, jump)  # longer than the timeout
            assert result.outcome is Outcome.TIMEOUT, (jump, result.error_message)
            assert timeout <= took < 20, (jump, took)
            assert (await w.invoke({})).outcome is Outcome.SUCCESS  # a new instance
        wall.offset = HOURS  # at dispatch: the runtime, on the real clock, sees the jump too
        remaining = json.loads((await w.invoke({})).payload)["remaining_ms"]
        assert HOURS * 1000 < remaining <= (HOURS + timeout) * 1000

    run(w, scenario)


# --- schedules ------------------------------------------------------------------------------

EVERY_MINUTE = "cron(* * * * ? *)"


def fired(db: Engine) -> list[str]:  # noqa: F811
    return [event["payload"]["time"] for event in queued(db)]


def ticks(s: Scheduler, start: timedelta, end: timedelta, step: timedelta) -> int:
    """Rounds from T0 + ``start`` to T0 + ``end``; events queued."""
    count, at = 0, start
    while at <= end:
        count += s.fire_due(T0 + at)
        at += step
    return count


@pytest.mark.parametrize("catch_up", ["one", "none"])
def test_a_forward_jump_fires_one_slot_not_a_flood(db: Engine, catch_up: str) -> None:  # noqa: F811
    """A running scheduler whose clock jumps five hours ahead fires the newest slot it passed,
    once, with either ``catch_up`` (the server ran: those slots were not missed while it was
    down), then every slot on time."""
    store_at(db, T0).create("fn", {"name": "m", "expression": EVERY_MINUTE, "catch_up": catch_up})
    s = Scheduler(db, "node-a", account="123456789012", region="eu-central-1")
    s.started_at = T0
    assert ticks(s, timedelta(0), timedelta(minutes=1), timedelta(seconds=10)) == 1
    assert ticks(s, timedelta(hours=5, seconds=30), timedelta(hours=5, minutes=2), timedelta(seconds=10)) == 3
    assert fired(db) == ["2024-05-01T10:01:00Z", "2024-05-01T15:00:00Z", "2024-05-01T15:01:00Z",
                         "2024-05-01T15:02:00Z"]


def test_a_backward_jump_fires_no_slot_twice(db: Engine, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """Slots 10:01 to 10:03 fired, then the clock goes back two hours: nothing fires until it
    passes 10:03 again, then 10:04 once.  A change that recomputes the next slot while the
    clock is behind (disable, enable) waits for a slot after the last one fired as well."""
    store_at(db, T0).create("fn", {"name": "m", "expression": EVERY_MINUTE})
    s = Scheduler(db, "node-a", account="123456789012", region="eu-central-1")
    s.started_at = T0
    assert ticks(s, timedelta(0), timedelta(minutes=3), timedelta(seconds=10)) == 3
    back = store_at(db, T0 - timedelta(hours=2))
    back.update("fn", "m", {"enabled": False})
    back.update("fn", "m", {"enabled": True})
    assert back.get("fn", "m").next_slot == T0 + timedelta(minutes=4)
    assert ticks(s, timedelta(hours=-2), timedelta(minutes=3, seconds=59), timedelta(seconds=20)) == 0
    assert ticks(s, timedelta(minutes=4), timedelta(minutes=5), timedelta(seconds=10)) == 2
    assert fired(db) == [f"2024-05-01T10:0{m}:00Z" for m in range(1, 6)]
    assert len({event["request_id"] for event in queued(db)}) == 5
    assert "cannot fire" not in caplog.text


# --- retries of asynchronous events -------------------------------------------------------


class Events:
    """A real dispatcher on the world's registry and invoker, on a clock of its own."""

    def __init__(self, w: World) -> None:
        self.clock = Clock(T0)
        self.w = w
        self.dispatcher = Dispatcher(w.registry, w.invoker, w.settings, "node-a", clock=self.clock)

    async def send(self, event: dict[str, Any], name: str = "fn") -> str:
        return await self.dispatcher.accept(name, None, json.dumps(event).encode(), "test")

    async def state(self, request_id: str, name: str = "fn") -> dict[str, Any]:
        return await asyncio.to_thread(store.describe, self.w.db, name, request_id)

    async def wait(self, request_id: str, what: str, ready: Callable[[dict[str, Any]], bool],
                   name: str = "fn") -> dict[str, Any]:
        found: dict[str, Any] = {}

        async def check() -> bool:
            found.update(await self.state(request_id, name))
            return ready(found)

        await until(check, what)
        return found


def test_a_backward_jump_does_not_hold_a_retry_back(world: World) -> None:  # noqa: F811
    """A retry due in a minute when the clock goes back two hours is delivered at once (its
    due time lies further ahead than any retry delay: set by a clock since gone back), not
    two hours later, and its later retries follow the new clock."""
    e = Events(world)

    async def scenario() -> None:
        world.create()
        rid = await e.send({"do": "raise"})
        first = await e.wait(rid, "the first attempt", lambda s: s["state"] == "retrying")
        e.clock.now -= timedelta(hours=2)
        second = await e.wait(rid, "the retry", lambda s: s["attempts"] == 2)
        assert second["state"] == "retrying" and first["next_attempt_at"] > second["next_attempt_at"]
        e.clock.now += timedelta(seconds=2 * world.settings.event_retry_base_seconds)
        done = await e.wait(rid, "the last retry", lambda s: s["state"] == "failed")
        assert done["attempts"] == 3 and done["duplicates"] == 0

    run(world, scenario, e.dispatcher)


def test_a_forward_jump_delivers_retries_at_once_and_expires_only_by_the_maximum_age(
        world: World) -> None:  # noqa: F811
    """An hour ahead: a retry waiting is due at once; an event younger than its maximum age by
    the clock (6 h, the default) is delivered, one older (60 s) expires, as the clock says."""
    e = Events(world)

    async def scenario() -> None:
        world.create()
        world.create("short")
        await asyncio.to_thread(world.registry.put_event_config, "short", "$LATEST",
                                {"maximum_event_age_seconds": 60})
        rids = {name: await e.send({"do": "raise"}, name) for name in ("fn", "short")}
        for name, rid in rids.items():
            await e.wait(rid, "the first attempt", lambda s: s["state"] == "retrying", name)
        e.clock.now += timedelta(hours=1)
        again = await e.wait(rids["fn"], "the retry", lambda s: s["attempts"] == 2, "fn")
        assert again["state"] == "retrying"
        gone = await e.wait(rids["short"], "the expiry", lambda s: s["state"] == "expired", "short")
        assert gone["attempts"] == 1

    run(world, scenario, e.dispatcher)


@pytest.mark.parametrize("jump", [timedelta(hours=1), timedelta(hours=-2)])
def test_an_event_being_delivered_is_not_taken_over_by_its_own_node(world: World,  # noqa: F811
                                                                     jump: timedelta) -> None:
    """Its lease looks lapsed after a jump (run out, or further ahead than any lease): the
    node delivering it does not take it over from itself (no duplicate counted)."""
    e = Events(world)

    async def scenario() -> None:
        world.create()
        world.driver.gate = asyncio.Event()
        rid = await e.send({"do": "hold"})
        await e.wait(rid, "the delivery", lambda s: s["state"] == "running")
        e.clock.now += jump
        e.dispatcher.wake()
        await asyncio.sleep(4 * POLL_SECONDS)  # the claimer looks meanwhile
        world.driver.gate.set()
        done = await e.wait(rid, "the success", lambda s: s["state"] == "succeeded")
        assert done["attempts"] == 1 and done["duplicates"] == 0

    run(world, scenario, e.dispatcher)
