"""Fast namespace-sandbox starts: the launcher that forks instances from a
pre-initialised template process (:mod:`.zygote`), and the server's handle on that process."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import select
import socket
import struct
import subprocess
import time
import uuid
import weakref
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

from impuls.errors import SandboxStartFailed
from impuls.runtimes import Runtime
from impuls.sandbox.base import DEFAULT_PATH, InstanceSpec, OutputCapture
from impuls.sandbox.namespace import bwrap, cgroups, seccomp
from impuls.sandbox.namespace.launch import (
    PIDS_MAX,
    RUNTIME_DIR,
    SANDBOX_GID,
    SANDBOX_UID,
    Launched,
    LauncherUnavailable,
    LaunchFailed,
    close_fds,
    cpu_weight,
    sandbox_command,
    sandbox_env,
)
from impuls.sandbox.namespace.slots import Slot, SlotControl, SlotGone
from impuls.sandbox.namespace.tmpdisk import TmpDisks
from impuls.sandbox.scratch import DEFAULT_TMP_MB
from impuls.sandbox.watch import OutputPump

log = logging.getLogger("impuls.sandbox.namespace.template")

ZYGOTE_SOURCE = Path(__file__).with_name("zygote.py")
#: Kept by the template inside its own user namespace, to build the instances'
#: namespaces; instances drop every capability, set no_new_privs and install the
#: seccomp filter before any function code runs.
TEMPLATE_CAPS = ("CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SETPCAP")
TEMPLATE_MEMORY_MB = 1024
TEMPLATE_PIDS_MAX = 1024
START_TIMEOUT = 30.0
SLOT_TIMEOUT = 10.0
SEND_TIMEOUT = 2.0
STOP_GRACE = 1.0
SHM_MB = 64
#: Empty instances kept ready; each costs two idle forked processes (mostly shared pages).
POOL_SIZE = 4
#: Slots kept ready with a runtime started ahead of time, per runtime that has them (Node.js:
#: ``prestarts``), once an instance of that runtime was started; each costs an idle runtime
#: process (node: 40 MB RSS, 16 MB PSS here).
PRESTART_POOL_SIZE = 2
#: Variables a runtime started ahead of time reads only at its start: a function that sets one
#: gets a runtime started for it (node: NODE_OPTIONS, NODE_EXTRA_CA_CERTS, UV_THREADPOOL_SIZE...).
PRESTART_READ_AT_START = ("NODE_", "UV_")
#: An empty slot's memory limit until it is assigned.
SLOT_MEMORY_MB = 128
#: ... and a slot's whose runtime was started ahead of time (node takes 40 MB as it waits).
PRESTART_MEMORY_MB = 256
#: After a slot could not be built, the pool is not refilled for this long (seconds).
REFILL_BACKOFF = 1.0
#: Runs the template when no Python runtime is installed (no preloading then).
FALLBACK_PYTHON = "/usr/bin/python3"
#: Template rotation.  Every instance forked from one template inherits its address-space
#: layout (ASLR: where libc, the interpreter and the heap are) and CPython's string-hash
#: secret, so a function that learns them (an address leak, hash timing) knows them for
#: every other function forked from the same template.  The launcher therefore replaces
#: its template after TEMPLATE_MAX_FORKS instances or TEMPLATE_MAX_AGE seconds, whichever
#: comes first, in the background (the old one serves until the new one is ready).
#: A replacement costs one template start, ~50 ms of CPU here (bwrap, an interpreter, the
#: runtime client's imports) plus a new pool of slots: spread over 1,000 instances that is
#: ~0.05 ms per cold start (<1% of a ~7 ms one), while at the target start rate of 100/s
#: the layout still changes every ~10 s.  Much lower limits buy little (an attacker needs
#: only one co-tenant instance) and keep more replaced templates alive: each stays until
#: its last instance ends (they live in its pid namespace), a few MB apiece.
TEMPLATE_MAX_FORKS = 1000
#: ... and 10 minutes bounds how long a layout lives on a quiet server, for ~6 template
#: starts an hour.  It is twice the default idle timeout (5 min): when a template is
#: replaced, its idle instances end within 5 minutes, so a quiet server keeps at most
#: one replaced template besides the current one.
TEMPLATE_MAX_AGE = 600.0
#: After a replacement template could not be started, the next attempt waits this long
#: (seconds); meanwhile the current template keeps serving.
ROTATE_RETRY = 30.0
#: The rotation timer never wakes up more often than this (seconds).
TIMER_MIN = 0.01
_CREDS = struct.calcsize("3i")
#: Tries to build a slot, and to hand a function to one, before a start fails: a template
#: or slot killed meanwhile is replaced by a new one (a template by a new template).
BUILD_ATTEMPTS = 3
#: How long a slot that failed waits for its template's death to show before the failure is
#: taken for the slot's own (seconds): when the template's pid namespace is killed, a slot
#: can die a moment before the template process.  Only failures wait.
DEATH_GRACE = 0.25


class TemplateError(LaunchFailed):
    """The template process stopped answering."""


class TemplateUnavailable(TemplateError, LauncherUnavailable):
    """The template process cannot be started on this host."""


# --- the template process -------------------------------------------------------------------


class TemplateProcess:
    """The server's handle on one running template process: a bwrap sandbox with the
    instance layout, running :mod:`.zygote` as the sandbox uid with ``TEMPLATE_CAPS``,
    in a cgroup of its own (``template-*``)."""

    def __init__(self, proc: subprocess.Popen[bytes], control: socket.socket, cgroup: cgroups.Cgroup,
                 logs: OutputPump) -> None:
        self.proc = proc
        self.control = control
        self.cgroup = cgroup
        self.logs = logs
        self.closed = False
        self.born = 0.0  # when it became ready, on the launcher's clock
        self.forks = 0  # instances forked from it (slots assigned to a function)
        #: its slots and instances still alive (their control sockets): a replaced
        #: template is stopped once none is left, as they live in its pid namespace
        self.users: set[SlotControl] = set()
        self.retired = False  # replaced: builds no more slots
        #: done when the template process is gone (see ``alive``)
        self._loop = asyncio.get_running_loop()
        self.died: asyncio.Future[None] = self._loop.create_future()
        #: called once when it dies, unless it was closed first
        self.on_death: Callable[[TemplateProcess], None] | None = None
        self._pidfd = -1  # of the template process (inside bwrap), from its "ready"
        self._watched: list[int] = []  # descriptors the event loop watches for its death
        # A template (and all it forked) must not outlive its owner, closed or not.
        self._fds: list[int] = []  # closed with it
        self._finalizer = weakref.finalize(self, _stop_template, proc, control, cgroup, self._fds)

    @classmethod
    async def start(cls, host: cgroups.CgroupHost, runtimes: list[Runtime], interpreter: str,
                    uid: int, gid: int, name: str | None = None,
                    hosts_versions: bool = False) -> TemplateProcess:
        """Start a template on ``interpreter`` knowing ``runtimes``' clients, in cgroup
        ``name`` (default: a new ``template-*``); TemplateUnavailable.  One that
        ``hosts_versions`` forks version templates (docs/init-once.md): its sandbox
        allows nested user namespaces and holds the version template filter."""
        cgroup = host.create(name or f"template-{uuid.uuid4().hex[:8]}", TEMPLATE_MEMORY_MB,
                             TEMPLATE_PIDS_MAX, 100)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # who sends "ready"
        fds: dict[str, int] = {}
        args_r = args_w = out_r = out_w = -1
        proc: subprocess.Popen[bytes] | None = None
        try:
            fds = _template_files(runtimes, uid, gid, hosts_versions)
            command = bwrap.build(bwrap.BwrapSpec(
                command=[interpreter, f"{RUNTIME_DIR}/zygote.py", str(theirs.fileno()),
                         "impuls-namespace-template"],
                code_dir=None, host_paths=sorted({p for rt in runtimes for p in rt.host_paths}),
                tmp_mb=1, shm_mb=0, uid=uid, gid=gid, env={"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"},
                data_fds=fds, cap_add=TEMPLATE_CAPS, nested_userns=hosts_versions))
            args_r, args_w = os.pipe()
            out_r, out_w = os.pipe()
            argv, payload = command.argv_with_args_fd(args_r)
            proc = subprocess.Popen(
                argv, pass_fds=[args_r, theirs.fileno(), *fds.values()], user=uid, group=gid,
                extra_groups=[], stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w, close_fds=True)
            cgroup.add_pid(proc.pid)
            os.write(args_w, payload)
        except (OSError, SandboxStartFailed) as exc:
            if proc is not None:
                proc.kill()
                proc.wait()
            close_fds(out_r)
            ours.close()
            with contextlib.suppress(cgroups.CgroupError):
                cgroup.remove()
            raise TemplateUnavailable(f"cannot start the template process: {exc}") from exc
        finally:
            close_fds(args_r, args_w, out_w, *fds.values())
            theirs.close()
        logs = OutputPump(asyncio.get_running_loop(), out_r)
        logs.capture = OutputCapture()
        template = cls(proc, ours, cgroup, logs)
        try:
            await template._wait_ready()
        except asyncio.CancelledError:  # e.g. the launcher closed during a rotation
            await template.close()
            raise
        return template

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        self.control.setblocking(False)
        sender: int | None = None
        try:
            message, sender = await asyncio.wait_for(self._receive(), START_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            message = f"no answer: {exc}".encode()
        # Requests are small and the template reads them at once: a send only
        # waits if it is stuck, and then not for long.
        self.control.settimeout(SEND_TIMEOUT)
        if message != b"ready":
            self.logs.drain()
            output = self.logs.capture.peek() if self.logs.capture else ""
            await self.close()
            raise TemplateUnavailable(
                f"the template process did not start ({message!r}): {output.strip()}")
        self.logs.capture = _LogCapture()
        # Its death shows at once on a pidfd of it (the kernel named its host pid: the
        # credentials of "ready"), and on the control socket, whose other end only the
        # template process holds (bwrap keeps no copy; a slot being forked closes its
        # copy first thing): end-of-file, before any slot can be seen to fail of it.
        if sender is not None:
            with contextlib.suppress(OSError):
                self._pidfd = os.pidfd_open(sender)
                self._fds.append(self._pidfd)
        for fd in (self.control.fileno(), self._pidfd):
            if fd >= 0:
                loop.add_reader(fd, self._check)
                self._watched.append(fd)

    async def _receive(self) -> tuple[bytes, int | None]:
        """The template's first message, and the host pid of its sender."""
        readable: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        self._loop.add_reader(self.control.fileno(), wake)
        try:
            await readable
        finally:
            self._loop.remove_reader(self.control.fileno())
        message, ancdata, _, _ = self.control.recvmsg(64, socket.CMSG_SPACE(_CREDS))
        sender = next((struct.unpack("3i", data[:_CREDS])[0] for level, kind, data in ancdata
                       if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
        return message, sender

    def _check(self) -> None:
        """The event loop saw news of the template: is it dead?"""
        if not self.alive:
            return  # alive saw to it
        try:
            data = self.control.recv(64, socket.MSG_DONTWAIT)  # nothing is expected: dropped
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # end-of-file
            self._dead()

    def _dead(self) -> None:
        for fd in self._watched:
            self._loop.remove_reader(fd)
        self._watched.clear()
        if self.died.done():
            return
        self.died.set_result(None)
        if self.on_death is not None and not self.closed:
            self.on_death(self)

    @property
    def alive(self) -> bool:
        """Running: not closed, and neither the template process nor its bwrap gone.
        Exact at once: it asks the kernel (the template's pidfd and control socket),
        not only the event loop's news of them."""
        if self.closed or self.died.done():
            return False
        if self.proc.poll() is not None or (self._pidfd >= 0 and _readable(self._pidfd)) or \
                _hung_up(self.control):
            self._dead()
            return False
        return True

    async def confirm_dead(self, grace: float = DEATH_GRACE) -> bool:
        """True when the template is dead, or dies within ``grace`` seconds: after one of
        its slots failed, whether the template's death was the reason."""
        if not self.alive:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.died), grace)
        return not self.alive

    def send(self, request: bytes, fds: list[int]) -> None:
        """Hand one instance request to the template; TemplateError if it is gone."""
        try:
            self.control.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                              struct.pack(f"{len(fds)}i", *fds))])
        except OSError as exc:
            raise TemplateError(f"the template process is gone: {exc}") from exc

    async def close(self) -> None:
        """Stop the template (and so every instance forked from it); idempotent."""
        if self.closed:
            return
        self.closed = True
        for fd in self._watched:
            self._loop.remove_reader(fd)
        self._watched.clear()
        self.logs.close()
        await asyncio.to_thread(self._finalizer)


def _stop_template(proc: subprocess.Popen[bytes], control: socket.socket,
                   cgroup: cgroups.Cgroup, fds: list[int]) -> None:
    """Stop the template (its pid namespace takes every slot and instance with it):
    end-of-file on its socket makes it exit, SIGKILL if it does not at once."""
    control.close()
    close_fds(*fds)
    fds.clear()
    try:
        proc.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    try:
        cgroup.remove()
    except cgroups.CgroupError as exc:
        log.warning("template cgroup: %s (left for reap_orphans)", exc)


def _hung_up(sock: socket.socket) -> bool:
    """The other end of ``sock`` is closed (checked now, without reading)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
    gone = select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL
    return any(events & gone for _, events in poller.poll(0))


def _readable(fd: int) -> bool:
    """``fd`` is readable now (a pidfd: its process has exited)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _remove_slots(pools: dict[str, collections.deque[Slot]]) -> None:
    for slot in [slot for pool in list(pools.values()) for slot in list(pool)]:
        with contextlib.suppress(cgroups.CgroupError):
            slot.cgroup.remove()


class _LogCapture(OutputCapture):
    """Whatever the template itself prints goes to the server log."""

    def feed(self, data: bytes) -> None:
        log.warning("template process: %s", data.decode("utf-8", "replace").rstrip())


def _template_files(runtimes: list[Runtime], uid: int, gid: int,
                    hosts_versions: bool = False) -> dict[str, int]:
    """The template sandbox's generated files: /etc, runtime clients, filters, mount point."""
    files = dict(bwrap.etc_files(uid, gid))
    files[bwrap.RUNTIME_SOCKET] = b""
    files[f"{RUNTIME_DIR}/zygote.py"] = ZYGOTE_SOURCE.read_bytes()
    files[f"{RUNTIME_DIR}/seccomp.bpf"] = seccomp.build_filter_bpf()
    if hosts_versions:
        files[f"{RUNTIME_DIR}/seccomp-template.bpf"] = seccomp.build_version_template_filter_bpf()
    for rt in runtimes:
        if rt.bootstrap is not None:
            files[f"{RUNTIME_DIR}/{rt.bootstrap.name}"] = rt.bootstrap.read_bytes()
    fds: dict[str, int] = {}
    try:
        for path, data in files.items():
            fds[path] = bwrap.data_fd(data)
    except SandboxStartFailed:
        close_fds(*fds.values())
        raise
    return fds


# --- the launcher ------------------------------------------------------------------------------


def template_interpreter(runtimes: Iterable[Runtime]) -> str | None:
    """The interpreter the template runs on: the Python runtime's, else the system python3."""
    for rt in runtimes:
        if rt.installed and rt.language == "python" and rt.interpreter and rt.bootstrap:
            return rt.interpreter
    return FALLBACK_PYTHON if os.path.isfile(FALLBACK_PYTHON) else None


class TemplateLauncher:
    """Starts instances from pre-built slots of a template process.

    The template has already started the Python interpreter and imported the
    Python runtime client, so a Python instance costs a ``fork`` plus
    namespaces and mounts instead of ``bwrap`` + interpreter start-up (SOCK /
    OpenLambda's zygotes); other runtimes are forked the same way and then
    ``exec`` their interpreter.  The function-independent part of an instance
    -- fork, namespaces, cgroup membership, ``/proc`` -- is done ahead of
    time: a small pool of empty slots (:mod:`.slots`), refilled in the
    background.

    Every instance forked from one template shares its address-space layout
    and hash secret, so the template is replaced ("rotated") after
    ``template_max_forks`` instances or ``template_max_age`` seconds (on
    ``clock``), whichever comes first.  The replacement is started, and
    given a pool of slots, in the background while the current template
    keeps serving; then the launcher switches over, discards the old
    template's unassigned slots, and stops the old template once its last
    slot and instance is gone (instances live in their template's pid
    namespace: stopping it would kill them).  A replacement that cannot be
    started is logged and tried again after ``ROTATE_RETRY`` seconds; the
    current template keeps serving meanwhile.  So a layout is shared by at
    most ``template_max_forks`` instances plus those started while its
    replacement starts (~50 ms), unless replacements keep failing.
    """

    name = "template"

    def __init__(self, host: cgroups.CgroupHost, runtimes: Iterable[Runtime], tmp_disks: TmpDisks,
                 uid: int = SANDBOX_UID, gid: int = SANDBOX_GID, pool_size: int = POOL_SIZE,
                 template_max_forks: int = TEMPLATE_MAX_FORKS,
                 template_max_age: float = TEMPLATE_MAX_AGE,
                 clock: Callable[[], float] = time.monotonic, hosts_versions: bool = False) -> None:
        if template_max_forks < 1 or not template_max_age > 0:
            raise ValueError("template_max_forks must be at least 1 and template_max_age positive")
        self.host = host
        self.runtimes = [rt for rt in runtimes if rt.installed]
        self.python = next((rt for rt in self.runtimes if rt.language == "python"
                            and rt.interpreter is not None and rt.bootstrap is not None), None)
        interpreter = template_interpreter(self.runtimes)
        if interpreter is None:
            raise TemplateUnavailable(f"the template needs a Python interpreter ({FALLBACK_PYTHON})")
        self.interpreter = interpreter
        self.uid, self.gid = uid, gid
        self.tmp_disks = tmp_disks
        self.pool_size = pool_size
        #: its template forks version templates (``launch(..., channel=)``), not instances
        self.hosts_versions = hosts_versions
        self.max_forks, self.max_age, self.clock = template_max_forks, template_max_age, clock
        self.rotations = 0  # templates replaced so far
        self.rotation_failures = 0  # replacements that could not be started
        self._template: TemplateProcess | None = None
        self._lock = asyncio.Lock()
        self._bootstraps = {rt.bootstrap.name for rt in self.runtimes if rt.bootstrap is not None}
        #: runtimes whose instances get a slot with the runtime started ahead of time
        self._prestarts = {rt.id: rt for rt in self.runtimes if rt.prestarts and not hosts_versions}
        #: slots kept ready: empty ones under "", those with a runtime started ahead of time
        #: under its id (the pool is made at the first launch of that runtime)
        self._pools: dict[str, collections.deque[Slot]] = {"": collections.deque()}
        self._building: set[Slot] = set()
        self._fillers: dict[str, set[asyncio.Task[None]]] = collections.defaultdict(set)
        self._refill_after = 0.0
        self._closed = False
        self._starting: set[str] = set()  # cgroups of templates being started
        self._ran = False  # a template ran on this host: one that fails later is no reason to give up
        self._rotation: asyncio.Task[None] | None = None
        self._retired: set[TemplateProcess] = set()  # replaced, kept for their instances
        self._stopping: set[asyncio.Task[None]] = set()
        self._retry_at = -math.inf
        self._timer: asyncio.TimerHandle | None = None
        weakref.finalize(self, _remove_slots, self._pools)

    def _ready_slots(self) -> list[Slot]:
        return [slot for pool in self._pools.values() for slot in pool]

    def cgroup_names(self) -> set[str]:
        names = {slot.cgroup.name for slot in (*self._ready_slots(), *self._building)} | self._starting
        names.update(t.cgroup.name for t in (self._template, *self._retired) if t is not None)
        return names

    async def start(self) -> None:
        """Start the template and fill the pool now rather than at the first launch."""
        await self._ensure()
        self._refill()
        self.tmp_disks.want(DEFAULT_TMP_MB)

    async def launch(self, spec: InstanceSpec, socket_path: Path, channel: int | None = None) -> Launched:
        """Take a slot (or build one at once when the pool is empty), set its cgroup's
        limits and hand it the function: a detached read-only mount of its code
        (``open_tree``, made by the server, so code below a 0700 parent works), a
        detached mount of the Runtime API socket, the output pipe and the
        environment.  Raises ``LaunchFailed`` (never ``OSError``), leaving nothing
        behind.  With ``channel`` (a socket), the slot becomes a version template
        of ``spec``'s Python function (docs/init-once.md) that takes fork requests on it.
        An instance of a runtime that ``prestarts`` (Node.js) takes, when one is ready, a
        slot where its runtime already runs, waiting for the function's environment
        (unless the function sets a variable in ``PRESTART_READ_AT_START``)."""
        prestart = "" if channel is not None else self._prestart_kind(spec)
        for attempt in range(1, BUILD_ATTEMPTS + 1):
            if self._closed:
                raise LaunchFailed("the namespace sandbox is closed")
            slot = await self._take(prestart)
            prestarted = slot.output_fd >= 0
            try:
                request = self._request(spec, template=channel is not None, prestarted=prestarted)
                tmp_fd = await self.tmp_disks.take(spec.ephemeral_storage_mb)
                slot.assign(request, spec.code_dir, socket_path, spec.memory_mb, cpu_weight(spec.memory_mb),
                            tmp_fd, channel)
            except SlotGone as exc:  # killed (or its template was) since it was built
                await slot.discard()
                if attempt == BUILD_ATTEMPTS:
                    raise
                log.info("namespace sandbox: %s; taking another", exc)
                continue
            except BaseException:
                await slot.discard()
                raise
            if isinstance(slot.origin, TemplateProcess):
                slot.origin.forks += 1
            self._maybe_rotate()
            return Launched(slot.control, slot.cgroup, "runtime started ahead of time" if prestarted else "")
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        tasks = [*(t for fillers in self._fillers.values() for t in fillers),
                 *([self._rotation] if self._rotation is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pool in self._pools.values():
            while pool:
                await pool.popleft().discard()
        if self._template is not None:
            await self._template.close()
            self._template = None
        while self._retired:  # what is left of their instances goes with them
            await self._retired.pop().close()
        await asyncio.gather(*self._stopping, return_exceptions=True)

    # --- slots -----------------------------------------------------------------------------

    async def _take(self, kind: str = "") -> Slot:
        """A ready slot with runtime ``kind`` started ahead of time (its pool is made, and
        filled in the background, on the first call that asks for it); else a ready empty
        slot; else an empty one built now.  A cold start never waits for a runtime's start."""
        pools = [self._pools.setdefault(kind, collections.deque())] if kind else []
        for pool in [*pools, self._pools[""]]:
            while pool:
                slot = pool.popleft()
                template = self._template
                if slot.usable and template is not None and slot.origin is template and template.alive:
                    self._refill()
                    return slot
                await slot.discard()
        self._refill()
        return await self._build_slot()

    def _refill(self) -> None:
        """Start building what each pool lacks (its size: ``pool_size`` for empty slots,
        ``PRESTART_POOL_SIZE`` for each runtime started ahead of time)."""
        if self._closed or time.monotonic() < self._refill_after:
            return
        for kind, pool in self._pools.items():
            fillers = self._fillers[kind]
            missing = (self.pool_size if not kind else PRESTART_POOL_SIZE) - len(pool) - len(fillers)
            for _ in range(max(0, missing)):
                task = asyncio.get_running_loop().create_task(self._fill_one(kind))
                fillers.add(task)
                task.add_done_callback(fillers.discard)

    async def _fill_one(self, kind: str) -> None:
        try:
            slot = await self._build_slot(kind)
        except SandboxStartFailed as exc:
            log.warning("namespace sandbox: cannot prepare a slot: %s", exc)
            self._refill_after = time.monotonic() + REFILL_BACKOFF  # no storm of failures
            return
        if self._closed or slot.origin is not self._template:  # replaced meanwhile
            await slot.discard()
        else:
            self._pools[kind].append(slot)

    async def _build_slot(self, kind: str = "") -> Slot:
        """A new slot of ``kind`` from the current template.  When the template died
        meanwhile (its slots die with it), from a new template: ``BUILD_ATTEMPTS`` in all."""
        for attempt in range(1, BUILD_ATTEMPTS + 1):
            template: TemplateProcess | None = None
            try:
                template = await self._ensure()
                return await self._fork_slot(template, kind)
            except TemplateUnavailable:
                raise
            except SandboxStartFailed as exc:
                if self._closed or attempt == BUILD_ATTEMPTS or (
                        template is not None and not await template.confirm_dead()):
                    raise
                log.info("namespace sandbox: the template died (%s); starting a new one", exc)
        raise AssertionError("unreachable")

    async def _fork_slot(self, template: TemplateProcess, kind: str = "") -> Slot:
        """A new slot forked from ``template`` -- empty, or with runtime ``kind`` started
        in it ahead of time, writing to an output pipe made now; it counts as the
        template's user until every process of it is gone."""
        memory_mb = SLOT_MEMORY_MB if not kind else PRESTART_MEMORY_MB
        cgroup = self.host.create(f"slot-{uuid.uuid4().hex[:12]}", memory_mb, PIDS_MAX,
                                  cpu_weight(memory_mb))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out_r = out_w = -1
        if kind:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
        control = SlotControl(ours, cgroup)
        slot = Slot(cgroup, control, template, out_r)
        template.users.add(control)
        control.exited.add_done_callback(lambda _: self._released(template, control))
        self._building.add(slot)
        try:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            if kind:
                template.send(self._prestart_request(kind), [theirs.fileno(), out_w])
            else:
                template.send(b'{"op": "slot"}', [theirs.fileno()])
            theirs.close()
            close_fds(out_w)
            await asyncio.wait_for(asyncio.shield(control.ready), SLOT_TIMEOUT)
            return slot
        except BaseException as exc:
            theirs.close()
            close_fds(out_w)
            await slot.discard()
            if isinstance(exc, TimeoutError):
                raise LaunchFailed("the sandbox was not built in time") from exc
            if isinstance(exc, OSError):
                raise LaunchFailed(f"cannot build a sandbox: {exc}") from exc
            raise
        finally:
            self._building.discard(slot)

    # --- the template and its rotation ----------------------------------------------------

    async def _ensure(self) -> TemplateProcess:
        """The running template; a new one if there is none or it died (its instances
        and slots died with it: they live in its pid namespace).  Concurrent callers wait
        for the one being started.  TemplateUnavailable only while no template ever ran:
        later, a template that cannot start (killed while it started...) is a TemplateError,
        and the launcher keeps starting templates rather than giving them up."""
        template = self._template
        if template is not None and template.alive:
            return template
        async with self._lock:
            if self._closed:
                raise LaunchFailed("the namespace sandbox is closed")
            dead = self._template
            if dead is not None and not dead.alive:
                self._template = None
                self._drop_slots_of(dead)
                self._stop(dead)  # in the background: the new one need not wait for it
            if self._template is None:
                try:
                    self._adopt(await self._start_template())
                except TemplateUnavailable as exc:
                    if not self._ran:
                        raise
                    raise TemplateError(exc.message) from exc
            assert self._template is not None
            return self._template

    def _template_died(self, template: TemplateProcess) -> None:
        """The current template process died, and with it every slot and instance forked
        from it: forget its slots and start a new template in the background (refilling
        the pool does), so that the next cold start finds one ready."""
        if self._closed or template is not self._template:
            return  # a replaced one is stopped as its last user goes (_released)
        log.warning("namespace sandbox: the template process died (its instances with it); "
                    "starting a new one")
        self._drop_slots_of(template)
        self._refill_after = 0.0
        self._refill()

    def _drop_slots_of(self, template: TemplateProcess) -> None:
        """Discard the pools' slots of ``template`` (in the background)."""
        for pool in self._pools.values():
            for slot in [slot for slot in pool if slot.origin is template]:
                pool.remove(slot)
                self._background(slot.discard())

    async def _start_template(self) -> TemplateProcess:
        name = f"template-{uuid.uuid4().hex[:8]}"
        self._starting.add(name)
        try:
            return await TemplateProcess.start(self.host, self.runtimes, self.interpreter, self.uid,
                                               self.gid, name, self.hosts_versions)
        finally:
            self._starting.discard(name)

    def _adopt(self, template: TemplateProcess) -> None:
        """Make ``template`` the one instances are forked from; its age starts now."""
        template.born = self.clock()
        template.on_death = self._template_died
        self._template = template
        self._ran = True
        self._arm_timer()

    def _due(self, template: TemplateProcess) -> str | None:
        """Why ``template`` must be replaced now (None: it need not be)."""
        if template.forks >= self.max_forks:
            return f"{template.forks} instances forked from it"
        age = self.clock() - template.born
        return f"{age:.1f} s old" if age >= self.max_age else None

    def _maybe_rotate(self) -> None:
        """Start replacing the template in the background when it is due (once at a time;
        not before ``ROTATE_RETRY`` seconds after a failed attempt)."""
        template = self._template
        if (self._closed or self._rotation is not None or template is None or not template.alive
                or self.clock() < self._retry_at):
            return
        reason = self._due(template)
        if reason is not None:
            self._rotation = asyncio.get_running_loop().create_task(self._rotate(reason))
            self._rotation.add_done_callback(self._rotation_done)

    def _rotation_done(self, _: asyncio.Task[None]) -> None:
        self._rotation = None
        self._arm_timer()

    def _arm_timer(self) -> None:
        """Wake up when the template comes of age (or a failed replacement may be retried):
        an idle server rotates too, so the next instance never gets an old layout."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        template = self._template
        if self._closed or template is None:
            return
        now = self.clock()
        due = now if template.forks >= self.max_forks else template.born + self.max_age
        delay = max(due, self._retry_at) - now
        self._timer = asyncio.get_running_loop().call_later(max(delay, TIMER_MIN), self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._maybe_rotate()
        if self._rotation is None:
            self._arm_timer()

    async def _rotate(self, reason: str) -> None:
        """Start a new template and its pool of slots, then switch over to it and retire
        the old one.  Never raises (but for cancellation): on failure the current
        template keeps serving."""
        log.info("namespace sandbox: replacing the template (%s)", reason)
        new: TemplateProcess | None = None
        slots: list[Slot] = []
        stale: list[Slot] = []
        try:
            new = await self._start_template()
            errors: list[SandboxStartFailed] = []
            for _ in range(self.pool_size):  # its first slots show that it works
                try:
                    slots.append(await self._fork_slot(new))
                except SandboxStartFailed as exc:
                    errors.append(exc)
            if errors and not slots:
                raise errors[0]
            if not new.alive:
                raise TemplateError("the new template process died")
            async with self._lock:  # not while _ensure() starts a template
                if self._closed:
                    return
                old, stale = self._template, self._ready_slots()
                for pool in self._pools.values():
                    pool.clear()
                self._pools[""].extend(slots)
                self._adopt(new)
                new, slots = None, []
                self.rotations += 1
                if old is not None:
                    self._retire(old)
            self._refill()
            while stale:
                await stale.pop().discard()
            log.info("namespace sandbox: template replaced (%s); the old one forked %d instances, "
                     "%d still running", reason, old.forks if old else 0, len(old.users) if old else 0)
        except Exception as exc:
            self.rotation_failures += 1
            self._retry_at = self.clock() + ROTATE_RETRY
            log.warning("namespace sandbox: cannot start a new template: %s; the current one keeps "
                        "serving (next attempt in %g s)", exc, ROTATE_RETRY,
                        exc_info=not isinstance(exc, SandboxStartFailed))
        finally:
            for slot in (*slots, *stale):
                await slot.discard()
            if new is not None:
                await new.close()

    def _retire(self, template: TemplateProcess) -> None:
        """``template`` forks no more; it is stopped once its last slot or instance is gone."""
        template.retired = True
        if template.users and template.alive:
            self._retired.add(template)
        else:
            self._stop(template)

    def _released(self, template: TemplateProcess, control: SlotControl) -> None:
        """A slot or instance of ``template`` is gone (every one of its processes)."""
        template.users.discard(control)
        if template.retired and not template.users and template in self._retired:
            self._retired.discard(template)
            self._stop(template)

    def _stop(self, template: TemplateProcess) -> None:
        self._background(template.close())

    def _background(self, clean_up: Coroutine[Any, Any, None]) -> None:
        """Run ``clean_up`` in the background (``close`` waits for it)."""
        task = asyncio.get_running_loop().create_task(clean_up)
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def preloads(self, runtime: Runtime) -> bool:
        """Instances of ``runtime`` run in the template's own interpreter, its client
        already imported (rather than ``exec`` of their own)."""
        return (self.python is not None and runtime.bootstrap == self.python.bootstrap
                and runtime.interpreter == self.python.interpreter == self.interpreter)

    def _prestart_request(self, kind: str) -> bytes:
        """The template's request for a slot where runtime ``kind`` starts now: its command
        and a neutral environment (the client takes the function's at the assignment)."""
        rt = self._prestarts[kind]
        client = None if rt.bootstrap is None else f"{RUNTIME_DIR}/{rt.bootstrap.name}"
        return json.dumps({"op": "slot", "prestart": {
            "argv": rt.command(bwrap.TASK_DIR, client),
            "env": {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", "TZ": ":UTC"}}}).encode()

    def _prestart_kind(self, spec: InstanceSpec) -> str:
        """The id of ``spec``'s runtime when its instance can take a slot where that
        runtime was started ahead of time ("": it cannot)."""
        rt = spec.runtime
        if rt.id not in self._prestarts or any(
                name.startswith(PRESTART_READ_AT_START) for name in spec.environment):
            return ""
        return rt.id

    def _request(self, spec: InstanceSpec, template: bool = False, prestarted: bool = False) -> bytes:
        rt = spec.runtime
        argv = sandbox_command(spec)
        if rt.bootstrap is not None and rt.bootstrap.name not in self._bootstraps:
            raise LaunchFailed(f"runtime {rt.id} is not known to the sandbox template")
        preloaded = self.preloads(rt)
        if template and not (preloaded and self.hosts_versions):
            raise LaunchFailed(f"runtime {rt.id} cannot be initialised once in this sandbox template")
        mode = "template" if template else "prestarted" if prestarted else "python" if preloaded else "exec"
        return json.dumps({
            "id": spec.instance_id, "mode": mode, "argv": argv,
            "env": sandbox_env(spec), "relay": not rt.unix_socket_client,
            "shm_mb": SHM_MB,
        }).encode()
