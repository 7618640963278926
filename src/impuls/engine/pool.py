"""Per-function-version pools of warm instances.

A :class:`Pool` owns the instances of one function revision on one driver.
An instance serves one invocation at a time.  A call takes an idle instance
(warm), or starts one (cold) while the pool is under its ``max_concurrency``
and the server-wide :class:`Capacity` has room; otherwise it waits in a
bounded queue and gets :class:`~impuls.errors.Throttled` when the queue
is full or the wait times out.  A function whose init fails is not restarted
in a tight loop: the failure is replayed to callers for a growing back-off.
A start whose sandbox was killed from outside (:class:`~impuls.errors.SandboxKilled`)
is no failure of the function: it is tried again at once on a new instance, up to
``START_ATTEMPTS`` starts per call, and never replayed.  Likewise a warm instance whose
runtime died before it read the call (:class:`~impuls.errors.RuntimeGoneBeforeCall`):
the call goes to another instance (``CALL_ATTEMPTS`` in all).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from impuls.engine.results import InvocationResult
from impuls.errors import InitFailed, RuntimeGoneBeforeCall, SandboxError, SandboxKilled, Throttled
from impuls.sandbox.base import Instance, InstanceSpec, SandboxDriver
from impuls.sandbox.runtime_api import Invocation

if TYPE_CHECKING:
    from impuls.tracing import Trace

log = logging.getLogger("impuls.pool")
Clock = Callable[[], float]
INIT_BACKOFF_FIRST = 1.0
INIT_BACKOFF_MAX = 60.0
#: starts one call may make when the sandbox of its instance is killed while it starts
#: (the first and up to two more); after that the call fails with the SandboxKilled
START_ATTEMPTS = 3
#: instances one call may be given when each one's runtime turns out dead before it read the call
CALL_ATTEMPTS = 3


class PoolRetired(Exception):
    """The pool's function version was replaced; the caller should use the new one."""


class Capacity:
    """The server-wide cap on live instances.  ``evict`` frees an idle one when full."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.evict: Callable[[], bool] = lambda: False

    def take(self) -> bool:
        if self.used >= self.limit and not self.evict():
            return False
        self.used += 1
        return True

    def give(self) -> None:
        self.used -= 1


class Pool:
    def __init__(self, spec: Callable[[str], InstanceSpec], driver: SandboxDriver, max_concurrency: int,
                 capacity: Capacity, queue_size: int, queue_timeout: float, clock: Clock) -> None:
        self._spec = spec
        self.driver = driver
        self.max_concurrency = max_concurrency
        self.capacity = capacity
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.clock = clock
        self.idle: list[tuple[Instance, float]] = []  # (instance, idle since); newest last
        self.size = 0  # live + starting instances
        self.waiters: collections.deque[asyncio.Future[Instance | None]] = collections.deque()
        self.retired = False
        self._init_failure: InitFailed | None = None
        self._retry_at = 0.0
        self._backoff = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def busy(self) -> int:
        return self.size - len(self.idle)

    async def run(self, invocation: Invocation, timeout: float,
                  on_output: Callable[[bytes], None] | None = None,
                  trace: Trace | None = None) -> InvocationResult:
        """Serve ``invocation`` on an instance of this pool (see module doc); a sandbox
        condition is raised with the instance's output in its ``logs``.  With a ``trace``, the
        wait, a cold start and the runtime call are its child spans, and the runtime gets the
        runtime call's trace header.  An instance whose runtime died before it read the
        invocation (killed while idle) did not run it: the call goes to another instance,
        within what is left of ``timeout`` (``CALL_ATTEMPTS`` instances in all)."""
        t0 = time.monotonic()
        for attempt in range(1, CALL_ATTEMPTS + 1):
            try:
                result = await self._run_on_one(invocation, timeout - (time.monotonic() - t0),
                                                on_output, trace)
            except RuntimeGoneBeforeCall as exc:
                if attempt == CALL_ATTEMPTS:
                    raise
                log.info("%s: %s; the call goes to another instance",
                         invocation.request_id, exc.message)
                continue
            if attempt > 1:
                moved = (f"instance {attempt} of {CALL_ATTEMPTS}: the runtime of each earlier one "
                         "died before it read the call")
                result.note = f"{result.note}; {moved}" if result.note else moved
            return result
        raise AssertionError("unreachable")

    async def _run_on_one(self, invocation: Invocation, timeout: float,
                          on_output: Callable[[bytes], None] | None,
                          trace: Trace | None) -> InvocationResult:
        instance, cold = await self._acquire(trace)
        healthy = False
        instance.output.listener = on_output
        if trace is not None:
            invocation.trace_id = trace.start_call(instance.spec.instance_id)
        try:
            reply = await instance.invoke(invocation, timeout)
            healthy = True
            logs, truncated = instance.output.take()
            return InvocationResult.from_reply(invocation.request_id, reply, cold, logs, truncated,
                                               instance.note if cold else "")
        except SandboxError as exc:
            exc.logs, _ = instance.output.take()
            if trace is not None:
                trace.end_call(exc.error_type, exc.message)
            raise
        finally:
            instance.output.listener = None
            self._release(instance, healthy)
            if trace is not None:
                trace.end_call()

    # --- acquiring -------------------------------------------------------------

    async def _acquire(self, trace: Trace | None = None) -> tuple[Instance, bool]:
        while True:
            if self.retired:
                raise PoolRetired
            if self._init_failure is not None and self.clock() < self._retry_at:
                failure = self._init_failure
                raise InitFailed(failure.error_type, failure.message, failure.logs, failure.stack)
            while self.idle:
                instance, _ = self.idle.pop()
                if not instance.exited.done():
                    return instance, False
                self._discard(instance)
            if self.size < self.max_concurrency and self.capacity.take():
                return await self._start(trace), True
            handed = await (self._wait() if trace is None else self._traced_wait(trace))
            if handed is not None:
                return handed, False

    async def _start(self, trace: Trace | None = None) -> Instance:
        self.size += 1
        try:
            instance = await self._create(trace)
        except BaseException as exc:
            self.size -= 1
            self.capacity.give()
            if isinstance(exc, InitFailed):
                self._backoff = min(max(self._backoff * 2, INIT_BACKOFF_FIRST), INIT_BACKOFF_MAX)
                self._init_failure, self._retry_at = exc, self.clock() + self._backoff
            self._wake(None)
            raise
        self._init_failure, self._backoff = None, 0.0
        return instance

    async def _create(self, trace: Trace | None) -> Instance:
        """``driver.create`` of a new instance; when its sandbox was killed while it
        started, again on another new instance (``START_ATTEMPTS`` in all).  Only the
        last SandboxKilled is raised; a real init failure (InitFailed) ends it at once."""
        for attempt in range(1, START_ATTEMPTS + 1):
            spec = self._spec(uuid.uuid4().hex[:16])
            try:
                instance = await (self.driver.create(spec) if trace is None
                                  else self._traced_create(spec, trace))
            except SandboxKilled as exc:
                if attempt == START_ATTEMPTS:
                    log.warning("instance %s of %s: %s; giving up after %d starts", spec.instance_id,
                                spec.function_name, exc.message, attempt)
                    raise
                log.warning("instance %s of %s: %s; starting another instance", spec.instance_id,
                            spec.function_name, exc.message)
                continue
            if attempt > 1:
                retried = f"start {attempt} of {START_ATTEMPTS}: the sandbox of each earlier one was killed"
                instance.note = f"{instance.note}; {retried}" if instance.note else retried
            return instance
        raise AssertionError("unreachable")

    async def _wait(self) -> Instance | None:
        if len(self.waiters) >= self.queue_size:
            raise Throttled(
                f"too many concurrent invocations: {self.busy} running (max_concurrency "
                f"{self.max_concurrency}) and {len(self.waiters)} queued"
            )
        waiter: asyncio.Future[Instance | None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await asyncio.wait({waiter}, timeout=self.queue_timeout)
        finally:
            if not waiter.done():
                waiter.cancel()
                self.waiters.remove(waiter)
        if waiter.cancelled():
            raise Throttled(
                f"no instance became free within {self.queue_timeout:.0f} s "
                f"(max_concurrency {self.max_concurrency})"
            )
        return waiter.result()

    async def _traced_wait(self, trace: Trace) -> Instance | None:
        """``_wait``, as the span ``queue wait``."""
        start, ahead = time.time_ns(), len(self.waiters)
        attributes = {"impuls.queue.ahead": ahead, "impuls.pool.busy": self.busy}
        try:
            handed = await self._wait()
        except Throttled as exc:
            trace.add("queue wait", start, attributes, "Throttled", exc.message)
            raise
        trace.add("queue wait", start, attributes)
        return handed

    async def _traced_create(self, spec: InstanceSpec, trace: Trace) -> Instance:
        """``driver.create``, as the span ``instance start``."""
        start = time.time_ns()
        attributes: dict[str, Any] = {"impuls.instance_id": spec.instance_id,
                                      "impuls.sandbox": self.driver.name}
        try:
            instance = await self.driver.create(spec)
        except BaseException as exc:
            trace.add("instance start", start, attributes,
                      getattr(exc, "error_type", None) or type(exc).__name__, str(exc))
            raise
        if instance.note:
            attributes["impuls.note"] = instance.note
        trace.add("instance start", start, attributes)
        return instance

    def _wake(self, instance: Instance | None) -> bool:
        """Hand ``instance`` (or, with None, a free slot) to the oldest waiter."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(instance)
                return True
        return False

    # --- releasing -------------------------------------------------------------

    def _release(self, instance: Instance, healthy: bool) -> None:
        if healthy and not self.retired and not instance.exited.done():
            if not self._wake(instance):
                self.idle.append((instance, self.clock()))
        else:
            self._discard(instance)

    def _discard(self, instance: Instance) -> None:
        self.size -= 1
        self.capacity.give()
        self._spawn(instance.destroy())
        self._wake(None)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def evict_oldest_idle(self) -> float | None:
        """Destroy the longest-idle instance; returns when it went idle (None if none)."""
        if not self.idle:
            return None
        instance, since = self.idle.pop(0)
        self._discard(instance)
        return since

    def oldest_idle_since(self) -> float | None:
        return self.idle[0][1] if self.idle else None

    def expire_idle(self, idle_timeout: float) -> int:
        """Destroy instances idle for longer than ``idle_timeout``; returns how many."""
        now = self.clock()
        keep = [(i, t) for i, t in self.idle if now - t < idle_timeout]
        expired = [i for i, t in self.idle if now - t >= idle_timeout]
        self.idle = keep
        for instance in expired:
            self._discard(instance)
        return len(expired)

    def retire(self) -> None:
        """Stop using this pool: idle instances go now, busy ones when their call ends."""
        self.retired = True
        idle, self.idle = self.idle, []
        for instance, _ in idle:
            self._discard(instance)
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # wakes it; _acquire then raises PoolRetired

    @property
    def empty(self) -> bool:
        return self.size == 0 and not self._tasks

    async def drain(self) -> None:
        """Wait for every destroy this pool started."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
