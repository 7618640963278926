"""Pool policy with a fake driver and an injected clock (deterministic; no processes)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from impuls.engine.pool import START_ATTEMPTS, Capacity, Pool, PoolRetired
from impuls.errors import InitFailed, SandboxKilled, Throttled
from impuls.runtimes import default_registry
from impuls.sandbox.base import Instance, InstanceSpec, SandboxDriver
from impuls.sandbox.runtime_api import Invocation, RuntimeAPI, RuntimeReply


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeInstance(Instance):
    def __init__(self, spec: InstanceSpec, delay: float) -> None:
        super().__init__(spec, RuntimeAPI())
        self.delay = delay
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @property
    def exited(self) -> asyncio.Future[int]:
        return self._exited

    def drain_output(self) -> None:
        pass

    async def _teardown(self) -> None:
        if not self._exited.done():
            self._exited.set_result(-9)

    async def invoke(self, invocation: Invocation, timeout: float) -> RuntimeReply:
        await asyncio.sleep(self.delay)
        return RuntimeReply(True, b'"ok"')


class FakeDriver(SandboxDriver):
    name = "fake"

    def __init__(self, delay: float = 0.0, init_error: bool = False, killed: int = 0) -> None:
        self.delay = delay
        self.init_error = init_error
        #: how many of the next starts have their sandbox killed under them
        self.killed = killed
        self.created = 0
        self.ids: list[str] = []

    async def create(self, spec: InstanceSpec) -> Instance:
        self.created += 1
        self.ids.append(spec.instance_id)
        if self.killed:
            self.killed -= 1
            raise SandboxKilled("the runtime was killed by SIGKILL while it started", "half a log\n")
        if self.init_error:
            raise InitFailed("Runtime.ImportModuleError", "no module")
        return FakeInstance(spec, self.delay)


def spec(instance_id: str) -> InstanceSpec:
    return InstanceSpec(instance_id=instance_id, function_name="f", revision=1,
                        runtime=default_registry().resolve("python3.11"), handler="h.h",
                        code_dir=Path("/nonexistent"), memory_mb=128,
                        ephemeral_storage_mb=512, environment={})


def pool(driver: FakeDriver, clock: FakeClock, **kw: Any) -> Pool:
    args: dict[str, Any] = {"max_concurrency": 2, "queue_size": 1, "queue_timeout": 5.0}
    args.update(kw)
    return Pool(spec, driver, capacity=Capacity(100), clock=clock, **args)


def inv() -> Invocation:
    return Invocation(str(uuid.uuid4()), b"{}", int(time.time() * 1000) + 3000, "arn")


def test_warm_reuse_and_idle_expiry() -> None:
    async def scenario() -> None:
        clock, driver = FakeClock(), FakeDriver()
        p = pool(driver, clock)
        assert (await p.run(inv(), 1)).cold_start is True
        assert (await p.run(inv(), 1)).cold_start is False
        assert driver.created == 1 and len(p.idle) == 1
        clock.now += 299
        assert p.expire_idle(300) == 0
        clock.now += 2
        assert p.expire_idle(300) == 1 and p.size == 0
        await p.drain()
        assert (await p.run(inv(), 1)).cold_start is True

    asyncio.run(scenario())


def test_concurrency_limit_queue_and_429() -> None:
    async def scenario() -> None:
        clock, driver = FakeClock(), FakeDriver(delay=0.2)
        p = pool(driver, clock, max_concurrency=2, queue_size=1)
        running = [asyncio.create_task(p.run(inv(), 1)) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert p.size == 2 and len(p.waiters) == 1
        with pytest.raises(Throttled):
            await p.run(inv(), 1)
        outcomes = await asyncio.gather(*running)
        assert driver.created == 2 and [o.cold_start for o in outcomes].count(False) == 1

    asyncio.run(scenario())


def test_queue_timeout_is_429() -> None:
    async def scenario() -> None:
        p = pool(FakeDriver(delay=0.5), FakeClock(), max_concurrency=1, queue_timeout=0.05)
        first = asyncio.create_task(p.run(inv(), 1))
        await asyncio.sleep(0.01)
        with pytest.raises(Throttled):
            await p.run(inv(), 1)
        await first
        assert not p.waiters

    asyncio.run(scenario())


def test_init_failure_backs_off() -> None:
    async def scenario() -> None:
        clock, driver = FakeClock(), FakeDriver(init_error=True)
        p = pool(driver, clock)
        for _ in range(5):
            with pytest.raises(InitFailed):
                await p.run(inv(), 1)
        assert driver.created == 1  # replayed, not restarted
        clock.now += 1.5
        with pytest.raises(InitFailed):
            await p.run(inv(), 1)
        assert driver.created == 2
        clock.now += 1.5  # the back-off doubled to 2 s
        with pytest.raises(InitFailed):
            await p.run(inv(), 1)
        assert driver.created == 2

    asyncio.run(scenario())


def test_retire_destroys_idle_and_wakes_waiters() -> None:
    async def scenario() -> None:
        clock, driver = FakeClock(), FakeDriver(delay=0.1)
        p = pool(driver, clock, max_concurrency=1, queue_size=5)
        busy = asyncio.create_task(p.run(inv(), 1))
        await asyncio.sleep(0.01)
        waiting = asyncio.create_task(p.run(inv(), 1))
        await asyncio.sleep(0.01)
        p.retire()
        with pytest.raises(PoolRetired):
            await waiting
        await busy  # the call in progress finishes on its instance...
        await p.drain()
        assert p.size == 0 and not p.idle  # ...which is destroyed afterwards

    asyncio.run(scenario())


def test_server_wide_capacity_evicts_idle_elsewhere() -> None:
    async def scenario() -> None:
        clock, capacity = FakeClock(), Capacity(1)
        a = Pool(spec, FakeDriver(), 5, capacity, 1, 5.0, clock)
        b = Pool(spec, FakeDriver(), 5, capacity, 1, 5.0, clock)
        capacity.evict = lambda: a.evict_oldest_idle() is not None
        await a.run(inv(), 1)
        assert capacity.used == 1 and len(a.idle) == 1
        await b.run(inv(), 1)
        assert capacity.used == 1 and not a.idle and len(b.idle) == 1

    asyncio.run(scenario())


def test_a_start_whose_sandbox_was_killed_is_made_again_on_a_new_instance() -> None:
    async def scenario() -> None:
        clock, driver = FakeClock(), FakeDriver(killed=START_ATTEMPTS - 1)
        p = pool(driver, clock)
        result = await p.run(inv(), 1)
        assert result.outcome.value == "success" and result.cold_start
        assert driver.created == START_ATTEMPTS and len(set(driver.ids)) == START_ATTEMPTS  # new ones
        assert "killed" in result.note
        assert p.size == 1 and p.capacity.used == 1  # one instance: the lost starts left nothing
        assert (await p.run(inv(), 1)).cold_start is False

    asyncio.run(scenario())


def test_starts_killed_every_time_fail_as_the_sandbox_and_are_never_replayed() -> None:
    async def scenario() -> None:
        clock, driver = FakeClock(), FakeDriver(killed=START_ATTEMPTS)
        p = pool(driver, clock)
        with pytest.raises(SandboxKilled) as info:
            await p.run(inv(), 1)
        assert not isinstance(info.value, InitFailed)
        assert driver.created == START_ATTEMPTS  # bounded
        assert p.size == 0 and p.capacity.used == 0
        result = await p.run(inv(), 1)  # at once, no back-off: the function did not fail
        assert result.outcome.value == "success" and driver.created == START_ATTEMPTS + 1

    asyncio.run(scenario())


def test_a_killed_start_neither_replays_nor_clears_a_real_init_failure() -> None:
    async def scenario() -> None:
        clock, driver = FakeClock(), FakeDriver(init_error=True)
        p = pool(driver, clock)
        with pytest.raises(InitFailed):
            await p.run(inv(), 1)
        clock.now += 1.5  # the back-off is over; this start is killed, then the code fails again
        driver.killed = 1
        with pytest.raises(InitFailed):
            await p.run(inv(), 1)
        assert driver.created == 3
        with pytest.raises(InitFailed):  # replayed again, with a longer back-off
            await p.run(inv(), 1)
        assert driver.created == 3

    asyncio.run(scenario())
