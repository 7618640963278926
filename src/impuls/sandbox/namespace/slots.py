"""The server's end of the template-built, not yet assigned instances ("slots") of the
namespace sandbox (:mod:`.zygote` is the other end)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import select
import signal
import socket
import struct
from pathlib import Path

from impuls.errors import SandboxStartFailed
from impuls.sandbox.base import OutputCapture
from impuls.sandbox.namespace import cgroups
from impuls.sandbox.namespace.launch import LaunchFailed, close_fds
from impuls.sandbox.watch import OutputPump

log = logging.getLogger("impuls.sandbox.namespace.slots")

_CREDS = struct.calcsize("3i")
_SYS_OPEN_TREE = 428
_OPEN_TREE_CLONE = 1
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)
#: what sending to a slot whose processes are gone fails with
_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOTCONN})


class SlotGone(LaunchFailed):
    """The slot died (it, or its template, was killed) before it could take the function:
    nothing of the function ran, and another slot may take it."""


def detached_mount(path: Path) -> int:
    """A detached bind mount of ``path`` (``open_tree(OPEN_TREE_CLONE)``), as an fd.

    Made by the server (root), so a directory below a 0700 parent works: the
    sandbox attaches the mount and never resolves the host path itself.
    """
    fd = _libc.syscall(ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(_AT_FDCWD), os.fsencode(path),
                       ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise LaunchFailed(f"cannot clone a mount of {path}: {os.strerror(err)}")
    return int(fd)


class SlotControl:
    """The server's end of one slot's control socket; once the slot is assigned, the
    :class:`~impuls.sandbox.namespace.launch.LaunchedRuntime` of its instance.

    The socket (``SOCK_SEQPACKET``, ``SO_PASSCRED`` on our end) carries, from
    the slot: ``pid``, ``ready``, ``assigned``, later ``exit <status>``, and
    ``error <text>`` when a step fails (see ``_on_control``); from us: ``go``,
    then the assignment (``send_assignment``).  End-of-file means every
    process of the slot is gone.
    """

    def __init__(self, ctl: socket.socket, cgroup: cgroups.Cgroup) -> None:
        self.loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.exited: asyncio.Future[int] = self.loop.create_future()
        self.cgroup = cgroup
        self.error = ""
        self._cgroup_error = ""
        self._status: int | None = None
        self._pump: OutputPump | None = None
        self._took_it = False
        self._pidfd = -1
        #: a pidfd of the process waiting to become the runtime, until the assignment
        self._waiting_pidfd = -1
        self._ctl: socket.socket | None = ctl
        ctl.setblocking(False)
        self.loop.add_reader(ctl.fileno(), self._on_control)

    # --- the LaunchedRuntime interface -------------------------------------------------

    @property
    def lost(self) -> bool:
        return self.exited.done() and not self._took_it

    def output_to(self, capture: OutputCapture) -> None:
        if self._pump is not None:
            self._pump.capture = capture

    def drain(self) -> None:
        if self._pump is not None:
            self._pump.drain()

    def kill(self) -> bool:
        """SIGKILL the instance's pid 1: the kernel then kills its whole pid namespace
        (``Cgroup.remove`` still sweeps the cgroup afterwards)."""
        if self._pidfd < 0:
            return False
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except OSError:
            return False
        return True

    async def wait_closed(self) -> None:
        await self.exited
        self.drain()
        self.close()

    def close(self) -> None:
        self._close_control()
        if self._pump is not None:
            self._pump.close()
        close_fds(self._pidfd, self._waiting_pidfd)
        self._pidfd = self._waiting_pidfd = -1

    @property
    def runtime_waiting(self) -> bool:
        """The slot's process that is to run the function is still there.  It dies only
        when killed (by the host, by a pattern that matches the template's command line,
        which it still shows); a slot without it would fail once assigned.  True when
        unknown."""
        return self._waiting_pidfd < 0 or not _exited(self._waiting_pidfd)

    # --- assignment --------------------------------------------------------------------

    def send_assignment(self, request: bytes, fds: list[int], output_fd: int) -> None:
        """Send the assignment: JSON and four descriptors (code, socket, output pipe, /tmp;
        a version template's fork channel fifth; a slot whose runtime started ahead of time:
        code, socket, /tmp), and read the instance's output from ``output_fd``."""
        if self._ctl is None or self.exited.done():
            raise SlotGone(f"the sandbox slot is gone{': ' + self.error if self.error else ''}")
        if not self.runtime_waiting:
            raise SlotGone("the sandbox slot's runtime process was killed")
        close_fds(self._waiting_pidfd)
        self._waiting_pidfd = -1
        try:
            self._ctl.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           struct.pack(f"{len(fds)}i", *fds))])
        except OSError as exc:
            if exc.errno in _GONE:
                raise SlotGone(f"the sandbox slot is gone: {exc}") from exc
            raise LaunchFailed(f"cannot hand the function to its sandbox: {exc}") from exc
        self._pump = OutputPump(self.loop, output_fd)

    def read_output(self, output_fd: int) -> None:
        """Capture the instance's output from ``output_fd`` (a forked instance's: it
        gets no assignment)."""
        self._pump = OutputPump(self.loop, output_fd)

    # --- control messages ----------------------------------------------------------------

    def _on_control(self) -> None:
        while self._ctl is not None:
            try:
                msg, ancdata, _, _ = self._ctl.recvmsg(4096, socket.CMSG_SPACE(_CREDS))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.error = self.error or str(exc)
                msg, ancdata = b"", []
            if not msg:  # end-of-file: every process of the slot is gone
                self._close_control()
                return
            if msg == b"pid":  # with SCM_CREDENTIALS: the host pid to move into the cgroup
                self.loop.create_task(self._join_cgroup(_sender(ancdata)))
            elif msg == b"ready":  # with the credentials of the instance's pid 1
                self._on_ready(_sender(ancdata))
            elif msg == b"assigned":  # it has the function
                self._took_it = True
            elif msg.startswith(b"exit "):
                with contextlib.suppress(ValueError):
                    self._status = int(msg[5:])
            elif msg.startswith(b"error "):
                self.error = msg[6:].decode("utf-8", "replace")
                log.debug("slot %s: %s", self.cgroup.name, self.error)

    def _on_ready(self, pid: int | None) -> None:
        # Keep a pidfd of the instance's pid 1: killing it ends the whole pid namespace at once;
        # and one of its only child, the future runtime, to know that it is still there.
        if pid is not None and self._pidfd < 0:
            with contextlib.suppress(OSError):
                self._pidfd = os.pidfd_open(pid)
            if self._pidfd >= 0:
                self._waiting_pidfd = _child_pidfd(pid)
        if not self.ready.done():
            self.ready.set_result(None)

    async def _join_cgroup(self, pid: int | None) -> None:
        try:
            if pid is None:
                raise LaunchFailed("the template child sent no credentials")
            # In a worker thread: a cgroup move can wait for an RCU grace period.
            await asyncio.to_thread(self.cgroup.add_pid, pid)
            if self._ctl is not None:
                self._ctl.send(b"go")
        except (OSError, SandboxStartFailed) as exc:
            # The child may have died with a reason of its own, still queued:
            # stop it, and let end-of-file report both.
            self._cgroup_error = f"cannot put the sandbox in its cgroup: {exc}"
            if self._ctl is not None:
                with contextlib.suppress(OSError):
                    self._ctl.shutdown(socket.SHUT_WR)

    def _close_control(self) -> None:
        if self._ctl is not None:
            self.loop.remove_reader(self._ctl.fileno())
            self._ctl.close()
            self._ctl = None
        if not self.ready.done():
            reasons = "; ".join(r for r in (self.error, self._cgroup_error) if r)
            self.ready.set_exception(LaunchFailed(
                f"the sandbox could not be built: {reasons or 'its builder exited'}"))
            self.ready.exception()  # retrieved: nobody may be waiting any more
        if not self.exited.done():
            self.exited.set_result(self._status if self._status is not None else -9)


def _exited(pidfd: int) -> bool:
    """The process of ``pidfd`` has exited (checked now)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _child_pidfd(pid: int) -> int:
    """A pidfd of the only child of ``pid`` (-1 if there is not exactly one)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(child) for child in f.read().split()]
        if len(children) != 1:
            return -1
        pidfd = os.pidfd_open(children[0])
    except (OSError, ValueError):
        return -1
    try:  # still its child (a pid is reused only once its process was reaped)
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            if str(children[0]) in f.read().split():
                return pidfd
    except OSError:
        pass
    os.close(pidfd)
    return -1


def _sender(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The host pid in an ``SCM_CREDENTIALS`` message (the kernel translated it)."""
    return next((struct.unpack("3i", data[:_CREDS])[0] for level, kind, data in ancdata
                 if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)


class Slot:
    """An empty instance prepared ahead of time by the template process: namespaces
    made, ``/proc`` mounted, a process waiting -- in a cgroup of its own, but bound to
    no function yet.  ``assign`` turns it into an instance of one function in
    microseconds.  ``origin`` is whatever made it (the template process it was forked
    from): a slot of a replaced template is never assigned."""

    def __init__(self, cgroup: cgroups.Cgroup, control: SlotControl, origin: object = None,
                 output_fd: int = -1) -> None:
        self.cgroup = cgroup
        self.control = control
        self.origin = origin
        #: a slot whose runtime was started ahead of time: the read end of its output pipe
        #: (its runtime has had the write end since it started)
        self.output_fd = output_fd

    @property
    def usable(self) -> bool:
        return self.control.ready.done() and not self.control.ready.exception() and \
            not self.control.exited.done() and self.control.runtime_waiting

    def assign(self, request: bytes, code_dir: Path, socket_path: Path, memory_mb: int,
               cpu_weight: int, tmp_fd: int, channel: int | None = None) -> None:
        """Bind the slot to one instance: limits, code, Runtime API socket, output pipe,
        ``/tmp`` (a detached mount, closed here) (and, for a version template, the
        ``channel`` its fork requests come on); a slot whose runtime was started ahead of
        time gets no output pipe: it has one.  Raises ``LaunchFailed``, never ``OSError``."""
        code_fd = sock_fd = out_r = out_w = -1
        try:
            self.cgroup.set_limits(memory_mb, cpu_weight)
            code_fd = detached_mount(code_dir)
            sock_fd = detached_mount(socket_path)
            if self.output_fd >= 0:
                out_r, self.output_fd = self.output_fd, -1
                fds = [code_fd, sock_fd, tmp_fd]
            else:
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                fds = [code_fd, sock_fd, out_w, tmp_fd, *([] if channel is None else [channel])]
            self.control.send_assignment(request, fds, out_r)
        except OSError as exc:
            close_fds(out_r)
            raise LaunchFailed(f"cannot prepare the sandbox: {exc}") from exc
        except SandboxStartFailed:
            close_fds(out_r)
            raise
        finally:
            close_fds(code_fd, sock_fd, out_w, tmp_fd)

    async def discard(self) -> None:
        """Give the slot up (idempotent): closing the socket makes an unassigned slot
        exit by itself, and its cgroup is removed."""
        self.control.close()
        close_fds(self.output_fd)
        self.output_fd = -1
        try:
            await asyncio.to_thread(self.cgroup.remove)
        except cgroups.CgroupError as exc:
            log.warning("slot cgroup: %s (left for reap_orphans)", exc)
