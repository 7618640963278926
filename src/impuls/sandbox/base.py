"""The sandbox driver interface: one contract for every isolation technology.

A :class:`SandboxDriver` turns an :class:`InstanceSpec` into a running
:class:`Instance`: an isolated runtime that has loaded the function's code
and waits for its first event on its own Runtime API endpoint.

Contract, for every driver:

* ``create`` returns only when the runtime is ready for its first event.  It
  raises :class:`~impuls.errors.InitFailed` when the function's code failed
  to load (the runtime reported it, or exited before becoming ready) and
  :class:`~impuls.errors.SandboxStartFailed` when the sandbox itself could not
  be made; :class:`~impuls.errors.SandboxKilled` (one of those) when the
  runtime or its sandbox was killed from outside while it started (it died of
  one of ``KILL_SIGNALS``, reported no init error, was not out of memory).
  Nothing is left behind when it raises.
* ``Instance.invoke`` serves one invocation at a time.  It returns the
  runtime's reply, or raises :class:`~impuls.errors.InvocationTimedOut`
  (deadline passed; the instance must then be destroyed),
  :class:`~impuls.errors.OutOfMemory` or :class:`~impuls.errors.RuntimeExited`
  (the runtime is gone).
* ``Instance.destroy`` is idempotent and always frees everything: processes,
  sockets, scratch space, cgroups.  After it, ``exited`` is done.
* No driver lets a bare ``OSError`` escape: errors are named after the condition.
"""

from __future__ import annotations

import asyncio
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from impuls.errors import (
    InitFailed,
    InvocationTimedOut,
    OutOfMemory,
    RuntimeExited,
    RuntimeGoneBeforeCall,
    SandboxKilled,
)
from impuls.runtimes import Runtime
from impuls.sandbox.runtime_api import Invocation, RuntimeAPI, RuntimeReply

LOG_RECORD_LIMIT = 64 * 1024
#: open files a function's processes may have (Lambda's limit), whatever the server's own limit
INSTANCE_OPEN_FILES = 1024
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
#: A runtime that dies of one of these during init, without reporting an init error and
#: not out of memory, was killed from outside (the host, an operator, a chaos tool, or its
#: sandbox dying): none of a runtime's own ways to fail ends so.  Its own failures are a
#: reported init error, an exit status, a fatal signal of its own (SIGSEGV, SIGABRT,
#: SIGSYS from seccomp) or the memory limit.  (A function that sends itself SIGKILL or
#: SIGTERM while it loads cannot be told from that, and is taken for killed.)
KILL_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM})


def kill_signal(status: int, wrapper: bool = False) -> signal.Signals | None:
    """The signal of ``KILL_SIGNALS`` an exit ``status`` says a process died of: a negative
    signal number, or with ``wrapper`` (bwrap, which exits with 128 + the signal that killed
    its child) also that; None for any other status."""
    number = -status if status < 0 else (status - 128 if wrapper and status > 128 else 0)
    return next((s for s in KILL_SIGNALS if s == number), None)


@dataclass(frozen=True)
class InstanceSpec:
    """Everything a driver needs to start one instance of one function version."""

    instance_id: str
    function_name: str
    revision: int
    runtime: Runtime
    handler: str
    code_dir: Path
    memory_mb: int
    ephemeral_storage_mb: int
    environment: Mapping[str, str]
    region: str = "us-east-1"
    version: str = "$LATEST"
    #: run the function's init once per version and fork instances from it, where the
    #: driver can (docs/init-once.md); others start every instance with its own init
    init_once: bool = False

    def runtime_environment(self, api_address: str, task_root: str, tmpdir: str,
                            path: str = DEFAULT_PATH) -> dict[str, str]:
        """The instance's whole environment: the function's variables plus the
        runtime interface variables; nothing from the server's own environment."""
        env = dict(self.environment)
        env.update(
            AWS_LAMBDA_RUNTIME_API=api_address,
            _HANDLER=self.handler,
            LAMBDA_TASK_ROOT=task_root,
            AWS_LAMBDA_FUNCTION_NAME=self.function_name,
            AWS_LAMBDA_FUNCTION_MEMORY_SIZE=str(self.memory_mb),
            AWS_LAMBDA_FUNCTION_VERSION=self.version,
            AWS_LAMBDA_LOG_GROUP_NAME=f"/aws/lambda/{self.function_name}",
            AWS_LAMBDA_LOG_STREAM_NAME=(
                f"{time.strftime('%Y/%m/%d')}/[{self.version}]{self.instance_id}"
            ),
            AWS_REGION=self.region,
            TZ=":UTC",
            TMPDIR=tmpdir,
            PATH=path,
            LANG="C.UTF-8",
        )
        return env


class OutputCapture:
    """What the runtime wrote to stdout/stderr since the last ``take``, capped.

    Keeps the last ``limit`` bytes and counts what it dropped, so a function
    that writes 100 MB costs the server at most about twice ``limit`` of memory.
    ``listener`` (if set) sees every chunk as it arrives (live log follow).
    """

    def __init__(self, limit: int = LOG_RECORD_LIMIT) -> None:
        self.limit = limit
        self._buf = bytearray()
        self.dropped = 0
        self.listener: Callable[[bytes], None] | None = None

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > 2 * self.limit:
            cut = len(self._buf) - self.limit
            del self._buf[:cut]
            self.dropped += cut
        if self.listener is not None:
            self.listener(data)

    def take(self) -> tuple[str, bool]:
        """The captured text and whether some was dropped; resets the capture."""
        data = bytes(self._buf[-self.limit:])
        truncated = self.dropped > 0 or len(self._buf) > self.limit
        self._buf.clear()
        self.dropped = 0
        return data.decode("utf-8", "replace"), truncated

    def peek(self) -> str:
        return bytes(self._buf[-self.limit:]).decode("utf-8", "replace")


class Instance(ABC):
    """One isolated runtime; serves one invocation at a time (see module contract)."""

    def __init__(self, spec: InstanceSpec, api: RuntimeAPI) -> None:
        self.spec = spec
        self.api = api
        self.output = OutputCapture()
        self.created_at = time.monotonic()
        self.invocations = 0
        self.note = ""  # how the instance was started, for the invocation record
        self._destroyed = False

    @property
    @abstractmethod
    def exited(self) -> asyncio.Future[int]:
        """Completes (with an exit status) when the runtime process or VM is gone."""

    @abstractmethod
    def drain_output(self) -> None:
        """Move whatever output is already buffered by the OS into ``output`` (non-blocking)."""

    @abstractmethod
    async def _teardown(self) -> None:
        """Free every resource of the instance; called once by ``destroy``."""

    def oom_killed(self) -> bool:
        """True when the instance was killed for exceeding its memory limit."""
        return False

    def killed_by(self) -> signal.Signals | None:
        """The signal of ``KILL_SIGNALS`` the runtime died of (None: it exited otherwise, or
        has not); by default read from ``exited``, a negative signal number."""
        if not self.exited.done() or self.exited.cancelled():
            return None
        return kill_signal(self.exited.result())

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    async def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        self.api.close()
        await self._teardown()

    async def ready_or_destroyed(self, timeout: float) -> None:
        """``wait_ready``; on any failure the instance is destroyed before the error
        propagates, so a failed ``create`` leaves nothing behind."""
        try:
            await self.wait_ready(timeout)
        except BaseException:
            await self.destroy()
            raise

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the runtime asks for its first event; raise InitFailed otherwise, or
        SandboxKilled when the runtime was killed from outside (see the module contract)."""
        waitables: set[asyncio.Future[Any]] = {self.api.ready, self.exited}
        await asyncio.wait(waitables, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self.api.ready.done() and not self.api.ready.cancelled():
            exc = self.api.ready.exception()
            if exc is None:
                return
            self.drain_output()
            if isinstance(exc, InitFailed):
                exc.logs = self.output.peek()
            raise exc
        self.drain_output()
        logs = self.output.peek()
        if self.exited.done():
            if self.oom_killed():
                raise InitFailed(OutOfMemory.error_type,
                                 f"out of memory during init ({self.spec.memory_mb} MB)", logs)
            killer = self.killed_by()
            if killer is not None:  # and no init error reported: that was raised above
                raise SandboxKilled(f"the runtime was killed by {killer.name} while it started (no "
                                    "init error reported: not the function's doing)", logs)
            raise InitFailed(RuntimeExited.error_type,
                             f"runtime exited with status {self.exited.result()} during init", logs)
        raise InitFailed("Sandbox.Timeout", f"init did not finish within {timeout:.0f} s", logs)

    async def invoke(self, invocation: Invocation, timeout: float) -> RuntimeReply:
        """Send one event and wait for the runtime's reply (see module contract)."""
        self.invocations += 1
        self.api.dispatch(invocation)
        reply = invocation.reply
        await _first_of(reply, self.exited, timeout)
        self.drain_output()
        if reply.done():
            return reply.result()
        self.api.abandon()
        if self.exited.done():
            if self.oom_killed():
                raise OutOfMemory(f"instance exceeded its memory limit of {self.spec.memory_mb} MB")
            if await self.api.unread():
                raise RuntimeGoneBeforeCall(f"runtime exited with status {self.exited.result()} "
                                            "before it read the invocation")
            raise RuntimeExited(f"runtime exited with status {self.exited.result()} during the invocation")
        raise InvocationTimedOut(f"function timed out after {timeout:.2f} s")


class RuntimeWatch(Protocol):
    """How a driver observes a runtime on the host: its exit, and its output pipe."""

    exited: asyncio.Future[int]

    def output_to(self, capture: OutputCapture) -> None: ...

    def drain(self) -> None: ...


class WatchedInstance(Instance):
    """An instance whose runtime is observed through a :class:`RuntimeWatch`."""

    def __init__(self, spec: InstanceSpec, api: RuntimeAPI, watch: RuntimeWatch) -> None:
        super().__init__(spec, api)
        self.watch = watch
        watch.output_to(self.output)

    @property
    def exited(self) -> asyncio.Future[int]:
        return self.watch.exited

    def drain_output(self) -> None:
        self.watch.drain()


async def _first_of(a: asyncio.Future[Any], b: asyncio.Future[Any], timeout: float) -> None:
    """Wait until ``a`` or ``b`` is done, or ``timeout`` seconds pass (cheaper than asyncio.wait)."""
    if a.done() or b.done():
        return
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not woken.done():
            woken.set_result(None)

    a.add_done_callback(wake)
    b.add_done_callback(wake)
    timer = loop.call_later(timeout, wake)
    try:
        await woken
    finally:
        timer.cancel()
        a.remove_done_callback(wake)
        b.remove_done_callback(wake)


class SandboxDriver(ABC):
    """Creates and destroys instances of one isolation technology."""

    name: str = ""
    #: True when the sandbox does not contain untrusted code (``process``).
    unsafe: bool = False

    @abstractmethod
    async def create(self, spec: InstanceSpec) -> Instance:
        """Start an instance; returns when the runtime is ready for its first event."""

    def supports(self, runtime: Runtime) -> bool:
        return self.name in runtime.sandboxes

    async def reap_orphans(self) -> int:
        """Kill what a previous server process left behind (after a crash); returns a count."""
        return 0

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepare shared resources (called once, after ``reap_orphans``, before any create)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release driver-wide resources (instances are destroyed by their owners first)."""

    def retire_templates(self, function_name: str, version: str | None = None) -> None:  # noqa: B027
        """Start no more instances from state prepared for ``function_name``'s ``version``
        (None: any version), e.g. a version template (docs/init-once.md): it changed or
        went.  Optional hook."""

    def expire_templates(self, idle_timeout: float) -> int:
        """Retire prepared state (version templates) unused for ``idle_timeout`` seconds;
        returns how many.  Optional hook."""
        return 0

    def describe(self) -> dict[str, Any]:
        """Facts for /health and the start-up line."""
        return {"sandbox": self.name, "unsafe": self.unsafe}
