"""Fast namespace-sandbox starts: the launcher that forks instances from a
pre-initialised template process (:mod:`.zygote`), and the server's handle on that process."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import socket
import struct
import subprocess
import time
import uuid
import weakref
from collections.abc import Iterable
from pathlib import Path

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
from impuls.sandbox.namespace.slots import Slot, SlotControl
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
#: An empty slot's memory limit until it is assigned.
SLOT_MEMORY_MB = 128
#: After a slot could not be built, the pool is not refilled for this long (seconds).
REFILL_BACKOFF = 1.0
#: Runs the template when no Python runtime is installed (no preloading then).
FALLBACK_PYTHON = "/usr/bin/python3"


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
        # A template (and all it forked) must not outlive its owner, closed or not.
        self._finalizer = weakref.finalize(self, _stop_template, proc, control, cgroup)

    @classmethod
    async def start(cls, host: cgroups.CgroupHost, runtimes: list[Runtime], interpreter: str,
                    uid: int, gid: int) -> TemplateProcess:
        """Start a template on ``interpreter`` knowing ``runtimes``' clients; TemplateUnavailable."""
        cgroup = host.create(f"template-{uuid.uuid4().hex[:8]}", TEMPLATE_MEMORY_MB,
                             TEMPLATE_PIDS_MAX, 100)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds: dict[str, int] = {}
        args_r = args_w = out_r = out_w = -1
        proc: subprocess.Popen[bytes] | None = None
        try:
            fds = _template_files(runtimes, uid, gid)
            command = bwrap.build(bwrap.BwrapSpec(
                command=[interpreter, f"{RUNTIME_DIR}/zygote.py", str(theirs.fileno()),
                         "impuls-namespace-template"],
                code_dir=None, host_paths=sorted({p for rt in runtimes for p in rt.host_paths}),
                tmp_mb=1, shm_mb=0, uid=uid, gid=gid, env={"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"},
                data_fds=fds, cap_add=TEMPLATE_CAPS))
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
        await template._wait_ready()
        return template

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        self.control.setblocking(False)
        try:
            message = await asyncio.wait_for(loop.sock_recv(self.control, 64), START_TIMEOUT)
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

    @property
    def alive(self) -> bool:
        return not self.closed and self.proc.poll() is None

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
        self.logs.close()
        await asyncio.to_thread(self._finalizer)


def _stop_template(proc: subprocess.Popen[bytes], control: socket.socket,
                   cgroup: cgroups.Cgroup) -> None:
    """Stop the template (its pid namespace takes every slot and instance with it):
    end-of-file on its socket makes it exit, SIGKILL if it does not at once."""
    control.close()
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


def _remove_slots(slots: Iterable[Slot]) -> None:
    for slot in list(slots):
        with contextlib.suppress(cgroups.CgroupError):
            slot.cgroup.remove()


class _LogCapture(OutputCapture):
    """Whatever the template itself prints goes to the server log."""

    def feed(self, data: bytes) -> None:
        log.warning("template process: %s", data.decode("utf-8", "replace").rstrip())


def _template_files(runtimes: list[Runtime], uid: int, gid: int) -> dict[str, int]:
    """The template sandbox's generated files: /etc, runtime clients, filter, mount point."""
    files = dict(bwrap.etc_files(uid, gid))
    files[bwrap.RUNTIME_SOCKET] = b""
    files[f"{RUNTIME_DIR}/zygote.py"] = ZYGOTE_SOURCE.read_bytes()
    files[f"{RUNTIME_DIR}/seccomp.bpf"] = seccomp.build_filter_bpf()
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
    """

    name = "template"

    def __init__(self, host: cgroups.CgroupHost, runtimes: Iterable[Runtime],
                 uid: int = SANDBOX_UID, gid: int = SANDBOX_GID, pool_size: int = POOL_SIZE) -> None:
        self.host = host
        self.runtimes = [rt for rt in runtimes if rt.installed]
        self.python = next((rt for rt in self.runtimes if rt.language == "python"
                            and rt.interpreter is not None and rt.bootstrap is not None), None)
        interpreter = template_interpreter(self.runtimes)
        if interpreter is None:
            raise TemplateUnavailable(f"the template needs a Python interpreter ({FALLBACK_PYTHON})")
        self.interpreter = interpreter
        self.uid, self.gid = uid, gid
        self.pool_size = pool_size
        self._template: TemplateProcess | None = None
        self._lock = asyncio.Lock()
        self._bootstraps = {rt.bootstrap.name for rt in self.runtimes if rt.bootstrap is not None}
        self._pool: collections.deque[Slot] = collections.deque()
        self._building: set[Slot] = set()
        self._fillers: set[asyncio.Task[None]] = set()
        self._refill_after = 0.0
        self._closed = False
        weakref.finalize(self, _remove_slots, self._pool)

    def cgroup_names(self) -> set[str]:
        names = {slot.cgroup.name for slot in (*self._pool, *self._building)}
        if self._template is not None:
            names.add(self._template.cgroup.name)
        return names

    async def start(self) -> None:
        """Start the template and fill the pool now rather than at the first launch."""
        await self._ensure()
        self._refill()

    async def launch(self, spec: InstanceSpec, socket_path: Path) -> Launched:
        """Take a slot (or build one at once when the pool is empty), set its cgroup's
        limits and hand it the function: a detached read-only mount of its code
        (``open_tree``, made by the server, so code below a 0700 parent works), a
        detached mount of the Runtime API socket, the output pipe and the
        environment.  Raises ``LaunchFailed`` (never ``OSError``), leaving nothing
        behind."""
        request = self._request(spec)
        slot = await self._take()
        try:
            slot.assign(request, spec.code_dir, socket_path, spec.memory_mb, cpu_weight(spec.memory_mb))
        except BaseException:
            await slot.discard()
            raise
        return Launched(slot.control, slot.cgroup)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._fillers):
            task.cancel()
        await asyncio.gather(*self._fillers, return_exceptions=True)
        while self._pool:
            await self._pool.popleft().discard()
        if self._template is not None:
            await self._template.close()
            self._template = None

    # --- slots -----------------------------------------------------------------------------

    async def _take(self) -> Slot:
        while self._pool:
            slot = self._pool.popleft()
            if slot.usable and self._template is not None and self._template.alive:
                self._refill()
                return slot
            await slot.discard()
        self._refill()
        return await self._build_slot()

    def _refill(self) -> None:
        if self._closed or time.monotonic() < self._refill_after:
            return
        missing = self.pool_size - len(self._pool) - len(self._fillers)
        for _ in range(max(0, missing)):
            task = asyncio.get_running_loop().create_task(self._fill_one())
            self._fillers.add(task)
            task.add_done_callback(self._fillers.discard)

    async def _fill_one(self) -> None:
        try:
            slot = await self._build_slot()
        except SandboxStartFailed as exc:
            log.warning("namespace sandbox: cannot prepare a slot: %s", exc)
            self._refill_after = time.monotonic() + REFILL_BACKOFF  # no storm of failures
            return
        if self._closed:
            await slot.discard()
        else:
            self._pool.append(slot)

    async def _build_slot(self) -> Slot:
        """A new empty instance from the template (one retry with a new template)."""
        for attempt in (1, 2):
            template = await self._ensure()
            cgroup = self.host.create(f"slot-{uuid.uuid4().hex[:12]}", SLOT_MEMORY_MB, PIDS_MAX,
                                      cpu_weight(SLOT_MEMORY_MB))
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            slot = Slot(cgroup, SlotControl(ours, cgroup))
            self._building.add(slot)
            try:
                ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                template.send(b'{"op": "slot"}', [theirs.fileno()])
                theirs.close()
                await asyncio.wait_for(asyncio.shield(slot.control.ready), SLOT_TIMEOUT)
                return slot
            except BaseException as exc:
                theirs.close()
                await slot.discard()
                if isinstance(exc, TemplateError) and attempt == 1 and not template.alive:
                    await template.close()  # gone: start a new one and try once more
                    continue
                if isinstance(exc, TimeoutError):
                    raise LaunchFailed("the sandbox was not built in time") from exc
                if isinstance(exc, OSError):
                    raise LaunchFailed(f"cannot build a sandbox: {exc}") from exc
                raise
            finally:
                self._building.discard(slot)
        raise TemplateError("the template process keeps dying")

    async def _ensure(self) -> TemplateProcess:
        """The running template; a new one if there is none or it died (its instances
        and slots died with it: they live in its pid namespace)."""
        template = self._template
        if template is not None and template.alive:
            return template
        async with self._lock:
            if self._template is not None and not self._template.alive:
                await self._template.close()
                self._template = None
            if self._template is None:
                self._template = await TemplateProcess.start(self.host, self.runtimes,
                                                             self.interpreter, self.uid, self.gid)
            return self._template

    def _request(self, spec: InstanceSpec) -> bytes:
        rt = spec.runtime
        argv = sandbox_command(spec)
        if rt.bootstrap is not None and rt.bootstrap.name not in self._bootstraps:
            raise LaunchFailed(f"runtime {rt.id} is not known to the sandbox template")
        preloaded = (self.python is not None and rt.bootstrap == self.python.bootstrap
                     and rt.interpreter == self.python.interpreter == self.interpreter)
        return json.dumps({
            "id": spec.instance_id, "mode": "python" if preloaded else "exec", "argv": argv,
            "env": sandbox_env(spec), "relay": not rt.unix_socket_client,
            "tmp_mb": spec.ephemeral_storage_mb, "shm_mb": SHM_MB,
        }).encode()
