"""The ``microvm`` driver: every instance is a QEMU ``microvm`` virtual machine with its own kernel.

Machine.  One VM per instance: ``memory_mb`` of RAM, one vCPU, no network
device, no firmware (the PVH kernel boots directly), virtio-mmio devices
only: the runtime's root filesystem (read-only), the function's code disk
(read-only) and one virtio-serial port.  Acceleration is KVM only when a
probe boot under KVM worked on this host, else TCG (software emulation); see
:mod:`impuls.sandbox.microvm.qemu`, which also holds the VMM layer (argv, QMP), so
another VMM (Firecracker, where it exists) could take QEMU's place.

Host ↔ guest.  vhost-vsock is absent on these hosts, so the link is a
virtio-serial port whose QEMU chardev is one end of a ``socketpair`` made by
the driver (passed as ``fd=``: no socket path, no connect race, nothing to
clean up); QMP uses a second socketpair.  Over the port, the guest agent
(:mod:`impuls.runtimes.guest.agent`, PID 1) multiplexes the runtime's Runtime
API connections and its stdout/stderr in one ordered stream of frames.  The
host side (:class:`GuestLink`) relays each guest connection byte for byte to
the instance's own :class:`~impuls.sandbox.runtime_api.RuntimeAPI` unix socket:
the HTTP stream is parsed once, on the host, and the runtime clients run
unchanged.  Because the agent drains the runtime's output pipe before it
forwards anything the runtime sent, logs written before a response are in
``Instance.output`` before that response completes the invocation.

Code.  Each code version becomes a small read-only disk, made once and cached
(:mod:`impuls.sandbox.microvm.codedisk`: romfs in a fixed-size partitioned disk, with
host-compiled pycs for Python).  A disk rather than a copy over the serial
port: read-only is enforced by QEMU (``read-only=on``), nothing is held in
guest RAM, large packages cost no transfer, and the guest mounts it at boot
— or, restored from a snapshot, finds it already mounted.

Snapshots.  Per (guest runtime, memory size) a template VM boots until its
agent says ``hello`` — kernel up, runtime client preloaded and its process
forked, unprivileged, waiting; no function code, no identity — and is
migrated to a file with ``x-ignore-shared``: its RAM is a
``memory-backend-file`` with ``share=on``, so the migration stream holds only
device state (~70 KB) and the RAM stays in the file.  An instance is then a
QEMU started with ``-incoming defer`` whose RAM maps that file ``share=off``
(MAP_PRIVATE): every clone gets copy-on-write memory, clean pages are shared
through the host page cache, nothing is copied up front.  After
``migrate-incoming`` the host sends ``load``: environment, the wall clock and
fresh entropy (the agent reseeds the kernel CRNG before any runtime state
that could hold randomness exists; request ids come from the host).  The
snapshot is per runtime, not per function, so code must come after the
restore: every code disk has the template's size and partition table and
the same first romfs block, so the romfs the template mounted simply shows
the clone's code.  The first instance for a key makes the snapshot (boot +
save, then restore); a missing, stale or failing snapshot falls back to a
plain boot, and ``Instance.note`` says which path served the cold start.
``IMPULS_MICROVM_SNAPSHOTS=0`` always boots.

Between invocations the guest freezes the runtime's cgroup (as Lambda freezes
its environments): an idle VM costs no CPU even if the function left threads
or processes running.

Ends.  A runtime that exits, or that the guest kernel OOM-kills (the agent
reports it; :meth:`MicroVMInstance.oom_killed`), ends the instance and the VM
is killed at once.  A guest kernel panic (``panic=-1 reboot=t`` and QEMU's
``-no-reboot``) or a QEMU crash ends the QEMU process, which completes
``exited`` the same way: ``RuntimeExited`` names the panic line.  No orphans:
QEMU runs in its own session with ``PR_SET_PDEATHSIG=SIGKILL`` (``setpriv``)
so it dies with the server, even on SIGKILL; a pid file (pid + start time)
per VM lets :meth:`MicroVMDriver.reap_orphans` kill any survivor after a
restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from impuls.errors import ConfigError, RuntimeExited, SandboxStartFailed
from impuls.runtimes import Runtime
from impuls.runtimes.guest.agent import (
    API_ADDRESS,
    API_SOCKET,
    CLOSE,
    CTL,
    DATA,
    LOG,
    LOGDROP,
    NODE,
    NODE_CLIENT,
    OPEN,
    PYTHON,
    PYTHON_CLIENT,
    TASK_ROOT,
    TMP_DIR,
    FrameReader,
    control,
    frame,
    frames,
)
from impuls.sandbox.base import Instance, InstanceSpec, OutputCapture, SandboxDriver
from impuls.sandbox.microvm.codedisk import CODE_DISK_BYTES, CodeDisk, CodeDiskError, CodeDisks
from impuls.sandbox.microvm.images import ImageStore
from impuls.sandbox.microvm.qemu import (
    AccelChoice,
    Memory,
    Qmp,
    QmpError,
    VMConfig,
    choose_accel,
    cpu_model,
    host_cpu,
    kernel_cmdline,
    qemu_binary,
    qemu_version,
)
from impuls.sandbox.runtime_api import Invocation, RuntimeAPI, RuntimeReply
from impuls.sandbox.watch import PidFile, ProcessWatch

log = logging.getLogger("impuls.sandbox.microvm.driver")

BOOT_TIMEOUT = 120.0  # kernel + agent under TCG, several VMs sharing two cores
RESTORE_TIMEOUT = 30.0
INIT_TIMEOUT = 60.0
SNAPSHOT_RECIPE = "1"
SELF_CONTAINED_RUNTIMES = ("provided", "go1.x")
DIAG_LIMIT = 16 * 1024
SHORT_DIR_PREFIX = "impuls-vm-"


def guest_command(runtime: Runtime) -> tuple[list[str], bool]:
    """The runtime's argv inside the guest, and whether the preloaded Python client may serve it."""
    if runtime.bootstrap is None:  # the package's own ./bootstrap (custom runtime, Go binary)
        return [f"{TASK_ROOT}/bootstrap"], False
    if runtime.language == "python":
        return [PYTHON, PYTHON_CLIENT], True
    if runtime.language == "nodejs":
        return [NODE, NODE_CLIENT], False
    raise SandboxStartFailed(f"the microvm sandbox has no guest command for {runtime.language}")


def _kill(pid: int) -> None:
    """SIGKILL QEMU's process group (its own session: QEMU and a migration's ``cat``)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _short_dir(preferred: Path) -> Path:
    """``preferred`` if a unix socket path inside it fits in sun_path, else a fresh temporary
    directory named after this process (so that a successor can tell it is abandoned)."""
    if len(str(preferred / "runtime-api.sock")) < 100:
        preferred.mkdir(parents=True, exist_ok=True, mode=0o700)
        return preferred
    return Path(tempfile.mkdtemp(prefix=f"{SHORT_DIR_PREFIX}{os.getpid()}-"))


def _remove_abandoned_short_dirs() -> None:
    for path in Path(tempfile.gettempdir()).glob(f"{SHORT_DIR_PREFIX}*-*"):
        try:
            pid = int(path.name[len(SHORT_DIR_PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


# --- the serial link ------------------------------------------------------------------


class _Channel(asyncio.Protocol):
    """One guest Runtime API connection, relayed to the instance's RuntimeAPI socket."""

    def __init__(self, link: GuestLink, chan: int) -> None:
        self.link = link
        self.chan = chan
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.closed:
            transport.close()
            return
        for data in self.pending:
            self.transport.write(data)  # type: ignore[union-attr]
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.link.send(b"".join(frames(DATA, self.chan, data)))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.link.channel_closed(self.chan, notify=True)

    def write(self, data: bytes) -> None:
        if self.transport is None:
            self.pending.append(data)
        elif not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class GuestLink(asyncio.Protocol):
    """The host end of the agent's virtio-serial port: demultiplexes frames (see the agent)."""

    def __init__(self, api_socket: str, output: OutputCapture) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.api_socket = api_socket
        self.output = output
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.channels: dict[int, _Channel] = {}
        self.hello: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.loaded: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.runtime_exit: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.pongs: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        for fut in (self.hello, self.loaded, self.runtime_exit):
            fut.add_done_callback(_consume)
        self.on_exit: Callable[[dict[str, Any]], None] | None = None
        self.first_request_ms = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        for chan in list(self.channels):
            self.channel_closed(chan, notify=False)
        gone = ConnectionError("the VM closed its serial link")
        for fut in (self.hello, self.loaded):
            if not fut.done():
                fut.set_exception(gone)
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def control(self, message: dict[str, Any]) -> None:
        self.send(control(message))

    def data_received(self, data: bytes) -> None:
        try:
            items = self.reader.feed(data)
        except ValueError as exc:
            log.warning("bad frame from the guest agent: %s", exc)
            if self.transport is not None:
                self.transport.abort()
            return
        for kind, chan, payload in items:
            if kind == LOG:
                self.output.feed(payload)
            elif kind == LOGDROP:
                self.output.dropped += int(payload or b"0")
            elif kind == DATA:
                channel = self.channels.get(chan)
                if channel is not None:
                    channel.write(payload)
            elif kind == OPEN:
                self._open(chan)
            elif kind == CLOSE:
                channel = self.channels.pop(chan, None)
                if channel is not None:
                    channel.close()
            elif kind == CTL:
                self._on_control(json.loads(payload))

    def _open(self, chan: int) -> None:
        old = self.channels.pop(chan, None)
        if old is not None:
            old.close()
        channel = _Channel(self, chan)
        self.channels[chan] = channel

        async def connect() -> None:
            try:
                await self.loop.create_unix_connection(lambda: channel, self.api_socket)
            except OSError:
                channel.closed = True
                self.channel_closed(chan, notify=True)

        self.loop.create_task(connect())

    def channel_closed(self, chan: int, notify: bool) -> None:
        channel = self.channels.pop(chan, None)
        if channel is not None:
            channel.close()
        if notify:
            self.send(frame(CLOSE, chan))

    def _on_control(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "hello" and not self.hello.done():
            self.hello.set_result(msg)
        elif op == "loaded" and not self.loaded.done():
            self.loaded.set_result(msg)
        elif op == "load-failed" and not self.loaded.done():
            error = SandboxStartFailed(f"the guest agent could not load: {msg.get('error')}")
            self.loaded.set_exception(error)
        elif op == "exit" and not self.runtime_exit.done():
            self.runtime_exit.set_result(msg)
            if self.on_exit is not None:
                self.on_exit(msg)
        elif op == "first-request":
            self.first_request_ms = float(msg.get("ms", 0))
        elif op == "pong":
            fut = self.pongs.pop(msg.get("t"), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    async def ping(self, timeout: float = 5.0) -> tuple[float, int]:
        """One round trip host → agent → host: (seconds, guest clock minus host clock in ns)."""
        token = secrets.token_hex(4)
        fut: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self.pongs[token] = fut
        t0, sent = time.perf_counter(), time.time_ns()
        self.control({"op": "ping", "t": token})
        msg = await asyncio.wait_for(fut, timeout)
        received = time.time_ns()
        return time.perf_counter() - t0, int(msg.get("now", 0)) - (sent + received) // 2

    async def sync_clock(self, tolerance_ns: int = 1_000_000) -> int:
        """Step the guest's wall clock onto the host's (NTP-style, one exchange); returns the error fixed.

        ``load`` sets the clock from the host's time at sending, but a restored guest takes
        tens of ms (cold, under TCG) to act on it: deadlines would be off by as much."""
        _, offset = await self.ping()
        if abs(offset) > tolerance_ns:
            self.control({"op": "clock-step", "delta_ns": -offset})
        return offset


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # never "exception was never retrieved"


# --- one QEMU process ---------------------------------------------------------------


class VM:
    """A running QEMU: its process, serial link, monitor and pid file."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], watch: ProcessWatch, link: GuestLink,
                 qmp_sock: socket.socket, pidfile: PidFile, run_dir: Path | None) -> None:
        self.name = name
        self.proc = proc
        self.watch = watch
        self.link = link
        self.qmp_sock: socket.socket | None = qmp_sock
        self.qmp: Qmp | None = None
        self.pidfile = pidfile
        self.run_dir = run_dir
        self.diagnostics = OutputCapture(DIAG_LIMIT)
        watch.output_to(self.diagnostics)
        self.started = time.perf_counter()
        self._stopped = False

    @classmethod
    async def start(cls, name: str, config: VMConfig, run_dir: Path, pid_dir: Path, api_socket: str,
                    output: OutputCapture, owns_run_dir: bool) -> VM:
        """Spawn QEMU (call on the event loop thread: the death signal follows that thread).

        ``run_dir`` is QEMU's working directory; removed by :meth:`stop` if ``owns_run_dir``.
        """
        loop = asyncio.get_running_loop()
        link_host, link_vm = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        qmp_host, qmp_vm = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        proc: subprocess.Popen[bytes] | None = None
        try:
            try:
                proc = subprocess.Popen(
                    config.argv(name, link_vm.fileno(), qmp_vm.fileno()), stdin=subprocess.DEVNULL,
                    stdout=write_fd, stderr=write_fd, pass_fds=(link_vm.fileno(), qmp_vm.fileno()),
                    start_new_session=True, close_fds=True, cwd=run_dir)
            finally:
                os.close(write_fd)
                link_vm.close()
                qmp_vm.close()
            pidfile = PidFile.write(pid_dir, name, proc.pid)
            watch = ProcessWatch(proc, read_fd)
            link = GuestLink(api_socket, output)
            await loop.create_connection(lambda: link, sock=link_host)
        except BaseException:
            if proc is not None:
                _kill(proc.pid)
                proc.wait()
            with contextlib.suppress(OSError):
                os.close(read_fd)
            link_host.close()
            qmp_host.close()
            raise
        return cls(name, proc, watch, link, qmp_host, pidfile, run_dir if owns_run_dir else None)

    async def monitor(self) -> Qmp:
        if self.qmp is None:
            assert self.qmp_sock is not None
            sock, self.qmp_sock = self.qmp_sock, None
            self.qmp = await Qmp.connect(sock)
        return self.qmp

    @property
    def exited(self) -> asyncio.Future[int]:
        return self.watch.exited

    def describe_exit(self) -> str:
        """Why QEMU ended, from its console and error output."""
        text = self.diagnostics.peek()
        for marker in ("Kernel panic", "KVM internal error", "qemu-system-x86_64:"):
            pos = text.rfind(marker)
            if pos >= 0:
                return text[pos:].splitlines()[0].strip()[:300]
        status = self.exited.result() if self.exited.done() else None
        return f"the VM stopped (QEMU exit status {status})"

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.diagnostics.peek().splitlines()[-lines:])

    async def stop(self) -> None:
        """Kill QEMU and free everything (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        _kill(self.proc.pid)
        await self.watch.wait_closed()
        if self.qmp is not None:
            self.qmp.close()
        if self.qmp_sock is not None:
            self.qmp_sock.close()
        if self.link.transport is not None:
            self.link.transport.abort()
        self.pidfile.remove()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)


# --- snapshots ------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    path: Path
    key: str

    @property
    def state(self) -> Path:
        return self.path / "state"

    @property
    def ram(self) -> Path:
        return self.path / "ram"


class SnapshotStore:
    """``<images>/snapshots/<key>/{ram,state,meta.json}``: one template per runtime and memory size."""

    def __init__(self, driver: MicroVMDriver) -> None:
        self.driver = driver
        self.root = driver.store.snapshots
        self._locks: dict[str, asyncio.Lock] = {}
        self.failures: dict[str, str] = {}

    def key(self, runtime: str, memory_mb: int) -> str:
        d = self.driver
        store = d.store
        accel = d.accel.accel
        cpu = cpu_model(accel) + (host_cpu() if accel == "kvm" else "")  # -cpu host: this CPU only
        parts = [SNAPSHOT_RECIPE, qemu_version(d.binary), accel, cpu,
                 kernel_cmdline(d.accel.accel), store.key("kernel"), store.key("initramfs"),
                 store.key(f"rootfs-{runtime}"), str(memory_mb), str(CODE_DISK_BYTES), runtime]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]

    def lookup(self, runtime: str, memory_mb: int) -> Snapshot | None:
        key = self.key(runtime, memory_mb)
        path = self.root / key
        if (path / "meta.json").exists():
            return Snapshot(path, key)
        return None

    async def ensure(self, runtime: str, memory_mb: int) -> Snapshot:
        """The snapshot for (runtime, memory), made now if missing (one maker per key, across processes)."""
        key = self.key(runtime, memory_mb)
        found = self.lookup(runtime, memory_mb)
        if found is not None:
            return found
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            found = self.lookup(runtime, memory_mb)
            if found is not None:
                return found
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / f".{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:  # the lock file stays: unlinking it would let a third process lock a new one
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
                found = self.lookup(runtime, memory_mb)
                if found is not None:
                    return found
                return await self._make(runtime, memory_mb, key)
            finally:
                os.close(fd)

    async def _make(self, runtime: str, memory_mb: int, key: str) -> Snapshot:
        d = self.driver
        tmp = self.root / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        config = d.vm_config(runtime, memory_mb, d.codes.blank(), Memory(tmp / "ram", shared=True))
        vm = await d.start_vm(f"template-{key[:12]}-{secrets.token_hex(3)}", config, api_socket="",
                              output=OutputCapture())
        try:
            await _first(vm.link.hello, vm.exited, BOOT_TIMEOUT, "boot the snapshot template", vm)
            booted = time.perf_counter() - t0
            qmp = await vm.monitor()
            await qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "x-ignore-shared", "state": True}]})
            await qmp.execute("migrate", {"uri": f"exec:cat > {_shell_quote(tmp / 'state')}"})
            while True:
                info = await qmp.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise SandboxStartFailed(f"saving the snapshot failed: {info.get('error-desc', status)}")
                await asyncio.sleep(0.01)
        finally:
            await vm.stop()
        meta = {"runtime": runtime, "memory_mb": memory_mb, "accel": d.accel.accel, "key": key,
                "qemu": qemu_version(d.binary), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "boot_seconds": round(booted, 3), "total_seconds": round(time.perf_counter() - t0, 3),
                "state_bytes": (tmp / "state").stat().st_size,
                "images": {name: d.store.key(name) for name in ("kernel", "initramfs", f"rootfs-{runtime}")}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        target = self.root / key
        try:
            os.rename(tmp, target)
        except OSError:  # made meanwhile by a process that ignored the lock: keep that one
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("microvm: snapshot %s made for %s/%d MB in %.1f s", key, runtime, memory_mb,
                 meta["total_seconds"])
        return Snapshot(target, key)


def _shell_quote(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))


async def _first(wanted: asyncio.Future[Any], exited: asyncio.Future[int], timeout: float, what: str,
                 vm: VM) -> Any:
    """Await ``wanted``; SandboxStartFailed if the VM exits first or time runs out."""
    await asyncio.wait({wanted, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if wanted.done():
        return wanted.result()
    wanted.cancel()
    if exited.done():
        raise SandboxStartFailed(f"could not {what}: {vm.describe_exit()}", vm.tail())
    raise SandboxStartFailed(f"could not {what} within {timeout:.0f} s", vm.tail())


# --- instances --------------------------------------------------------------------------


class MicroVMInstance(Instance):
    """One VM.  ``note`` says how its cold start was served ("restored from snapshot",
    "booted (no snapshot: ...)") for the invocation record; ``timings`` holds the seconds
    each start-up step took (host side, and the guest's own ``guest ...`` steps)."""

    def __init__(self, spec: InstanceSpec, api: RuntimeAPI, run_dir: Path) -> None:
        super().__init__(spec, api)
        self.run_dir = run_dir
        self.vm: VM | None = None
        self.timings: dict[str, float] = {}
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._oom = False
        self._failure = ""

    def attach(self, vm: VM) -> None:
        self.vm = vm
        vm.link.on_exit = self._runtime_exited
        vm.exited.add_done_callback(self._vm_exited)

    async def discard_vm(self) -> None:
        """Stop the VM without ending the instance (a failed restore, before a boot)."""
        vm, self.vm = self.vm, None
        if vm is not None:
            vm.link.on_exit = None
            vm.exited.remove_done_callback(self._vm_exited)
            await vm.stop()

    @property
    def exited(self) -> asyncio.Future[int]:
        return self._exited

    def oom_killed(self) -> bool:
        return self._oom

    def drain_output(self) -> None:
        """Nothing to do: output arrives on the serial link ahead of the response it preceded."""

    def _runtime_exited(self, msg: dict[str, Any]) -> None:
        self._oom = bool(msg.get("oom"))
        if not self._exited.done():
            self._exited.set_result(int(msg.get("status", -1)))
        if self.vm is not None:  # the instance is over: free the VM now, not at destroy
            _kill(self.vm.proc.pid)

    def _vm_exited(self, fut: asyncio.Future[int]) -> None:
        if self._exited.done() or self.vm is None:
            return
        self._failure = self.vm.describe_exit()
        vm = self.vm

        def settle(_: Any = None) -> None:
            if not self._exited.done():
                self._exited.set_result(fut.result())

        # the link may still hold output written just before the end: let it arrive first
        if vm.link.closed.done():
            settle()
        else:
            vm.link.closed.add_done_callback(settle)
            asyncio.get_running_loop().call_later(0.5, settle)

    async def invoke(self, invocation: Invocation, timeout: float) -> RuntimeReply:
        try:
            return await super().invoke(invocation, timeout)
        except RuntimeExited as exc:
            if self._failure and not self._oom:
                raise RuntimeExited(f"{self._failure} (during the invocation)", exc.logs) from exc
            raise

    async def _teardown(self) -> None:
        if self.vm is not None:
            await self.vm.stop()
        if not self._exited.done():
            self._exited.set_result(-signal.SIGKILL)
        shutil.rmtree(self.run_dir, ignore_errors=True)


# --- the driver -----------------------------------------------------------------------


class MicroVMDriver(SandboxDriver):
    """Each instance is a QEMU microvm VM (see the module docstring)."""

    name = "microvm"
    unsafe = False

    def __init__(self, work_dir: Path, images_dir: Path, accel: str = "auto",
                 snapshots: bool = True) -> None:
        """``accel``: ``auto`` (probe), ``kvm`` or ``tcg``; ``snapshots``: restore cold starts
        from a per-runtime snapshot (else every instance boots)."""
        binary = qemu_binary()
        if binary is None:
            raise ConfigError("the microvm sandbox needs qemu-system-x86_64 (Debian package qemu-system-x86)")
        self.binary = binary
        self.store = ImageStore(images_dir)
        missing = self.store.missing(["python"])
        if missing:
            raise ConfigError(
                f"the microvm sandbox needs guest images, and {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing in {self.store.root}: "
                "build them with `impuls images build`")
        self.accel: AccelChoice = choose_accel(self.store, accel)
        self.use_snapshots = snapshots
        self.work_dir = work_dir
        self.pid_dir = work_dir / "run"
        self.vm_dir = work_dir / "vms"
        for d in (self.pid_dir, self.vm_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.codes = CodeDisks(work_dir / "code")
        self.snapshots = SnapshotStore(self)
        self.qemu_version = qemu_version(binary)
        with contextlib.suppress(OSError):
            stale = self.store.collect_snapshots()
            if stale:
                log.info("microvm: removed %d snapshots of images rebuilt since", stale)
        log.info("microvm: %s (%s)", self.accel.note, self.accel.reason)

    # configuration

    def offered(self) -> dict[str, str]:
        """Runtime id → guest runtime (rootfs) for the images that are built.

        The rootfs manifests name their languages' ids (``python3.11``, ``nodejs18``: the
        guest's node is Debian's); packages that bring their own ``bootstrap`` (``provided``,
        ``go1.x``: static binaries) run on the Python rootfs, which every guest has.
        """
        offered = self.store.offered()
        if "python" in offered.values():
            for runtime_id in SELF_CONTAINED_RUNTIMES:
                offered.setdefault(runtime_id, "python")
        return offered

    def supports(self, runtime: Runtime) -> bool:
        return runtime.id in self.offered()

    def vm_config(self, guest_runtime: str, memory_mb: int, code_disk: Path, memory: Memory | None = None,
                  incoming: bool = False) -> VMConfig:
        return VMConfig(self.binary, self.accel.accel, memory_mb, self.store.kernel, self.store.initramfs,
                        self.store.rootfs(guest_runtime), code_disk, memory or Memory(), incoming)

    async def start_vm(self, name: str, config: VMConfig, api_socket: str, output: OutputCapture,
                       run_dir: Path | None = None) -> VM:
        owned = run_dir is None
        run_dir = run_dir or _short_dir(self.vm_dir / name)
        try:
            return await VM.start(name, config, run_dir, self.pid_dir, api_socket, output, owned)
        except OSError as exc:
            if owned:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise SandboxStartFailed(f"cannot start QEMU: {exc}") from exc

    # instances

    async def create(self, spec: InstanceSpec) -> Instance:
        guest = self.offered().get(spec.runtime.id)
        if guest is None:
            raise SandboxStartFailed(
                f"runtime {spec.runtime.id} is not offered by the microvm sandbox (guest images offer: "
                f"{', '.join(sorted(self.offered())) or 'none'})")
        guest_command(spec.runtime)  # fails now, not after a boot, for a runtime the guest cannot start
        t0 = time.perf_counter()
        api = RuntimeAPI()
        run_dir = _short_dir(self.vm_dir / spec.instance_id)
        instance = MicroVMInstance(spec, api, run_dir)
        try:
            await api.listen_unix(str(run_dir / "runtime-api.sock"))
            code_disk = await self._code_disk(spec, guest)
            instance.timings["code_disk"] = time.perf_counter() - t0
            snapshot, why = await self._snapshot_for(guest, spec.memory_mb)
            if snapshot is not None:
                try:
                    await self._restore(instance, guest, snapshot, code_disk.path)
                    instance.note = "restored from snapshot" + (f" ({why})" if why else "")
                except SandboxStartFailed as exc:
                    log.warning("microvm: restoring snapshot %s failed (%s); booting instead", snapshot.key,
                                exc.message)
                    shutil.rmtree(snapshot.path, ignore_errors=True)
                    why = f"restore failed: {exc.message}"
                    snapshot = None
                    await instance.discard_vm()
            if snapshot is None:
                await self._boot(instance, guest, code_disk.path)
                instance.note = f"booted ({why})"
            instance.timings["vm_ready"] = time.perf_counter() - t0
            self._load(instance, code_disk)
            assert instance.vm is not None
            loaded = await _first(instance.vm.link.loaded, instance.vm.exited, RESTORE_TIMEOUT,
                                  "load the function into the VM", instance.vm)
            instance.timings["loaded"] = time.perf_counter() - t0
            for step, ms in loaded.get("steps", {}).items():
                instance.timings[f"guest {step}"] = ms / 1000
            instance.timings["clock error"] = await instance.vm.link.sync_clock() / 1e9
        except BaseException as exc:
            await instance.destroy()
            if isinstance(exc, OSError):
                raise SandboxStartFailed(f"cannot start the microVM: {exc}") from exc
            raise
        await instance.ready_or_destroyed(INIT_TIMEOUT)
        instance.timings["ready"] = time.perf_counter() - t0
        if instance.vm is not None and instance.vm.link.first_request_ms:
            instance.timings["guest runtime init"] = instance.vm.link.first_request_ms / 1000
        return instance

    async def _snapshot_for(self, guest: str, memory_mb: int) -> tuple[Snapshot | None, str]:
        if not self.use_snapshots:
            return None, "snapshots disabled"
        existing = self.snapshots.lookup(guest, memory_mb)
        if existing is not None:
            return existing, ""
        key = self.snapshots.key(guest, memory_mb)
        if key in self.snapshots.failures:
            return None, f"no snapshot: {self.snapshots.failures[key]}"
        try:
            return await self.snapshots.ensure(guest, memory_mb), "snapshot made for this start"
        except (SandboxStartFailed, QmpError, OSError, TimeoutError) as exc:
            reason = exc.message if isinstance(exc, SandboxStartFailed) else str(exc) or type(exc).__name__
            log.warning("microvm: cannot make a snapshot for %s/%d MB: %s", guest, memory_mb, reason)
            self.snapshots.failures[key] = reason
            return None, f"no snapshot: {reason}"

    async def _restore(self, instance: MicroVMInstance, guest: str, snapshot: Snapshot,
                       code_disk: Path) -> None:
        spec = instance.spec
        t0 = time.perf_counter()
        config = self.vm_config(guest, spec.memory_mb, code_disk, Memory(snapshot.ram, shared=False),
                                incoming=True)
        vm = await self.start_vm(spec.instance_id, config, instance.api.address, instance.output,
                                 instance.run_dir)
        instance.attach(vm)
        qmp = await _first(asyncio.ensure_future(vm.monitor()), vm.exited, RESTORE_TIMEOUT,
                           "reach the QEMU monitor", vm)
        resumed = qmp.event("RESUME")
        await qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]})
        await qmp.execute("migrate-incoming", {"uri": f"exec:cat {_shell_quote(snapshot.state)}"})
        await _first(resumed, vm.exited, RESTORE_TIMEOUT, "restore the snapshot", vm)
        instance.timings["restore"] = time.perf_counter() - t0

    async def _boot(self, instance: MicroVMInstance, guest: str, code_disk: Path) -> None:
        spec = instance.spec
        t0 = time.perf_counter()
        config = self.vm_config(guest, spec.memory_mb, code_disk)
        vm = await self.start_vm(spec.instance_id, config, instance.api.address, instance.output,
                                 instance.run_dir)
        instance.attach(vm)
        await _first(vm.link.hello, vm.exited, BOOT_TIMEOUT, "boot the VM", vm)
        instance.timings["boot"] = time.perf_counter() - t0

    async def _code_disk(self, spec: InstanceSpec, guest: str) -> CodeDisk:
        python = ""
        if spec.runtime.language == "python":
            art = self.store.artifact(f"rootfs-{guest}")
            python = str(art.info.get("versions", {}).get("python", "")) if art else ""
        try:
            return await asyncio.to_thread(self.codes.disk_for, spec.code_dir, python)
        except (CodeDiskError, OSError) as exc:
            raise SandboxStartFailed(f"cannot make the code disk: {exc}") from exc

    def _load(self, instance: MicroVMInstance, code_disk: CodeDisk) -> None:
        spec = instance.spec
        env = spec.runtime_environment(API_ADDRESS, TASK_ROOT, TMP_DIR)
        if getattr(spec.runtime, "unix_socket_client", True):
            env["IMPULS_RUNTIME_API_SOCKET"] = API_SOCKET
        argv, zygote = guest_command(spec.runtime)
        assert instance.vm is not None
        instance.vm.link.control({
            "op": "load", "env": env, "argv": argv, "zygote": zygote, "time_ns": time.time_ns(),
            "seed": secrets.token_hex(64), "tmp_mb": spec.ephemeral_storage_mb, "code_fs": code_disk.fstype,
        })

    # housekeeping

    async def reap_orphans(self) -> int:
        count = PidFile.reap_all(self.pid_dir)
        for leftover in self.vm_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        _remove_abandoned_short_dirs()
        for leftover in self.store.snapshots.glob(f".*.{os.getpid()}.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        await asyncio.to_thread(self.codes.collect)
        return count

    async def warm_up(self, runtime_ids: list[str] | None = None,
                      memory_mb: tuple[int, ...] = (128,)) -> None:
        """Make the snapshots for these runtimes and memory sizes now (else the first cold start does)."""
        offered = self.offered()
        for runtime_id in runtime_ids or list(offered):
            for mb in memory_mb:
                await self.snapshots.ensure(offered[runtime_id], mb)

    def describe(self) -> dict[str, Any]:
        return {
            "sandbox": self.name, "unsafe": False,
            "isolation": f"a QEMU microvm VM per instance (own guest kernel), {self.accel.accel}",
            "accel": self.accel.accel, "accel_note": self.accel.note, "accel_reason": self.accel.reason,
            "vmm": f"qemu {self.qemu_version} (microvm machine)",
            "images": str(self.store.root),
            "guest_runtimes": sorted(self.offered()),
            "snapshots": self.use_snapshots,
        }


__all__ = ["MicroVMDriver", "MicroVMInstance"]
