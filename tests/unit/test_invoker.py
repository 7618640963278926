"""The invocation engine in-process: a real registry and recorder on SQLite in a temporary
folder, a fake sandbox driver whose instances do what the event asks, an injected clock."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from impuls import config
from impuls.engine.invoker import MAX_EVENT_BYTES, Invoker
from impuls.engine.pool import START_ATTEMPTS
from impuls.engine.records import InvocationRecorder, LogHub
from impuls.engine.results import Outcome
from impuls.errors import (
    AliasNotFound,
    FunctionInactive,
    FunctionNotFound,
    FunctionNotReady,
    InitFailed,
    InvalidInput,
    InvocationTimedOut,
    LocalModeDisabled,
    OutOfMemory,
    PayloadTooLarge,
    RuntimeExited,
    SandboxKilled,
    ShuttingDown,
    Throttled,
    VersionNotFound,
)
from impuls.functions.models import function_arn
from impuls.functions.packages import PackageBuilder
from impuls.functions.registry import FunctionRegistry
from impuls.runtimes import Runtime, default_registry
from impuls.sandbox.base import Instance, InstanceSpec, SandboxDriver
from impuls.sandbox.runtime_api import Invocation, ResponseStream, RuntimeReply
from impuls.store.blobs import BlobStore
from impuls.store.db import open_engine
from tests.helpers import make_zip
from tests.unit.test_pool import FakeClock, FakeInstance

CODE = "def handler(event, context):\n    return event\n"


class ScriptedInstance(FakeInstance):
    """Does what the event's ``do`` says: echo it (default), raise, time out, run out of memory, die,
    hold until the driver's gate opens, or stream ``chunks`` as the Runtime API would (to the
    invocation's sink, else buffered), holding for the gate after the first one, and ending with
    ``then``: nothing, a mid-stream "raise" (trailers) or a "timeout"."""

    gate: asyncio.Event

    async def invoke(self, invocation: Invocation, timeout: float) -> RuntimeReply:
        self.invocations += 1
        event = json.loads(invocation.payload)
        self.output.feed(f"call {self.invocations} of revision {self.spec.revision}\n".encode())
        do = event.get("do") if isinstance(event, dict) else None
        if do == "sleep":
            await asyncio.sleep(event["seconds"])
        if do == "hold":  # until the test opens the driver's gate
            await self.gate.wait()
        if do == "stream":
            return await self._stream(invocation, event, timeout)
        if do == "raise":
            return RuntimeReply(False, json.dumps({"errorType": "ValueError", "errorMessage": "bad",
                                                   "stackTrace": ["line 1"]}).encode())
        if do == "timeout":
            raise InvocationTimedOut(f"function timed out after {timeout:.2f} s")
        if do == "oom":
            self._exited.set_result(-9)
            raise OutOfMemory("instance exceeded its memory limit")
        if do == "crash":
            self._exited.set_result(1)
            raise RuntimeExited("runtime exited with status 1 during the invocation")
        return RuntimeReply(True, json.dumps({"echo": event, "arn": invocation.function_arn,
                                              "version": self.spec.version,
                                              "client_context": invocation.client_context}).encode())


    async def _stream(self, invocation: Invocation, event: dict[str, Any], timeout: float) -> RuntimeReply:
        chunks = [c.encode() for c in event["chunks"]]
        error = json.dumps({"errorType": "StreamError", "errorMessage": "broke mid-stream"}).encode()
        sink = invocation.stream
        if sink is None:  # the Runtime API buffers a stream nobody can take
            if event.get("then") == "raise":
                return RuntimeReply(False, error, "StreamError")
            return RuntimeReply(True, b"".join(chunks))
        sink.open("text/plain", None)
        for n, chunk in enumerate(chunks):
            sink.write(chunk)
            if n == 0:
                await self.gate.wait()
        if event.get("then") == "timeout":
            raise InvocationTimedOut(f"function timed out after {timeout:.2f} s")
        if event.get("then") == "raise":
            sink.close("StreamError", "broke mid-stream")
            return RuntimeReply(False, error, "StreamError", streamed=True)
        sink.close()
        return RuntimeReply(True, b"", streamed=True)


class ScriptedDriver(SandboxDriver):
    name = "scripted"

    def __init__(self) -> None:
        self.specs: list[InstanceSpec] = []
        self.instances: list[ScriptedInstance] = []
        self.init_error: InitFailed | None = None
        #: how many of the next starts have their sandbox killed under them
        self.killed = 0
        self.gate: asyncio.Event | None = None

    async def create(self, spec: InstanceSpec) -> Instance:
        self.specs.append(spec)
        if self.killed:
            self.killed -= 1
            raise SandboxKilled("the runtime was killed by SIGKILL while it started", "importing...\n")
        if self.init_error is not None:
            raise self.init_error
        instance = ScriptedInstance(spec, delay=0.0)
        if self.gate is None:
            self.gate = asyncio.Event()
        instance.gate = self.gate
        self.instances.append(instance)
        return instance

    def supports(self, runtime: Runtime) -> bool:
        return runtime.language == "python"


class World:
    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.settings = config.load({"data_dir": tmp, **settings}, environ={})
        self.db = open_engine(self.settings.db_url)
        self.registry = FunctionRegistry(self.db, BlobStore(tmp / "blobs"), default_registry(),
                                         PackageBuilder(tmp / "packages", tmp / "build-cache"))
        self.driver = ScriptedDriver()
        self.clock = FakeClock()
        self.recorder = InvocationRecorder(self.db, timedelta(days=1))
        self.hub = LogHub()
        #: what the invoker draws to pick an alias's version (0.5 once they are used up)
        self.draws: list[float] = []
        self.invoker = Invoker(self.settings, self.registry, self.driver, None, self.recorder, self.hub,
                               clock=self.clock, draw=lambda: self.draws.pop(0) if self.draws else 0.5)

    def create(self, name: str = "fn", **fields: Any) -> None:
        self.registry.create({"name": name, "runtime": "python3.11", "handler": "handler.handler",
                              "code": CODE, **fields})

    async def invoke(self, event: Any, name: str = "fn", qualifier: str | None = None,
                     stream: ResponseStream | None = None) -> Any:
        return await self.invoker.invoke(name, json.dumps(event).encode(), qualifier=qualifier,
                                         stream=stream)

    async def change(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A registry change, made in a thread as the API does, and its notification handled."""
        result = await asyncio.to_thread(call, *args, **kwargs)
        await asyncio.sleep(0)  # the change notification is posted to the loop
        return result


Scenario = Callable[[World], Coroutine[Any, Any, None]]


@pytest.fixture
def world(tmp_path: Path) -> World:
    if not default_registry().resolve("python3.11").installed:
        pytest.skip("python3.11 is not installed on this host")
    return World(tmp_path)


def run(world: World, scenario: Scenario) -> None:
    async def main() -> None:
        await world.invoker.start()
        try:
            await scenario(world)
        finally:
            await world.invoker.close()
            world.registry.close()
            world.db.dispose()

    asyncio.run(main())


def test_success_is_warm_the_second_time_and_recorded(world: World) -> None:
    async def scenario(w: World) -> None:
        w.create()
        first = await w.invoke({"n": 1})
        second = await w.invoke({"n": 2})
        assert first.outcome is Outcome.SUCCESS and first.cold_start
        assert json.loads(first.payload)["echo"] == {"n": 1}
        assert json.loads(first.payload)["arn"] == "arn:aws:lambda:us-east-1:000000000000:function:fn"
        assert second.cold_start is False and "call 2 of revision 1" in second.logs
        assert len(w.driver.instances) == 1
        await w.recorder.flush()
        records, total = w.recorder.query("fn", 10, 0)
        assert total == 2 and {r.request_id for r in records} == {first.request_id, second.request_id}
        assert all(r.outcome == "success" and r.sandbox == "scripted" for r in records)

    run(world, scenario)


@pytest.mark.parametrize(("do", "outcome", "error_type"), [
    ("raise", Outcome.ERROR, "ValueError"),
    ("timeout", Outcome.TIMEOUT, "Sandbox.Timeout"),
    ("oom", Outcome.OOM, "Runtime.OutOfMemory"),
    ("crash", Outcome.CRASH, "Runtime.ExitError"),
])
def test_failures_become_outcomes(world: World, do: str, outcome: Outcome, error_type: str) -> None:
    async def scenario(w: World) -> None:
        w.create()
        result = await w.invoke({"do": do})
        assert result.outcome is outcome and result.error_type == error_type
        assert "call 1" in result.logs  # the output before the failure is kept
        if do == "raise":
            assert result.error_message == "bad" and result.stack == ["line 1"]
            assert (await w.invoke({})).cold_start is False  # a handler error keeps the instance
        else:
            assert (await w.invoke({})).cold_start is True  # a broken instance is replaced
        await w.recorder.flush()
        records, _ = w.recorder.query("fn", 10, 0)
        assert outcome.value in {r.outcome for r in records}

    run(world, scenario)


def test_init_failure_is_replayed_during_the_back_off(world: World) -> None:
    async def scenario(w: World) -> None:
        w.create()
        w.driver.init_error = InitFailed("Runtime.ImportModuleError", "no module named x", "boom\n")
        first = await w.invoke({})
        assert first.outcome is Outcome.INIT_ERROR and first.cold_start
        assert first.error_type == "Runtime.ImportModuleError" and first.logs == "boom\n"
        w.driver.init_error = None
        assert (await w.invoke({})).outcome is Outcome.INIT_ERROR  # replayed, not retried
        assert len(w.driver.specs) == 1
        w.clock.now += 1.5  # past the first back-off (1 s)
        assert (await w.invoke({})).outcome is Outcome.SUCCESS
        assert len(w.driver.specs) == 2

    run(world, scenario)


def test_a_start_killed_from_outside_is_made_again_within_the_call(world: World) -> None:
    async def scenario(w: World) -> None:
        w.create()
        w.driver.killed = 1
        result = await w.invoke({"n": 1})
        assert result.outcome is Outcome.SUCCESS and result.cold_start
        assert json.loads(result.payload)["echo"] == {"n": 1}
        assert len(w.driver.specs) == 2 and w.driver.specs[0].instance_id != w.driver.specs[1].instance_id
        await w.recorder.flush()
        records, total = w.recorder.query("fn", 10, 0)
        assert total == 1 and records[0].outcome == "success" and "killed" in records[0].note

    run(world, scenario)


def test_starts_killed_every_time_are_a_sandbox_failure_not_an_init_error(world: World) -> None:
    async def scenario(w: World) -> None:
        w.create()
        w.driver.killed = START_ATTEMPTS
        failed = await w.invoke({})
        assert failed.outcome is Outcome.CRASH and failed.error_type == "Sandbox.StartFailed"
        assert failed.logs == "importing...\n"
        assert len(w.driver.specs) == START_ATTEMPTS
        after = await w.invoke({})  # no back-off replays it: the next call starts an instance
        assert after.outcome is Outcome.SUCCESS and after.cold_start
        assert len(w.driver.specs) == START_ATTEMPTS + 1
        await w.recorder.flush()
        records, _ = w.recorder.query("fn", 10, 0)
        assert sorted(r.outcome for r in records) == ["crash", "success"]

    run(world, scenario)


def test_an_update_retires_the_old_version(world: World) -> None:
    async def scenario(w: World) -> None:
        w.create(environment={"A": "1"})
        await w.invoke({})
        old = w.driver.instances[0]
        await asyncio.to_thread(w.registry.update, "fn", {"environment": {"A": "2"}})
        await asyncio.sleep(0)  # the change notification is posted to the loop
        result = await w.invoke({})
        assert result.cold_start and "of revision 2" in result.logs
        assert w.driver.specs[-1].environment == {"A": "2"}
        await asyncio.sleep(0)
        assert old.destroyed

    run(world, scenario)


def test_refusals_before_any_instance(world: World) -> None:
    async def scenario(w: World) -> None:
        w.create()
        w.create("off", status="inactive")
        with pytest.raises(FunctionNotFound):
            await w.invoke({}, name="missing")
        with pytest.raises(FunctionInactive):
            await w.invoke({}, name="off")
        with pytest.raises(PayloadTooLarge):
            await w.invoker.invoke("fn", b"1" * (MAX_EVENT_BYTES + 1))
        with pytest.raises(LocalModeDisabled):
            await w.invoker.invoke("fn", b"{}", local=True)
        assert w.driver.specs == []

    run(world, scenario)


def test_a_runtime_the_sandbox_does_not_offer(world: World) -> None:
    node = default_registry().resolve("nodejs20") if _installed("nodejs20") else None
    if node is None:
        pytest.skip("no second runtime installed here")

    async def scenario(w: World) -> None:
        w.registry.create({"name": "js", "runtime": "nodejs20", "handler": "index.handler",
                           "code": "exports.handler = async (e) => e;\n"})
        with pytest.raises(InvalidInput, match="not offered by the scripted sandbox"):
            await w.invoke({}, name="js")

    run(world, scenario)


def test_idle_instances_expire_by_the_clock(world: World) -> None:
    async def scenario(w: World) -> None:
        w.create()
        await w.invoke({})
        assert w.invoker.stats()["idle"] == 1
        w.clock.now += w.settings.idle_timeout - 1
        assert w.invoker.expire_idle() == 0
        w.clock.now += 2
        assert w.invoker.expire_idle() == 1
        await asyncio.sleep(0)
        assert w.driver.instances[0].destroyed and w.invoker.stats()["instances"] == 0

    run(world, scenario)


def test_live_output_reaches_followers(world: World) -> None:
    async def scenario(w: World) -> None:
        w.create()
        queue = w.hub.subscribe("fn")
        result = await w.invoke({})
        event = queue.get_nowait()
        assert event == {"request_id": result.request_id, "text": "call 1 of revision 1\n"}

    run(world, scenario)


def test_close_drains_calls_in_flight_then_refuses(world: World) -> None:
    async def scenario(w: World) -> None:
        w.create()
        running = asyncio.create_task(w.invoke({"do": "sleep", "seconds": 0.05}))
        await asyncio.sleep(0.01)
        closing = asyncio.create_task(w.invoker.close())
        await asyncio.sleep(0)
        with pytest.raises(ShuttingDown):
            await w.invoke({})
        assert (await running).outcome is Outcome.SUCCESS
        await closing
        assert all(i.destroyed for i in w.driver.instances)

    run(world, scenario)


# --- versions, aliases, reserved concurrency, lifecycle ---------------------------------------


def versioned(w: World) -> None:
    """fn: version 1 (V=1), version 2 (V=2), $LATEST (V=3)."""
    w.create(environment={"V": "1"})
    w.registry.publish("fn")
    w.registry.update("fn", {"environment": {"V": "2"}})
    w.registry.publish("fn")
    w.registry.update("fn", {"environment": {"V": "3"}})


async def running_calls(w: World, count: int) -> None:
    """Yield to the loop until ``count`` scripted calls are inside their instances (loop turns, no
    wall-clock time)."""
    for _ in range(10_000):
        if sum(i.invocations for i in w.driver.instances) >= count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{count} calls never started")


def test_each_version_runs_in_its_own_pool_and_says_so(world: World) -> None:
    async def scenario(w: World) -> None:
        await asyncio.to_thread(versioned, w)
        for qualifier, version in ((None, "$LATEST"), ("$LATEST", "$LATEST"), ("1", "1"), ("2", "2"),
                                   ("02", "2")):
            result = await w.invoke({}, qualifier=qualifier)
            doc = json.loads(result.payload)
            assert result.executed_version == doc["version"] == version
            assert doc["arn"] == function_arn("fn", qualifier)  # the qualifier as the caller gave it
        assert {s.version: s.environment["V"] for s in w.driver.specs} == {"$LATEST": "3", "1": "1", "2": "2"}
        assert len(w.driver.instances) == 3  # one instance per version, reused
        failed = await w.invoke({"do": "raise"}, qualifier="1")
        assert failed.executed_version == "1" and failed.error_type == "ValueError"
        elsewhere = await w.invoker.invoke("fn", b"{}", qualifier="1", region="eu-west-1", account="1" * 12)
        assert json.loads(elsewhere.payload)["arn"] == function_arn("fn", "1", "eu-west-1", "1" * 12)

    run(world, scenario)


def test_latest_updates_never_touch_published_versions(world: World) -> None:
    async def scenario(w: World) -> None:
        await asyncio.to_thread(versioned, w)
        await w.invoke({})
        await w.invoke({}, qualifier="1")
        latest, v1 = w.driver.instances
        await w.change(w.registry.update, "fn", {"environment": {"V": "4"}})
        await asyncio.sleep(0)
        assert latest.destroyed and not v1.destroyed
        assert (await w.invoke({}, qualifier="1")).cold_start is False
        assert (await w.invoke({})).cold_start is True
        assert w.driver.specs[-1].environment == {"V": "4"} and w.driver.specs[-1].version == "$LATEST"

    run(world, scenario)


def test_deleting_a_version_or_the_function_retires_its_pools(world: World) -> None:
    async def scenario(w: World) -> None:
        await asyncio.to_thread(versioned, w)
        for qualifier in (None, "1", "2"):
            await w.invoke({}, qualifier=qualifier)
        latest, v1, v2 = w.driver.instances
        await w.change(w.registry.delete, "fn", qualifier="1")
        await asyncio.sleep(0)
        assert v1.destroyed and not latest.destroyed and not v2.destroyed
        with pytest.raises(VersionNotFound):
            await w.invoke({}, qualifier="1")
        assert (await w.invoke({}, qualifier="2")).cold_start is False
        await w.change(w.registry.delete, "fn")
        await asyncio.sleep(0)
        assert latest.destroyed and v2.destroyed
        for qualifier in (None, "2"):
            with pytest.raises(FunctionNotFound):
                await w.invoke({}, qualifier=qualifier)

    run(world, scenario)


def test_an_alias_picks_a_version_per_call_by_weight(world: World) -> None:
    async def scenario(w: World) -> None:
        await asyncio.to_thread(versioned, w)
        await w.change(w.registry.create_alias, "fn", "live", "1", weights={"2": 0.3})
        w.draws = [0.1, 0.5, 0.29, 0.3, 0.99, 0.0]
        picked = [await w.invoke({}, qualifier="live") for _ in range(6)]
        assert [r.executed_version for r in picked] == ["2", "1", "2", "1", "1", "2"]
        assert {json.loads(r.payload)["arn"] for r in picked} == {function_arn("fn", "live")}

        def no_database(*args: Any) -> Any:
            raise AssertionError("the warm path read the registry")

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(w.registry, "get", no_database)
            patch.setattr(w.registry, "route", no_database)
            w.draws = [0.0, 0.9]
            assert [(await w.invoke({}, qualifier="live")).executed_version for _ in range(2)] == ["2", "1"]

        await w.change(w.registry.update_alias, "fn", "live", version="$LATEST", weights={})
        assert (await w.invoke({}, qualifier="live")).executed_version == "$LATEST"
        with pytest.raises(AliasNotFound):
            await w.invoke({}, qualifier="nope")
        with pytest.raises(VersionNotFound):
            await w.invoke({}, qualifier="9")

    run(world, scenario)


def test_reserved_concurrency_is_the_limit_of_every_version(tmp_path: Path) -> None:
    if not default_registry().resolve("python3.11").installed:
        pytest.skip("python3.11 is not installed on this host")

    async def scenario(w: World) -> None:
        await asyncio.to_thread(versioned, w)
        await w.invoke({}, qualifier="1")  # a warm pool with the default limit (10)
        await w.change(w.registry.put_concurrency, "fn", 0)
        for qualifier in (None, "1"):
            with pytest.raises(Throttled, match="reserved concurrency of 0"):
                await w.invoke({}, qualifier=qualifier)
        assert len(w.driver.specs) == 1
        await w.change(w.registry.put_concurrency, "fn", 1)
        held = asyncio.create_task(w.invoke({"do": "hold"}, qualifier="1"))
        await running_calls(w, 2)
        with pytest.raises(Throttled):  # queue size 0: at once
            await w.invoke({}, qualifier="1")
        assert w.driver.gate is not None
        w.driver.gate.set()
        assert (await held).executed_version == "1"
        await w.change(w.registry.delete_concurrency, "fn")
        second = asyncio.create_task(w.invoke({"do": "hold"}, qualifier="1"))
        assert (await w.invoke({"do": "hold"}, qualifier="1")).outcome is Outcome.SUCCESS
        await second

    run(World(tmp_path, queue_size=0), scenario)


def test_pending_and_failed_functions_are_not_ready(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    opened = threading.Event()
    build = world.registry.packages.get

    def gated(*args: Any) -> Any:
        assert opened.wait(60)
        return build(*args)

    async def scenario(w: World) -> None:
        monkeypatch.setattr(w.registry.packages, "get", gated)
        await asyncio.to_thread(w.registry.create, {"name": "fn", "runtime": "python3.11",
                                                    "handler": "handler.handler", "code": CODE}, wait=False)
        with pytest.raises(FunctionNotReady, match="state is Pending"):
            await w.invoke({})
        opened.set()
        assert await asyncio.to_thread(w.registry.wait_for_builds, 60)
        await asyncio.sleep(0)
        assert (await w.invoke({})).outcome is Outcome.SUCCESS
        await asyncio.to_thread(w.registry.create, {
            "name": "broken", "runtime": "provided", "handler": "x", "code_zip": make_zip({"x": "y"})},
            wait=False)
        assert await asyncio.to_thread(w.registry.wait_for_builds, 60)
        with pytest.raises(FunctionNotReady, match=r"state is Failed.*bootstrap"):
            await w.invoke({}, name="broken")
        assert [s.function_name for s in w.driver.specs] == ["fn"]

    run(world, scenario)


def test_an_update_being_built_leaves_the_old_code_serving(world: World,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    opened = threading.Event()

    async def scenario(w: World) -> None:
        w.create()
        assert "of revision 1" in (await w.invoke({})).logs
        build, new = w.registry.packages.get, CODE + "# new\n"

        def gated(*args: Any) -> Any:  # holds the new code's build only
            if args[2] == hashlib.sha256(new.encode()).hexdigest():
                assert opened.wait(60)
            return build(*args)

        monkeypatch.setattr(w.registry.packages, "get", gated)
        await w.change(w.registry.update, "fn", {"code": new}, wait=False)
        assert "of revision 1" in (await w.invoke({})).logs  # the served code is unchanged
        opened.set()
        assert await asyncio.to_thread(w.registry.wait_for_builds, 60)
        await asyncio.sleep(0)
        assert "of revision 2" in (await w.invoke({})).logs

    run(world, scenario)


def test_the_client_context_reaches_the_invocation_compact(world: World) -> None:
    async def scenario(w: World) -> None:
        w.create()
        result = await w.invoker.invoke("fn", b"{}", client_context='{"custom": {"a": 1},\n "env": {}}')
        assert json.loads(result.payload)["client_context"] == '{"custom":{"a":1},"env":{}}'
        assert json.loads((await w.invoke({})).payload)["client_context"] is None
        for bad, message in (("not json", "not valid JSON"), ("[1]", "JSON object"),
                             (json.dumps({"k": "v" * 3000}), "limit")):
            with pytest.raises(InvalidInput, match=f"client_context: .*{message}"):
                await w.invoker.invoke("fn", b"{}", client_context=bad)

    run(world, scenario)


def _installed(runtime_id: str) -> bool:
    try:
        return default_registry().resolve(runtime_id).installed
    except InvalidInput:
        return False


# --- streamed responses ------------------------------------------------------------------


def test_a_streamed_response_flows_to_the_callers_stream_while_the_call_runs(world: World) -> None:
    async def scenario(w: World) -> None:
        w.create()
        assert (await w.invoke({})).cold_start  # an instance to hold the gate of
        stream = ResponseStream()
        call = asyncio.create_task(w.invoke({"do": "stream", "chunks": ["one ", "two ", "three"]},
                                            stream=stream))
        assert await stream.started() is True and stream.content_type == "text/plain"
        assert await stream.read() == b"one "  # while the function still runs
        assert not call.done() and w.invoker.stats()["inflight"] == 1
        assert w.driver.gate is not None
        w.driver.gate.set()
        assert b"".join([part async for part in stream]) == b"two three"
        result = await call
        assert result.outcome is Outcome.SUCCESS and result.streamed and result.payload == b""
        assert result.cold_start is False and "call 2" in result.logs  # output kept as ever
        assert stream.closed and stream.error_type is None
        assert (await w.invoke({})).cold_start is False  # the instance went back to the pool
        await w.recorder.flush()
        records, total = w.recorder.query("fn", 10, 0)
        assert total == 3 and all(r.outcome == "success" for r in records)

    run(world, scenario)


def test_an_error_after_the_stream_started_ends_it_and_is_the_outcome(world: World) -> None:
    async def scenario(w: World) -> None:
        w.create()
        await w.invoke({})
        assert w.driver.gate is not None
        w.driver.gate.set()
        stream = ResponseStream()
        result = await w.invoke({"do": "stream", "chunks": ["partial"], "then": "raise"}, stream=stream)
        assert await stream.started() is True and await stream.read() == b"partial"
        assert (stream.error_type, stream.error_message) == ("StreamError", "broke mid-stream")
        assert result.outcome is Outcome.ERROR and result.streamed
        assert (result.error_type, result.error_message) == ("StreamError", "broke mid-stream")
        assert (await w.invoke({})).cold_start is False  # a function error keeps the instance

    run(world, scenario)


def test_a_timeout_mid_stream_ends_the_stream_and_the_instance(world: World) -> None:
    async def scenario(w: World) -> None:
        w.create()
        await w.invoke({})
        assert w.driver.gate is not None
        w.driver.gate.set()
        stream = ResponseStream()
        result = await w.invoke({"do": "stream", "chunks": ["early"], "then": "timeout"}, stream=stream)
        assert result.outcome is Outcome.TIMEOUT and result.error_type == "Sandbox.Timeout"
        assert await stream.read() == b"early" and await stream.read() == b""
        assert stream.error_type == "Sandbox.Timeout" and "timed out" in stream.error_message
        assert (await w.invoke({})).cold_start is True  # the instance was destroyed
        await w.recorder.flush()
        records, _ = w.recorder.query("fn", 10, 0)
        assert "timeout" in {r.outcome for r in records}

    run(world, scenario)


def test_a_buffered_reply_to_a_streaming_caller_is_as_ever(world: World) -> None:
    async def scenario(w: World) -> None:
        w.create()
        stream = ResponseStream()
        result = await w.invoke({"n": 1}, stream=stream)
        assert await stream.started() is False and stream.closed
        assert result.outcome is Outcome.SUCCESS and not result.streamed
        assert json.loads(result.payload)["echo"] == {"n": 1}
        failed = ResponseStream()
        result = await w.invoke({"do": "raise"}, stream=failed)
        assert await failed.started() is False and result.error_type == "ValueError"

    run(world, scenario)


def test_a_streaming_function_called_without_a_stream_is_buffered(world: World) -> None:
    async def scenario(w: World) -> None:
        w.create()
        result = await w.invoke({"do": "stream", "chunks": ["a", "b"]})
        assert result.outcome is Outcome.SUCCESS and not result.streamed and result.payload == b"ab"
        result = await w.invoke({"do": "stream", "chunks": ["a"], "then": "raise"})
        assert result.outcome is Outcome.ERROR and result.error_type == "StreamError"

    run(world, scenario)


def test_a_call_that_raises_closes_the_callers_stream(world: World) -> None:
    async def scenario(w: World) -> None:
        stream = ResponseStream()
        with pytest.raises(FunctionNotFound):
            await w.invoke({}, name="missing", stream=stream)
        assert await stream.started() is False and stream.closed

    run(world, scenario)
