"""The VMM layer: QEMU ``microvm`` argv, a QMP client, and which acceleration works on this host.

Another VMM (Firecracker, where it exists) would take QEMU's place here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from impuls.errors import ConfigError, SandboxStartFailed
from impuls.runtimes.guest.protocol import PORT_NAME
from impuls.sandbox.microvm import jail
from impuls.sandbox.microvm.images import ImageStore
from impuls.sandbox.microvm.jail import Mount

QEMU = "qemu-system-x86_64"
PROBE_TIMEOUT = 15.0  # a working KVM boots kernel + initramfs to the marker in about a second
PROBE_MARKER = b"IMPULS-PROBE-OK"
ACCEL_MODES = ("auto", "kvm", "tcg")
TCG_NOTE = "TCG: software emulation (no usable hardware virtualization on this host), much slower than KVM"
KVM_NOTE = "KVM: hardware virtualization"
PVM_NOTE = "; the host's KVM is kvm_pvm (nested PVM), which stock guest kernels cannot use"

# Kernel command line shared by every boot.  Under TCG the TSC must be
# declared (else calibration hangs) and mitigations are pointless: the
# emulator does not speculate.  panic=-1 + QEMU's -no-reboot turn a guest
# panic (and PID 1 exiting) into QEMU exiting.
KERNEL_ARGS = ("console=ttyS0", "quiet", "panic=-1", "reboot=t", "tsc_early_khz=2000000", "tsc=reliable",
               "random.trust_cpu=on", "i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd",
               "cryptomgr.notests", "rcupdate.rcu_expedited=1")
TCG_KERNEL_ARGS = ("mitigations=off",)


def qemu_binary() -> str | None:
    return shutil.which(QEMU)


@cache
def qemu_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    first = out.stdout.splitlines()[0] if out.stdout else ""
    return first.replace("QEMU emulator version", "").strip()


def cpu_model(accel: str) -> str:
    return "host,-arch-capabilities" if accel == "kvm" else "max"


def kernel_cmdline(accel: str, extra: tuple[str, ...] = ()) -> str:
    args = KERNEL_ARGS + (TCG_KERNEL_ARGS if accel == "tcg" else ()) + extra
    return " ".join(args)


def machine_args(accel: str, memory_mb: int, memory_backend: str | None = None) -> list[str]:
    """The machine part of a QEMU argv: microvm, one vCPU, no default devices, no network, and
    QEMU's own seccomp filter (``-sandbox``: see :mod:`.jail`)."""
    machine = "microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=on,pic=on"
    if memory_backend is not None:
        machine += f",memory-backend={memory_backend}"
    accel_opt = "tcg,tb-size=64" if accel == "tcg" else "kvm"
    return ["-sandbox", jail.QEMU_SANDBOX, "-M", machine, "-accel", accel_opt, "-cpu", cpu_model(accel),
            "-m", f"{memory_mb}M", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot"]


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" | "tcg"
    reason: str

    @property
    def note(self) -> str:
        return KVM_NOTE if self.accel == "kvm" else TCG_NOTE


@cache
def host_cpu() -> str:
    """The host CPU's model and flags (a KVM guest with ``-cpu host`` sees exactly these)."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                cpu += line
            if line == "":
                break
    return cpu


def _host_key(store: ImageStore, binary: str) -> str:
    parts = [socket.gethostname(), os.uname().release, host_cpu(), qemu_version(binary), store.key("kernel"),
             store.key("initramfs"), jail.JAIL_RECIPE]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def probe_kvm(store: ImageStore, binary: str, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot the guest kernel + initramfs under KVM, confined as every VM is, to the probe
    marker; (usable, detail)."""
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    _, why = jail.kvm_access()
    if why:
        return False, why + (PVM_NOTE if os.path.isdir("/sys/module/kvm_pvm") else "")
    mounts = [Mount(store.kernel, "vmlinux"), Mount(store.initramfs, "initramfs")]
    qemu = [binary, *machine_args("kvm", 128), "-kernel", mounts[0].inside, "-initrd", mounts[1].inside,
            "-append", kernel_cmdline("kvm", ("impuls.probe=1",)), "-serial", "stdio"]
    started = time.monotonic()
    filter_fd = None
    try:
        filter_fd = jail.seccomp_fd()
        proc = subprocess.Popen(jail.command(qemu, mounts, "kvm", filter_fd), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                pass_fds=(filter_fd,), env={}, cwd="/")
    except (OSError, SandboxStartFailed) as exc:
        return False, f"cannot run {binary}: {exc}"
    finally:
        jail.close_quietly(filter_fd)
    assert proc.stdout is not None
    output = b""
    try:
        while time.monotonic() - started < timeout:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                output += chunk
                if PROBE_MARKER in output:
                    return True, f"probe boot reached user space in {time.monotonic() - started:.2f} s"
                if b"KVM internal error" in output or b"emulation failure" in output:
                    break
        detail = output.decode("utf-8", "replace").strip().splitlines()
        tail = detail[0] if detail else "no output"
        if time.monotonic() - started >= timeout:
            tail = f"no boot within {timeout:.0f} s ({tail})"
        if os.path.isdir("/sys/module/kvm_pvm"):
            tail += PVM_NOTE
        return False, f"probe boot under KVM failed: {tail}"[:400]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def choose_accel(store: ImageStore, mode: str = "auto", binary: str | None = None) -> AccelChoice:
    """The acceleration to use: ``mode`` when it is ``kvm`` or ``tcg``, else the (cached) probe verdict.

    Acceleration is decided by *booting*, not by looking for ``/dev/kvm``: on hosts whose
    KVM is nested PVM, ``/dev/kvm`` opens and ``KVM_CREATE_VM`` succeeds, yet a stock guest
    kernel dies in KVM's instruction emulator.  So ``auto`` boots the real kernel + initramfs
    under ``-accel kvm`` to a marker line once per host (the verdict is cached in
    ``<images>/accel/``) and falls back to TCG, QEMU's software emulation, when that fails.
    ``IMPULS_MICROVM_ACCEL=kvm|tcg`` (``Settings.microvm_accel``) overrides the probe.
    """
    if mode not in ACCEL_MODES:
        raise ConfigError(f"IMPULS_MICROVM_ACCEL must be one of {', '.join(ACCEL_MODES)}, not {mode!r}")
    if mode != "auto":
        return AccelChoice(mode, f"IMPULS_MICROVM_ACCEL={mode}")
    binary = binary or qemu_binary()
    if binary is None:
        raise ConfigError(f"{QEMU} is not installed (Debian package qemu-system-x86)")
    if not os.path.exists("/dev/kvm"):
        return AccelChoice("tcg", "/dev/kvm does not exist")
    path = store.accel_dir / f"{_host_key(store, binary)}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        doc = json.loads(path.read_text())
        return AccelChoice("kvm" if doc["kvm_usable"] else "tcg", f"cached probe: {doc['detail']}")
    usable, detail = probe_kvm(store, binary)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"kvm_usable": usable, "detail": detail, "host": socket.gethostname(),
                               "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    os.replace(tmp, path)
    return AccelChoice("kvm" if usable else "tcg", f"probe: {detail}")


def qemu_path(path: Path | str) -> str:
    """A path inside a QEMU option value (commas are doubled)."""
    return str(path).replace(",", ",,")


# --- one machine's argv ---------------------------------------------------------------


@dataclass
class Memory:
    """Guest RAM: anonymous; a file mapped shared and writable (``path``: a snapshot template's,
    the one file QEMU may write); or a sealed memfd mapped private (``fd``: a clone's RAM, the
    template's pages copy-on-write, see :mod:`.snapshots`)."""

    path: Path | None = None
    shared: bool = False
    fd: int | None = None


@dataclass
class VMConfig:
    """Everything one QEMU process is started with.

    Devices, in this order on every start (a restore needs the template's):
    virtio-blk rootfs, virtio-blk code disk, writable virtio-blk ``/tmp`` disk (one size
    for all, :data:`~impuls.sandbox.scratch.MAX_DEVICE_MB`), virtio-serial with the agent's
    port ``nr=1``; the ISA serial console on stdio; QMP and the agent port on
    inherited socketpair fds.  With ``incoming`` the machine waits for
    ``migrate-incoming`` and is started without ``-kernel``: its RAM has it.
    QEMU runs in a jail (:mod:`.jail`) where the files it is given are ``/vm/<name>``
    (:meth:`mounts`); the RAM of a clone is an inherited descriptor (:attr:`fds`).
    """

    binary: str
    accel: str
    memory_mb: int
    kernel: Path
    initramfs: Path
    rootfs: Path
    code_disk: Path
    tmp_disk: Path
    memory: Memory = field(default_factory=Memory)
    incoming: bool = False

    def mounts(self) -> list[Mount]:
        """The host files QEMU needs, as its jail shows them (read-only but a template's RAM)."""
        mounts = [Mount(self.rootfs, "rootfs.ext4"), Mount(self.code_disk, "code.img"),
                  Mount(self.tmp_disk, "tmp.img", writable=True)]
        if not self.incoming:
            mounts += [Mount(self.kernel, "vmlinux"), Mount(self.initramfs, "initramfs")]
        if self.memory.path is not None:
            mounts.append(Mount(self.memory.path, "ram", writable=True))
        return mounts

    @property
    def fds(self) -> tuple[int, ...]:
        """Descriptors QEMU inherits besides its sockets."""
        return (self.memory.fd,) if self.memory.fd is not None else ()

    def qemu_argv(self, name: str, link_fd: int, qmp_fd: int) -> list[str]:
        """QEMU's own argv (paths as its jail shows them)."""
        inside = {m.host: m.inside for m in self.mounts()}
        args = [self.binary, "-name", f"impuls-{name}"]
        backend = None
        if self.memory.path is not None or self.memory.fd is not None:
            backend = "ram"
            # /proc/self/fd/N: QEMU 7.2 reopens its mem-path read-write; a sealed memfd allows
            # that and still refuses every write that would reach other clones
            path = (inside[self.memory.path] if self.memory.path is not None
                    else f"/proc/self/fd/{self.memory.fd}")
            args += ["-object", f"memory-backend-file,id=ram,size={self.memory_mb}M,"
                     f"mem-path={qemu_path(path)},share={'on' if self.memory.shared else 'off'}"]
        args += machine_args(self.accel, self.memory_mb, backend)
        if not self.incoming:  # a restored guest has its kernel in RAM: QEMU need not load it again
            args += ["-kernel", inside[self.kernel], "-initrd", inside[self.initramfs],
                     "-append", kernel_cmdline(self.accel)]
        drive = "format=raw,if=none,read-only=on"
        args += ["-drive", f"id=root,file={qemu_path(inside[self.rootfs])},{drive}",
                 "-device", "virtio-blk-device,drive=root",
                 "-drive", f"id=code,file={qemu_path(inside[self.code_disk])},{drive}",
                 "-device", "virtio-blk-device,drive=code",
                 "-drive", f"id=tmp,file={qemu_path(inside[self.tmp_disk])},format=raw,if=none",
                 "-device", "virtio-blk-device,drive=tmp",
                 "-device", "virtio-serial-device,max_ports=2",
                 "-chardev", f"socket,id=agent,fd={link_fd}",
                 "-device", f"virtserialport,chardev=agent,name={PORT_NAME},nr=1",
                 "-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control",
                 "-serial", "stdio"]
        if self.incoming:
            args += ["-incoming", "defer"]
        return args

    def command(self, name: str, link_fd: int, qmp_fd: int, seccomp_fd: int) -> list[str]:
        """The whole command line: QEMU in its jail (see :func:`.jail.command`)."""
        return jail.command(self.qemu_argv(name, link_fd, qmp_fd), self.mounts(), self.accel, seccomp_fd)


# --- QMP ----------------------------------------------------------------------------


class QmpError(Exception):
    pass


class Qmp:
    """A minimal QMP client on a connected socket: commands, and events kept for waiters."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 sock: socket.socket | None = None) -> None:
        self.reader = reader
        self.writer = writer
        self.sock = sock  # the transport's socket, for the one message that carries a descriptor
        self.events: list[dict[str, Any]] = []
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._event_waiters: list[tuple[str, asyncio.Future[dict[str, Any]]]] = []
        self._next = 1
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    @classmethod
    async def connect(cls, sock: socket.socket) -> Qmp:
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
        qmp = cls(reader, writer, sock)
        greeting = json.loads(await reader.readline())
        if "QMP" not in greeting:
            raise QmpError(f"unexpected QMP greeting {greeting!r}")
        qmp._task = asyncio.get_running_loop().create_task(qmp._read())
        await qmp.execute("qmp_capabilities")
        return qmp

    async def _read(self) -> None:
        try:
            while line := await self.reader.readline():
                msg = json.loads(line)
                if "event" in msg:
                    self.events.append(msg)
                    for name, waiter in list(self._event_waiters):
                        if name == msg["event"] and not waiter.done():
                            waiter.set_result(msg)
                    continue
                fut = self._waiting.pop(msg.get("id", -1), None)
                if fut is not None and not fut.done():
                    if "error" in msg:
                        fut.set_exception(QmpError(msg["error"].get("desc", str(msg["error"]))))
                    else:
                        fut.set_result(msg.get("return"))
        except (OSError, ValueError):
            pass
        finally:
            self.closed = True
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(QmpError("QEMU closed the monitor"))
            for _, fut in self._event_waiters:
                if not fut.done():
                    fut.set_exception(QmpError("QEMU closed the monitor"))

    def _request(self, command: str,
                 arguments: dict[str, Any] | None) -> tuple[int, bytes, asyncio.Future[Any]]:
        if self.closed:
            raise QmpError("QEMU closed the monitor")
        ident = self._next
        self._next += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = fut
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        return ident, json.dumps(msg).encode() + b"\n", fut

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float = 30.0) -> Any:
        _, data, fut = self._request(command, arguments)
        self.writer.write(data)
        return await asyncio.wait_for(fut, timeout)

    async def send_fd(self, name: str, fd: int, timeout: float = 30.0) -> None:
        """Hand QEMU a duplicate of ``fd`` as ``name`` (QMP ``getfd``: the descriptor rides on
        the command's bytes as SCM_RIGHTS ancillary data), e.g. for ``fd:<name>`` migrations:
        QEMU then never opens the file itself."""
        if self.sock is None:
            raise QmpError("the monitor has no socket to pass descriptors over")
        ident, data, fut = self._request("getfd", {"fdname": name})
        await self.writer.drain()
        transport = self.writer.transport
        while transport.get_write_buffer_size():  # what the transport holds must go first
            await asyncio.sleep(0.001)
        while True:
            try:
                sent = socket.send_fds(self.sock, [data], [fd])
                break
            except (BlockingIOError, InterruptedError):
                await asyncio.sleep(0.001)
            except OSError as exc:
                self._waiting.pop(ident, None)
                raise QmpError(f"cannot pass a descriptor to QEMU: {exc}") from exc
        if sent < len(data):
            self.writer.write(data[sent:])
        await asyncio.wait_for(fut, timeout)

    def event(self, name: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next event ``name`` (or one already seen)."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        for msg in self.events:
            if msg["event"] == name:
                fut.set_result(msg)
                return fut
        self._event_waiters.append((name, fut))
        return fut

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.writer.close()
