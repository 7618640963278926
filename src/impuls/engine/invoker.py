"""The invocation engine: from a function name (and qualifier) and an event to a result.

The hot path (:meth:`Invoker.invoke`) reads no database: where an alias routes
and each version's metadata and unpacked code are cached, and invalidated by the
registry's change notifications, which retire the changed version's pools
before the change is answered.  Each (function, version) has pools of its own:
an update of $LATEST retires only $LATEST's, a published version's instances
stay warm until the version (or the function) is deleted.  Records are queued
for a background writer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from impuls.config import Settings
from impuls.engine.pool import Capacity, Clock, Pool, PoolRetired
from impuls.engine.records import InvocationRecord, InvocationRecorder, LogHub, new_request_id
from impuls.engine.results import InvocationResult, Outcome
from impuls.errors import (
    FunctionChanging,
    FunctionInactive,
    FunctionNotReady,
    InvalidInput,
    LocalModeDisabled,
    PayloadTooLarge,
    SandboxError,
    ShuttingDown,
    Throttled,
)
from impuls.functions.aliases import Route
from impuls.functions.base import ALIAS_PREFIX, NOT_ENGINE
from impuls.functions.models import ACTIVE, DEFAULT_ACCOUNT, DEFAULT_REGION, LATEST, Function, function_arn
from impuls.functions.registry import FunctionRegistry
from impuls.runtimes import Runtime
from impuls.sandbox.base import InstanceSpec, SandboxDriver
from impuls.sandbox.runtime_api import Invocation, StreamSink

if TYPE_CHECKING:
    from impuls.tracing import Trace, Tracer

log = logging.getLogger("impuls.engine")
_T = TypeVar("_T")
MAX_EVENT_BYTES = 6 * 1024 * 1024
#: Lambda's limit on the client context (base64 of the JSON, 3583 bytes) as JSON
MAX_CLIENT_CONTEXT = 3583 * 3 // 4
#: how a stream is closed when its invocation raised instead of producing a result
ABORTED = "Impuls.InvocationAborted"


@dataclass(frozen=True)
class FunctionVersion:
    """One version of a function (``fn.version``: "$LATEST", "1", ...) ready to run."""

    fn: Function
    runtime: Runtime
    code_dir: Path


class Invoker:
    def __init__(self, settings: Settings, registry: FunctionRegistry, driver: SandboxDriver,
                 local_driver: SandboxDriver | None, recorder: InvocationRecorder, hub: LogHub,
                 clock: Clock = time.monotonic, draw: Callable[[], float] = random.random,
                 tracer: Tracer | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.driver = driver
        self.local_driver = local_driver
        self.recorder = recorder
        self.hub = hub
        self.clock = clock
        #: uniform in [0, 1): picks an alias's version for each call
        self.draw = draw
        #: spans of invocations (None: tracing is off, and nothing else is done for it)
        self.tracer = tracer
        self.capacity = Capacity(settings.max_concurrency)
        self.capacity.evict = self._evict_one_idle
        self._routes: dict[tuple[str, str], Route] = {}  # (function, alias)
        self._targets: dict[tuple[str, str], FunctionVersion] = {}  # (function, version)
        self._generation: dict[str, int] = {}
        self._pools: dict[tuple[str, str, int, str], Pool] = {}  # (function, version, revision, driver)
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

    def _changed_threadsafe(self, name: str, qualifier: str | None) -> None:
        """Registry listener (called from a worker thread after a commit)."""
        assert self._loop is not None
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._changed, name, qualifier)

    def _changed(self, name: str, qualifier: str | None) -> None:
        """Forget what ``qualifier`` changed (see the registry's ChangeListener) and retire
        the pools of a changed or deleted version: $LATEST's on a $LATEST change (the other
        versions are only re-read, for the function-wide reserved concurrency), a version's
        when it is deleted, every pool of the function when it is deleted."""
        if qualifier is not None and qualifier.startswith(NOT_ENGINE):
            return  # a URL or event-invoke configuration: nothing the engine keeps
        self._generation[name] = self._generation.get(name, 0) + 1
        if qualifier is not None and qualifier.startswith(ALIAS_PREFIX):
            self._routes.pop((name, qualifier[len(ALIAS_PREFIX):]), None)
            return
        retire = {qualifier} if qualifier is not None else None
        for target in list(self._targets):
            if target[0] == name and (qualifier in (None, LATEST) or target[1] == qualifier):
                del self._targets[target]
        if qualifier != LATEST:
            for route in [r for r in self._routes if r[0] == name]:
                del self._routes[route]
        for key, pool in list(self._pools.items()):
            if key[0] == name and (retire is None or key[1] in retire):
                pool.retire()
        for driver in self._drivers():
            driver.retire_templates(name, qualifier)

    async def _cached(self, name: str, load: Callable[[], _T], cache: dict[tuple[str, str], _T],
                      key: tuple[str, str]) -> _T:
        """``load()`` in a thread; kept in ``cache`` unless a change of ``name`` came meanwhile."""
        generation = self._generation.get(name, 0)
        value = await asyncio.to_thread(load)
        if self._generation.get(name, 0) == generation:
            cache[key] = value
        return value

    async def _target(self, name: str, qualifier: str | None) -> FunctionVersion:
        """The version a call of ``name:qualifier`` runs (an alias picks one per call)."""
        if not qualifier or qualifier == LATEST:
            version = LATEST
        elif qualifier.isascii() and qualifier.isdigit():
            version = str(int(qualifier))
        else:
            route = self._routes.get((name, qualifier))
            if route is None:
                route = await self._cached(name, lambda: self.registry.route(name, qualifier),
                                           self._routes, (name, qualifier))
            version = route.pick(self.draw())
        target = self._targets.get((name, version))
        if target is None:
            target = await self._cached(name, lambda: self._load(name, version), self._targets,
                                        (name, version))
        return target

    def _load(self, name: str, version: str) -> FunctionVersion:
        fn = self.registry.get(name, version)
        if fn.state != ACTIVE:  # never cached: the build's end is announced
            raise FunctionNotReady(name, fn.state, fn.state_reason)
        return FunctionVersion(fn, self.registry.runtime(fn), self.registry.package(fn).directory)

    def _pool(self, version: FunctionVersion, driver: SandboxDriver) -> Pool:
        fn = version.fn
        key = (fn.name, fn.version, fn.revision, driver.name)
        pool = self._pools.get(key)
        if pool is not None and not pool.retired:
            pool.max_concurrency = fn.concurrency_limit  # reserved concurrency may have changed
            return pool

        def spec(instance_id: str) -> InstanceSpec:
            return InstanceSpec(
                instance_id=instance_id, function_name=fn.name, revision=fn.revision,
                runtime=version.runtime, handler=fn.handler, code_dir=version.code_dir,
                memory_mb=fn.memory_mb, ephemeral_storage_mb=fn.ephemeral_storage_mb,
                environment=fn.environment, version=fn.version, init_once=fn.init_once,
            )

        pool = Pool(spec, driver, fn.concurrency_limit, self.capacity, self.settings.queue_size,
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
        for driver in self._drivers():
            driver.expire_templates(self.settings.idle_timeout)
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

    async def invoke(self, name: str, payload: bytes, qualifier: str | None = None, local: bool = False,
                     client_context: str | None = None, region: str = DEFAULT_REGION,
                     account: str = DEFAULT_ACCOUNT, stream: StreamSink | None = None,
                     request_id: str | None = None, traceparent: str | None = None,
                     tracestate: str | None = None) -> InvocationResult:
        """Run function ``name`` on ``payload`` (JSON bytes); see the API docs for outcomes.

        ``qualifier``: None or "$LATEST", a version number, or an alias (which picks its
        version, or its additional version with the routing weight's probability, per
        call).  ``client_context``: a JSON object (as text) the runtime gets in
        ``Lambda-Runtime-Client-Context``.  ``region`` and ``account`` go into the invoked
        ARN the function sees (with the qualifier as given).  Raises before any instance is used:
        FunctionNotFound, VersionNotFound, AliasNotFound, FunctionNotReady (Pending or
        Failed), FunctionInactive, Throttled (reserved concurrency 0), InvalidInput.

        ``stream`` (a door that can stream a response, e.g. with a
        :class:`~impuls.sandbox.runtime_api.ResponseStream`): when the runtime answers in
        streaming mode, the response goes there piece by piece as it is produced, and the
        result says ``streamed`` (its payload is empty).  The call returns when the stream
        has ended (instance released, record queued).  Whatever happens, the stream is
        closed before this returns or raises: with the result's error when the invocation
        failed (a timeout or crash mid-stream ends the stream so), never opened when the
        runtime answered the usual way (the result is then sent whole, as without a stream).

        ``request_id`` (an asynchronous event's, the same on every retry) replaces a new one.

        ``traceparent``/``tracestate`` (W3C trace context, the caller's): with tracing on, the
        invocation's span is their child (else it starts a trace); ignored with tracing off.
        """
        request_id = request_id or new_request_id()
        try:
            if self.tracer is None:
                return await self._invoke(name, payload, qualifier, local, client_context, region, account,
                                          stream, request_id, None)
            trace = self.tracer.invocation(name, request_id, traceparent, tracestate)
            try:
                return await self._invoke(name, payload, qualifier, local, client_context, region, account,
                                          stream, request_id, trace)
            except BaseException as exc:  # refused (not found, throttled, ...) or cancelled
                trace.fail(exc)
                raise
        finally:
            if stream is not None:  # a no-op when _run closed it; else the call never ran
                stream.close(ABORTED, "the invocation ended without a result")

    async def _invoke(self, name: str, payload: bytes, qualifier: str | None, local: bool,
                      client_context: str | None, region: str, account: str,
                      stream: StreamSink | None, request_id: str, trace: Trace | None) -> InvocationResult:
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if len(payload) > MAX_EVENT_BYTES:
            raise PayloadTooLarge(f"event of {len(payload)} bytes exceeds the {MAX_EVENT_BYTES} byte limit")
        context = _client_context(client_context)
        driver = self._driver_for(local)
        target = await self._target(name, qualifier)
        self._check(target, driver)
        self._inflight += 1
        try:
            arn = function_arn(name, qualifier or None, region, account)
            return await self._run(target, qualifier, driver, payload, context, arn, stream, request_id,
                                   trace)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle_event.set()

    async def check(self, name: str, qualifier: str | None = None) -> Function:
        """The function version a call would run, if ``invoke`` would not refuse it before
        running anything (not found, not ready, inactive) -- throttling apart: an asynchronous
        event is accepted and delivered once its function can run."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        target = await self._target(name, qualifier)
        if target.fn.status != "active":
            raise FunctionInactive(name)
        return target.fn

    @staticmethod
    def _check(target: FunctionVersion, driver: SandboxDriver) -> None:
        fn = target.fn
        if fn.status != "active":
            raise FunctionInactive(fn.name)
        if not driver.supports(target.runtime):
            raise InvalidInput(f"runtime {target.runtime.id} is not offered by the {driver.name} sandbox")
        if fn.concurrency_limit == 0:
            raise Throttled(f"function '{fn.name}' has a reserved concurrency of 0: every invocation "
                            "is throttled")

    def _driver_for(self, local: bool) -> SandboxDriver:
        if not local:
            return self.driver
        if self.local_driver is None:
            raise LocalModeDisabled()
        return self.local_driver

    async def _run(self, target: FunctionVersion, qualifier: str | None, driver: SandboxDriver,
                   payload: bytes, context: str | None, arn: str, stream: StreamSink | None,
                   request_id: str, trace: Trace | None) -> InvocationResult:
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        name = target.fn.name
        listener = None
        if self.hub.wants(name):
            def listener(data: bytes) -> None:
                self.hub.publish(name, {"request_id": request_id,
                                        "text": data.decode("utf-8", "replace")})
        result: InvocationResult
        try:
            for _attempt in range(5):
                timeout = float(target.fn.timeout_sec)
                invocation = Invocation(  # traced: the pool sets trace_id to the runtime call's
                    request_id=request_id, payload=payload,
                    deadline_ms=int((time.time() + timeout) * 1000),
                    function_arn=arn, trace_id=_trace_id(request_id) if trace is None else "",
                    client_context=context, stream=stream,
                )
                try:
                    result = await self._pool(target, driver).run(invocation, timeout, listener, trace)
                    break
                except PoolRetired:
                    target = await self._target(name, qualifier)
                    self._check(target, driver)
            else:
                raise FunctionChanging(f"function '{name}' keeps changing; retry")
        except SandboxError as exc:
            result = InvocationResult.from_error(request_id, exc)
        if stream is not None:  # a timeout or crash mid-stream ends the stream with its error
            failed = result.outcome is not Outcome.SUCCESS
            stream.close(result.error_type or "Runtime.Unknown" if failed else None,
                         result.error_message if failed else "")
        result.duration_ms = (time.perf_counter() - t0) * 1000
        result.executed_version = target.fn.version
        logs = result.logs if "\0" not in result.logs else result.logs.replace("\0", "\ufffd")
        self.recorder.add(InvocationRecord(  # as the table takes them: no NUL, bounded strings
            request_id=request_id, function_name=name, function_id=target.fn.id, started_at=started,
            duration_ms=result.duration_ms, outcome=result.outcome.value,
            error_type=None if result.error_type is None else result.error_type[:128],
            cold_start=result.cold_start, sandbox=driver.name, logs=logs,
            logs_truncated=result.logs_truncated, note=result.note[:256],
        ))
        if trace is not None:
            trace.finish({"faas.version": target.fn.version, "faas.coldstart": result.cold_start,
                          "impuls.outcome": result.outcome.value, "impuls.sandbox": driver.name},
                         result.error_type, result.error_message)
        return result


def _client_context(text: str | None) -> str | None:
    """The client context as compact JSON on one line (it becomes a header), or InvalidInput."""
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"client_context: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise InvalidInput("client_context: must be a JSON object")
    compact = json.dumps(doc, separators=(",", ":"))
    if len(compact) > MAX_CLIENT_CONTEXT:
        raise InvalidInput(f"client_context: {len(compact)} bytes exceeds the limit of {MAX_CLIENT_CONTEXT}")
    return compact


def _trace_id(request_id: str) -> str:
    """An X-Ray-style trace header (``Root=1-<time>-<24 hex>``) derived from the request id
    (its last 24 hex digits: the random part; the first 12 of a new id are its time)."""
    hex_id = request_id.replace("-", "")
    return f"Root=1-{int(time.time()):08x}-{hex_id[-24:]};Sampled=0"
