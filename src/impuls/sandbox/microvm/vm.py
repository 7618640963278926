"""One QEMU process: started with its serial link and monitor on socketpairs, watched, migrated, killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from impuls.errors import SandboxStartFailed
from impuls.sandbox.base import OutputCapture, kill_signal
from impuls.sandbox.microvm import jail
from impuls.sandbox.microvm.link import GuestLink
from impuls.sandbox.microvm.qemu import Qmp, QmpError, VMConfig
from impuls.sandbox.watch import PidFile, ProcessWatch

BOOT_TIMEOUT = 120.0  # kernel + agent under TCG, several VMs sharing two cores
DIAG_LIMIT = 16 * 1024
SHORT_DIR_PREFIX = "impuls-vm-"
# Snapshots migrate only device state: the RAM is a memory-backend-file that stays where it is.
IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
STATE_FD = "snapstate"  # the name QEMU knows the snapshot state's descriptor by (QMP getfd)
EXIT_MARKERS = ("Kernel panic", "KVM internal error", "qemu-system-x86_64:", "bwrap:", "setpriv:", "prlimit:")


def _kill_group(pid: int) -> None:
    """SIGKILL QEMU's process group (its own session: the jail's processes and QEMU)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def short_dir(preferred: Path) -> Path:
    """``preferred`` if a unix socket path inside it fits in sun_path, else a fresh temporary
    directory named after this process (so that a successor can tell it is abandoned)."""
    if len(str(preferred / "runtime-api.sock")) < 100:
        preferred.mkdir(parents=True, exist_ok=True, mode=0o700)
        return preferred
    return Path(tempfile.mkdtemp(prefix=f"{SHORT_DIR_PREFIX}{os.getpid()}-"))


def remove_abandoned_short_dirs() -> None:
    """Remove the temporary directories of :func:`short_dir` whose process is gone."""
    for path in Path(tempfile.gettempdir()).glob(f"{SHORT_DIR_PREFIX}*-*"):
        try:
            pid = int(path.name[len(SHORT_DIR_PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except (OSError, ValueError):
        return []


def _argv0(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return ""


class VM:
    """A running QEMU: its process, serial link, monitor and pid file.

    ``proc`` is the jail's outermost process (``setpriv``, then ``bwrap``): killing its
    process group kills QEMU; :attr:`qemu_pid` is QEMU's own host pid.
    """

    def __init__(self, name: str, proc: subprocess.Popen[bytes], watch: ProcessWatch, link: GuestLink,
                 qmp_sock: socket.socket, pidfile: PidFile, run_dir: Path | None, binary: str = "") -> None:
        self.name = name
        self.proc = proc
        self.binary = binary
        self._qemu_pid: int | None = None
        self.watch = watch
        self.link = link
        self.qmp_sock: socket.socket | None = qmp_sock
        self.qmp: Qmp | None = None
        self.pidfile = pidfile
        self.run_dir = run_dir
        self.diagnostics = OutputCapture(DIAG_LIMIT)
        watch.output_to(self.diagnostics)
        self._stopped = False
        self._killing = False  # the server itself killed QEMU (kill or stop)

    @classmethod
    async def start(cls, name: str, config: VMConfig, run_dir: Path, pid_dir: Path, api_socket: str,
                    output: OutputCapture, owns_run_dir: bool) -> VM:
        """Spawn QEMU in its jail (call on the event loop thread: the death signal follows
        that thread).

        The guest link and QMP are socketpairs whose QEMU ends are passed as ``fd=``: no
        socket path, no connect race, nothing to clean up.  ``run_dir`` is the VM's host-side
        directory (QEMU never sees it); removed by :meth:`stop` if ``owns_run_dir``.
        """
        loop = asyncio.get_running_loop()
        link_host, link_vm = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        qmp_host, qmp_vm = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        proc: subprocess.Popen[bytes] | None = None
        filter_fd = -1
        try:
            try:
                filter_fd = jail.seccomp_fd()
                proc = subprocess.Popen(
                    config.command(name, link_vm.fileno(), qmp_vm.fileno(), filter_fd),
                    stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
                    pass_fds=(link_vm.fileno(), qmp_vm.fileno(), filter_fd, *config.fds),
                    start_new_session=True, close_fds=True, cwd="/", env={})
            finally:
                os.close(write_fd)
                jail.close_quietly(filter_fd)
                link_vm.close()
                qmp_vm.close()
            pidfile = PidFile.write(pid_dir, name, proc.pid)
            watch = ProcessWatch(proc, read_fd)
            link = GuestLink(api_socket, output)
            await loop.create_connection(lambda: link, sock=link_host)
        except BaseException:
            if proc is not None:
                _kill_group(proc.pid)
                proc.wait()
            with contextlib.suppress(OSError):
                os.close(read_fd)
            link_host.close()
            qmp_host.close()
            raise
        return cls(name, proc, watch, link, qmp_host, pidfile, run_dir if owns_run_dir else None,
                   config.binary)

    @property
    def qemu_pid(self) -> int | None:
        """QEMU's host pid (a descendant of :attr:`proc` in the jail), once it has started."""
        if self._qemu_pid is None and self.proc.poll() is None:
            todo = [self.proc.pid]
            while todo and self._qemu_pid is None:
                pid = todo.pop()
                if pid != self.proc.pid and _argv0(pid) == self.binary:
                    self._qemu_pid = pid
                todo += _children(pid)
        return self._qemu_pid

    async def monitor(self) -> Qmp:
        if self.qmp is None:
            assert self.qmp_sock is not None
            sock, self.qmp_sock = self.qmp_sock, None
            self.qmp = await Qmp.connect(sock)
        return self.qmp

    @property
    def exited(self) -> asyncio.Future[int]:
        return self.watch.exited

    async def wait_for(self, wanted: asyncio.Future[Any], timeout: float, what: str) -> Any:
        """Await ``wanted``; SandboxStartFailed if the VM exits first or time runs out."""
        exited = self.exited
        await asyncio.wait({wanted, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if wanted.done():
            return wanted.result()
        wanted.cancel()
        if exited.done():
            raise SandboxStartFailed(f"could not {what}: {self.describe_exit()}", self.tail())
        raise SandboxStartFailed(f"could not {what} within {timeout:.0f} s", self.tail())

    async def save(self, state: Path) -> None:
        """Migrate the machine's device state into the file ``state`` (its RAM stays in its
        shared memory file); returns when the migration completed.

        The server opens the file and hands QEMU the descriptor (``fd:`` migration): QEMU may
        not spawn (``-sandbox spawn=deny``) and cannot see the snapshot directory."""
        qmp = await self.monitor()
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await qmp.execute("migrate-set-capabilities", IGNORE_SHARED)
            await qmp.send_fd(STATE_FD, fd)
            await qmp.execute("migrate", {"uri": f"fd:{STATE_FD}"})
            while True:
                info = await qmp.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    raise SandboxStartFailed(f"saving the snapshot failed: {info.get('error-desc', status)}")
                await asyncio.sleep(0.01)
        finally:
            os.close(fd)

    async def restore(self, state: Path, timeout: float) -> None:
        """Load a state saved by :meth:`save` into this machine (started ``incoming``, its RAM
        mapping the template's) and wait until it runs.  QEMU reads the state from a
        descriptor the server opened read-only."""
        qmp = await self.wait_for(asyncio.ensure_future(self.monitor()), timeout, "reach the QEMU monitor")
        resumed = qmp.event("RESUME")
        fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await qmp.execute("migrate-set-capabilities", IGNORE_SHARED)
            await qmp.send_fd(STATE_FD, fd)
            await qmp.execute("migrate-incoming", {"uri": f"fd:{STATE_FD}"})
        except (QmpError, TimeoutError) as exc:
            detail = self.describe_exit() if self.exited.done() else str(exc) or type(exc).__name__
            raise SandboxStartFailed(f"could not restore the snapshot: {detail}", self.tail()) from exc
        finally:
            os.close(fd)
        await self.wait_for(resumed, timeout, "restore the snapshot")

    def describe_exit(self) -> str:
        """Why QEMU ended, from its console and error output."""
        text = self.diagnostics.peek()
        for marker in EXIT_MARKERS:
            pos = text.rfind(marker)
            if pos >= 0:
                return text[pos:].splitlines()[0].strip()[:300]
        status = self.exited.result() if self.exited.done() else None
        return f"the VM stopped (QEMU exit status {status})"

    def killed_by(self) -> signal.Signals | None:
        """The signal of ``KILL_SIGNALS`` QEMU (or its jail) was killed with from outside (None:
        it runs, ended otherwise, or the server killed it).  A guest cannot signal its QEMU:
        such a death is the host's doing, never the function's."""
        if self._killing or not self.exited.done() or self.exited.cancelled():
            return None
        return kill_signal(self.exited.result(), wrapper=True)  # the jail's bwrap: 128 + signal

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.diagnostics.peek().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL QEMU now; :meth:`stop` still frees the rest."""
        self._killing = True
        _kill_group(self.proc.pid)

    async def stop(self) -> None:
        """Kill QEMU and free everything (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self.kill()
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
