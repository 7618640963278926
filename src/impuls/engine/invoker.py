"""The invocation engine: from a function name and an event to a result.

The hot path (:meth:`Invoker.invoke`) reads no database: function metadata
and unpacked code are cached per name and invalidated by the registry's
change notifications, which retire the old version's pools before the
update is answered.  Records are queued for a background writer.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from impuls.config import Settings
from impuls.engine.pool import Capacity, Clock, Pool, PoolRetired
from impuls.engine.records import InvocationRecord, InvocationRecorder, LogHub
from impuls.engine.results import InvocationResult
from impuls.errors import (
    FunctionChanging,
    FunctionInactive,
    InvalidInput,
    LocalModeDisabled,
    PayloadTooLarge,
    SandboxError,
    ShuttingDown,
)
from impuls.functions.models import Function, function_arn
from impuls.functions.registry import FunctionRegistry
from impuls.runtimes import Runtime
from impuls.sandbox.base import InstanceSpec, SandboxDriver
from impuls.sandbox.runtime_api import Invocation

log = logging.getLogger("impuls.engine")
MAX_EVENT_BYTES = 6 * 1024 * 1024


@dataclass(frozen=True)
class FunctionVersion:
    fn: Function
    runtime: Runtime
    code_dir: Path


class Invoker:
    def __init__(self, settings: Settings, registry: FunctionRegistry, driver: SandboxDriver,
                 local_driver: SandboxDriver | None, recorder: InvocationRecorder, hub: LogHub,
                 clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self.registry = registry
        self.driver = driver
        self.local_driver = local_driver
        self.recorder = recorder
        self.hub = hub
        self.clock = clock
        self.capacity = Capacity(settings.max_concurrency)
        self.capacity.evict = self._evict_one_idle
        self._functions: dict[str, FunctionVersion] = {}
        self._generation: dict[str, int] = {}
        self._pools: dict[tuple[str, int, str], Pool] = {}
        self._inflight = 0
        self._idle_event = asyncio.Event()
        self._closing = False
        self._reaper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for driver in self._drivers():
            reaped = await driver.reap_orphans()
            if reaped:
                log.warning("killed %d %s instances left by a previous server", reaped, driver.name)
            await driver.start()
        self.registry.on_change(self._changed_threadsafe)
        self.recorder.start()
        self._reaper = self._loop.create_task(self._reap_idle())

    def _drivers(self) -> list[SandboxDriver]:
        drivers = [self.driver]
        if self.local_driver is not None and self.local_driver is not self.driver:
            drivers.append(self.local_driver)
        return drivers

    async def close(self) -> None:
        """Drain: let in-flight calls finish (up to the grace period), then destroy everything."""
        self._closing = True
        if self._inflight:
            self._idle_event.clear()
            try:
                await asyncio.wait_for(self._idle_event.wait(), self.settings.shutdown_grace)
            except TimeoutError:
                log.warning("%d invocations still running after the grace period", self._inflight)
        if self._reaper is not None:
            self._reaper.cancel()
        for pool in self._pools.values():
            pool.retire()
        await asyncio.gather(*(pool.drain() for pool in self._pools.values()))
        for driver in self._drivers():
            await driver.close()
        await self.recorder.close()

    # --- function cache --------------------------------------------------------

    def _changed_threadsafe(self, name: str) -> None:
        """Registry listener (called from a worker thread after a commit)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._changed, name)

    def _changed(self, name: str) -> None:
        self._generation[name] = self._generation.get(name, 0) + 1
        self._functions.pop(name, None)
        for key, pool in list(self._pools.items()):
            if key[0] == name:
                pool.retire()

    async def _function(self, name: str) -> FunctionVersion:
        cached = self._functions.get(name)
        if cached is not None:
            return cached
        generation = self._generation.get(name, 0)
        version = await asyncio.to_thread(self._load, name)
        if self._generation.get(name, 0) == generation:
            self._functions[name] = version
        return version

    def _load(self, name: str) -> FunctionVersion:
        fn = self.registry.get(name)
        return FunctionVersion(fn, self.registry.runtime(fn), self.registry.package(fn).directory)

    def _pool(self, version: FunctionVersion, driver: SandboxDriver) -> Pool:
        fn = version.fn
        key = (fn.name, fn.revision, driver.name)
        pool = self._pools.get(key)
        if pool is None or pool.retired:
            def spec(instance_id: str) -> InstanceSpec:
                return InstanceSpec(
                    instance_id=instance_id, function_name=fn.name, revision=fn.revision,
                    runtime=version.runtime, handler=fn.handler, code_dir=version.code_dir,
                    memory_mb=fn.memory_mb, ephemeral_storage_mb=fn.ephemeral_storage_mb,
                    environment=fn.environment,
                )

            pool = Pool(spec, driver, fn.max_concurrency, self.capacity, self.settings.queue_size,
                        self.settings.queue_timeout, self.clock)
            self._pools[key] = pool
        return pool

    # --- idle expiry -----------------------------------------------------------

    async def _reap_idle(self) -> None:
        interval = max(0.05, min(1.0, self.settings.idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            self.expire_idle()

    def expire_idle(self) -> int:
        """Destroy instances idle past the timeout; forget retired, empty pools."""
        expired = 0
        for key, pool in list(self._pools.items()):
            expired += pool.expire_idle(self.settings.idle_timeout)
            if pool.retired and pool.empty:
                del self._pools[key]
        return expired

    def _evict_one_idle(self) -> bool:
        candidates = [(since, pool) for pool in self._pools.values()
                      if (since := pool.oldest_idle_since()) is not None]
        if not candidates:
            return False
        min(candidates, key=lambda c: c[0])[1].evict_oldest_idle()
        return True

    def stats(self) -> dict[str, int]:
        pools = self._pools.values()
        return {"instances": sum(p.size for p in pools), "idle": sum(len(p.idle) for p in pools),
                "inflight": self._inflight, "queued": sum(len(p.waiters) for p in pools)}

    # --- invoking --------------------------------------------------------------

    async def invoke(self, name: str, payload: bytes, local: bool = False) -> InvocationResult:
        """Run function ``name`` on ``payload`` (JSON bytes); see the API docs for outcomes."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if len(payload) > MAX_EVENT_BYTES:
            raise PayloadTooLarge(f"event of {len(payload)} bytes exceeds the {MAX_EVENT_BYTES} byte limit")
        driver = self._driver_for(local)
        version = await self._function(name)
        if version.fn.status != "active":
            raise FunctionInactive(name)
        if not driver.supports(version.runtime):
            raise InvalidInput(f"runtime {version.runtime.id} is not offered by the {driver.name} sandbox")
        self._inflight += 1
        try:
            return await self._run(version, driver, payload)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle_event.set()

    def _driver_for(self, local: bool) -> SandboxDriver:
        if not local:
            return self.driver
        if self.local_driver is None:
            raise LocalModeDisabled()
        return self.local_driver

    async def _run(self, version: FunctionVersion, driver: SandboxDriver, payload: bytes) -> InvocationResult:
        request_id = str(uuid.uuid4())
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        name = version.fn.name
        listener = None
        if self.hub.wants(name):
            def listener(data: bytes) -> None:
                self.hub.publish(name, {"request_id": request_id,
                                        "text": data.decode("utf-8", "replace")})
        timeout = float(version.fn.timeout_sec)
        result: InvocationResult
        try:
            for _attempt in range(5):
                invocation = Invocation(
                    request_id=request_id, payload=payload,
                    deadline_ms=int((time.time() + timeout) * 1000),
                    function_arn=function_arn(name), trace_id=_trace_id(request_id),
                )
                try:
                    result = await self._pool(version, driver).run(invocation, timeout, listener)
                    break
                except PoolRetired:
                    version = await self._function(name)
            else:
                raise FunctionChanging(f"function '{name}' keeps changing; retry")
        except SandboxError as exc:
            result = InvocationResult.from_error(request_id, exc)
        result.duration_ms = (time.perf_counter() - t0) * 1000
        self.recorder.add(InvocationRecord(
            request_id=request_id, function_name=name, function_id=version.fn.id, started_at=started,
            duration_ms=result.duration_ms, outcome=result.outcome.value, error_type=result.error_type,
            cold_start=result.cold_start, sandbox=driver.name, logs=result.logs,
            logs_truncated=result.logs_truncated, note=result.note,
        ))
        return result


def _trace_id(request_id: str) -> str:
    """An X-Ray-style trace header (``Root=1-<time>-<24 hex>``) derived from the request id."""
    hex_id = request_id.replace("-", "")
    return f"Root=1-{int(time.time()):08x}-{hex_id[:24]};Sampled=0"
