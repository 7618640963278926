"""Impuls guest agent: PID 1 inside every microVM (copied to /opt/impuls/agent.py in the rootfs).

It starts the function's runtime, sandboxed, and carries the runtime's Runtime
API connections, its output and control messages over the VM's one link to the
host (see :mod:`impuls.runtimes.guest.protocol`).  Standard library only.
"""

from __future__ import annotations

# A snapshot is taken right after `hello` (see `main`): everything imported and
# done before it is shared by every clone.  So nothing imported here, or before
# the snapshot, may seed a user-visible random generator (no `random`, `ssl`,
# `hashlib`, `uuid`, `tempfile`); the one shared value left is CPython's
# string-hash secret of the pre-started interpreter, as in any pre-forking server.
import contextlib
import ctypes
import errno
import fcntl
import functools
import gc
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

try:  # on the host (tests, type checking)
    from impuls.runtimes.guest import protocol
except ImportError:  # in the guest: /opt/impuls/protocol.py, next to this script (sys.path[0])
    import protocol  # type: ignore[no-redef]

    # The pre-started Python runtime (a fork of this process) imports the function's modules:
    # a `protocol` of the function's own must not resolve to this one.
    del sys.modules["protocol"]

# --- guest layout (the agent's own; what the host shares is in protocol) ---------

PYCACHE_ROOT = protocol.CODE_ROOT + "/pycache"
TMP_DEVICE = "/dev/vdc"  # the instance's /tmp disk: an ext4 of its ephemeral_storage_mb (sandbox/scratch)
CGROUP_ROOT = "/sys/fs/cgroup"
FUNCTION_CGROUP = CGROUP_ROOT + "/function"
CODE_DEVICE = "/dev/vdb1"  # the code disk's partition (see impuls.sandbox.microvm.codedisk)
MAX_PROCESSES = 256  # tasks of the sandbox user (threads count), as the namespace sandbox
MAX_FILES = 1024
# The function's memory limit leaves the guest this much above the kernel's low watermarks
# (see FunctionCgroup.limit_memory).  Measured in a 128 MB VM under TCG: with 4 MB a Python
# function completes a 40 MB allocation (not 42 MB) and a bomb of small objects ends in
# 0.8 s; with 2 MB, 42 MB and 1.5 s; without a limit 44 MB, and that bomb never ends.
MEMORY_MARGIN_KB = 4096
# PYTHON* variables a pre-started interpreter can honour; any other one makes
# the agent exec a fresh interpreter instead of forking the zygote.
ZYGOTE_PYTHON_VARS = {"PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}


# --- kernel interfaces ----------------------------------------------------------

RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_NOATIME = 1, 2, 4, 8, 32, 1024
F_SETPIPE_SZ = 1031
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 38, 24

@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
    if _libc().mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                   data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _drop_privileges() -> None:
    """Empty the capability bounding set and set no_new_privs (call as root, before setuid):
    the setuid binaries of the rootfs (mount, su) then grant nothing."""
    libc = _libc()
    with open("/proc/sys/kernel/cap_last_cap") as fh:
        last = int(fh.read())
    for cap in range(last + 1):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap})")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def reseed(entropy: bytes) -> None:
    """Mix host entropy into the input pool and force a CRNG reseed (unique per clone)."""
    fd = os.open("/dev/urandom", os.O_WRONLY)
    try:
        info = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def oom_kills() -> int:
    with open("/proc/vmstat", "rb") as fh:
        for line in fh:
            if line.startswith(b"oom_kill "):
                return int(line.split()[1])
    return 0


def find_port(name: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            for entry in os.listdir("/sys/class/virtio-ports"):
                with open(f"/sys/class/virtio-ports/{entry}/name") as fh:
                    if fh.read().strip() == name:
                        return "/dev/" + entry
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"virtio-serial port {name!r} not found")
        time.sleep(0.01)


def meminfo() -> dict[str, int]:
    """/proc/meminfo in kB."""
    info: dict[str, int] = {}
    with open("/proc/meminfo", "rb") as fh:
        for line in fh:
            name, _, rest = line.partition(b":")
            fields = rest.split()
            if fields:
                info[name.decode()] = int(fields[0])
    return info


def low_watermarks_kb() -> int:
    """The sum of the memory zones' low watermarks: with less free, kswapd starts reclaiming."""
    pages = 0
    with open("/proc/zoneinfo", "rb") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) == 2 and fields[0] == b"low":
                pages += int(fields[1])
    return pages * (os.sysconf("SC_PAGE_SIZE") // 1024)


class FunctionCgroup:
    """The runtime's cgroup (v2), which holds every process of the function from before its
    first instruction: a task limit, a memory limit, and frozen while it waits for its next
    event, as Lambda freezes its environments between invocations — stray background
    processes and threads cost no CPU (under emulation, a spinning one would burn a host core).

    The memory limit (``limit_memory``, at ``load``) is what makes a memory bomb end at once.
    Without it, the function's memory grows until the *whole guest* is short of it, and global
    reclaim then evicts the page cache the interpreter and the agent execute from (the rootfs'
    python3 and libraries) instead of declaring OOM: each evicted page is read back from the
    virtio disk at the next instruction there, reclaim keeps "making progress", and the guest
    thrashes (a bomb of small objects in a 128 MB VM under TCG: ~45 MB/s re-read from the
    rootfs, and no OOM kill within 300 s).  With ``memory.max`` a few MB below what the guest
    can give, the function is stopped about where that would begin: in its cgroup there is
    little to reclaim but its own memory, so the memory cgroup's OOM killer ends it at once
    (/tmp is a disk: its page cache, charged to the function too, is written back and
    reclaimed).  ``memory.oom.group``
    makes that kill take every process of the function: a child eating the memory takes the
    runtime with it, so the call ends instead of running into its timeout.  No swap.
    """

    def __init__(self, pid: int) -> None:
        self.fd = -1
        self.frozen = False
        self.memory = False
        if not pid:
            return
        try:
            _mount("cgroup2", CGROUP_ROOT, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                print(f"impuls-agent: no cgroup2, the runtime is never frozen: {exc}", file=sys.stderr)
                return
        with open(CGROUP_ROOT + "/cgroup.subtree_control", "w") as fh:
            fh.write("+pids")
        try:
            with open(CGROUP_ROOT + "/cgroup.subtree_control", "w") as fh:
                fh.write("+memory")
            self.memory = True
        except OSError as exc:
            print(f"impuls-agent: no memory controller, the function has no memory limit: {exc}",
                  file=sys.stderr)
        os.makedirs(FUNCTION_CGROUP, exist_ok=True)
        settings: list[tuple[str, int]] = [("pids.max", MAX_PROCESSES)]
        if self.memory:  # memory.max comes at `load` (limit_memory)
            settings.append(("memory.oom.group", 1))
            if os.path.exists(FUNCTION_CGROUP + "/memory.swap.max"):  # the guest has no swap anyway
                settings.append(("memory.swap.max", 0))
        for name, value in (*settings, ("cgroup.procs", pid)):
            with open(f"{FUNCTION_CGROUP}/{name}", "w") as fh:
                fh.write(str(value))
        self.fd = os.open(FUNCTION_CGROUP + "/cgroup.freeze", os.O_WRONLY | os.O_CLOEXEC)

    def limit_memory(self) -> int:
        """Set ``memory.max`` to what the function holds now plus what the guest can give it:
        its free memory and page cache, less the kernel's low watermarks (below them kswapd
        starts reclaiming) and MEMORY_MARGIN_KB; returns the limit in bytes (0: no memory
        controller).  Called at ``load``: what the guest can give is known only after the
        restore, before any of the function's code runs.

        The function reaches its limit about when the page cache is used up, that is where
        the guest would start evicting the code it runs from, and is killed there.  Limits
        that also spared the page cache mapped by running programs (the interpreter's code)
        ended bombs faster, but took ~4 MB more from a 128 MB function, and an exec'd
        runtime whose own code is charged to its cgroup (Node.js) then started at its limit
        and thrashed within it for 30 s and more (memory cgroup reclaim evicts that code too).
        """
        if not self.memory:
            return 0
        with open(FUNCTION_CGROUP + "/memory.current") as fh:
            current = int(fh.read())
        info = meminfo()
        free = info.get("MemFree", 0)
        cache = info.get("Active(file)", 0) + info.get("Inactive(file)", 0)
        room = max(free + cache - low_watermarks_kb() - MEMORY_MARGIN_KB, free // 2)
        limit = (current + room * 1024) // 4096 * 4096
        with open(FUNCTION_CGROUP + "/memory.max", "w") as fh:
            fh.write(str(limit))
        return limit

    def oom_killed(self) -> bool:
        """True once the memory cgroup's OOM killer has killed in the function."""
        if not self.memory:
            return False
        try:
            with open(FUNCTION_CGROUP + "/memory.events", "rb") as fh:
                for line in fh:
                    if line.startswith(b"oom_kill "):
                        return int(line.split()[1]) > 0
        except OSError:
            pass
        return False

    def freeze(self) -> None:
        if not self.frozen and self.fd >= 0:
            os.pwrite(self.fd, b"1", 0)
            self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            os.pwrite(self.fd, b"0", 0)
            self.frozen = False


# --- the agent ------------------------------------------------------------------


#: what a runtime sends when it waits for its next event (alone, or after its response)
NEXT_REQUEST = b"/invocation/next "


class Conn:
    __slots__ = ("chan", "out", "sock", "tail")

    def __init__(self, sock: socket.socket, chan: int) -> None:
        self.sock = sock
        self.chan = chan
        self.out = bytearray()
        self.tail = b""  # the end of what it sent last (a request may span two reads)

    def waits_for_next(self, data: bytes) -> bool:
        """Whether ``data`` ends the runtime's ``GET .../invocation/next`` (a GET has no body,
        so it is the last thing the runtime sent; the Python client sends it right after its
        response)."""
        window = (self.tail + data[-256:])[-256:]  # not a copy of the whole read
        self.tail = window
        start = window.rfind(b"GET ")
        return start >= 0 and window.endswith(b"\r\n\r\n") and NEXT_REQUEST in window[start:]


class Agent:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.runtime = str(config.get("runtime", "python"))
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.port = os.open(find_port(protocol.PORT_NAME), os.O_RDWR | os.O_CLOEXEC)
        self.reader = protocol.FrameReader()
        self.conns: dict[int, Conn] = {}
        self.next_chan = 1
        self.log_fd = -1
        self.child = 0
        self.orders = -1
        self.loaded_at = 0.0
        self.oom_base = 0
        self.zygote: Any = None
        self.cgroup = FunctionCgroup(0)
        self.listeners: list[socket.socket] = []
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = wake_r
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frm: None)
        self._watch(wake_r, self._on_signal)
        self._watch(self.port, self._on_port)

    # plumbing

    def _watch(self, fd: int, handler: Callable[[int], None], events: int = select.EPOLLIN) -> None:
        self.handlers[fd] = handler
        self.ep.register(fd, events)

    def _unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.ep.unregister(fd)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.port, view)
            except InterruptedError:
                continue
            view = view[written:]

    def ctl(self, message: dict[str, Any]) -> None:
        self.send(protocol.control(message))

    # start-up (before the snapshot)

    def listen(self) -> None:
        os.makedirs(os.path.dirname(protocol.API_SOCKET), exist_ok=True)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(protocol.API_SOCKET)
        os.chmod(protocol.API_SOCKET, 0o666)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            loopback_up()
            tcp.bind(("127.0.0.1", protocol.API_TCP_PORT))
        except OSError as exc:
            print(f"impuls-agent: no TCP Runtime API endpoint: {exc}", file=sys.stderr)
            tcp.close()
            tcp = None  # type: ignore[assignment]
        for sock in (unix, tcp):
            if sock is None:
                continue
            sock.listen(16)
            sock.setblocking(False)
            self.listeners.append(sock)
            self._watch(sock.fileno(), functools.partial(self._on_accept, sock))

    def prepare(self) -> None:
        """Everything clones share: the runtime client preloaded (Python) and a runtime
        process forked, unprivileged, with its output pipe, waiting for its orders.

        The runtime process drops to the sandbox user at once (no capabilities, empty
        bounding set, no_new_privs, process and file limits) and waits on a pipe, so a
        restore pays for neither fork nor set-up.  For Python it is a zygote: the runtime
        client is already imported and its ``main()`` runs in place (saving the interpreter
        start-up, hundreds of ms under TCG), loading the host-compiled pycs for /var/task
        (see :mod:`impuls.sandbox.microvm.codedisk`).
        Node.js, and packages that bring their own ``bootstrap``, are exec'd after the
        reseed (see ``load``): a node process started before the snapshot would carry one
        V8 ``Math.random`` state and one OpenSSL DRBG into every clone.
        """
        # As in a memory cgroup, over-use ends in the OOM killer, not ENOMEM; an NMI from the
        # host (QMP inject-nmi) panics the guest: a deliberate crash, used to test that path;
        # no user namespaces for the function (Debian's switch): less guest kernel to attack.
        for knob, value in (("vm/overcommit_memory", "1"), ("kernel/unknown_nmi_panic", "1"),
                            ("kernel/panic_on_unrecovered_nmi", "1"),
                            ("kernel/unprivileged_userns_clone", "0")):
            with contextlib.suppress(FileNotFoundError), open(f"/proc/sys/{knob}", "w") as fh:
                fh.write(value)
        if self.runtime == "python":
            import importlib.util

            spec = importlib.util.spec_from_file_location("_impuls_runtime", protocol.PYTHON_CLIENT)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self.zygote = module
            _install_pyc_loader()
        gc.collect()
        gc.freeze()
        orders_r, orders_w = os.pipe2(os.O_CLOEXEC)
        log_r, log_w = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(log_r, F_SETPIPE_SZ, 1 << 20)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._child(orders_r, log_w)
        os.close(orders_r)
        os.close(log_w)
        os.set_blocking(log_r, False)
        self.child = pid
        self.orders = orders_w
        self.log_fd = log_r
        self.oom_base = oom_kills()
        self.cgroup = FunctionCgroup(pid)
        self._watch(log_r, self._on_logs)

    # events

    def _on_signal(self, _events: int) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child:
                self.child = 0
                self._runtime_exited(status)

    def _runtime_exited(self, status: int) -> None:
        self.drain_logs()
        code = os.waitstatus_to_exitcode(status)
        oom = code == -signal.SIGKILL and (self.cgroup.oom_killed() or oom_kills() > self.oom_base)
        self.ctl({"op": "exit", "status": code, "oom": oom})

    def _on_port(self, events: int) -> None:
        try:
            data = os.read(self.port, 65536)
        except BlockingIOError:
            return
        if not data:  # the host side is not connected (yet): poll again shortly
            time.sleep(0.01)
            return
        for kind, chan, payload in self.reader.feed(data):
            if kind == protocol.DATA:
                conn = self.conns.get(chan)
                if conn is not None:
                    self.cgroup.thaw()  # an event (or any answer) for the runtime: it runs again
                    self._write(conn, payload)
            elif kind == protocol.CLOSE:
                conn = self.conns.get(chan)
                if conn is not None:
                    self._close(conn, notify=False)
            elif kind == protocol.CTL:
                self._on_control(json.loads(payload))

    def _on_accept(self, listener: socket.socket, _events: int) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        chan = self.next_chan
        self.next_chan = chan % 65535 + 1
        conn = Conn(sock, chan)
        self.conns[chan] = conn
        self._watch(sock.fileno(), functools.partial(self._on_conn, conn))
        self.send(protocol.frame(protocol.OPEN, chan))

    def _on_conn(self, conn: Conn, events: int) -> None:
        if events & select.EPOLLOUT:
            self._flush(conn)
            if conn.chan not in self.conns:  # closed while flushing
                return
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            try:
                data = conn.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            self.drain_logs()  # output written before this request goes first
            if data:
                self.send(b"".join(protocol.frames(protocol.DATA, conn.chan, data)))
                if conn.waits_for_next(data):
                    self.cgroup.freeze()  # waiting for its next event: frozen until it comes
                if self.loaded_at:  # the runtime's first request: tell the host how long init took
                    self.ctl({"op": "first-request", "ms": (time.perf_counter() - self.loaded_at) * 1000})
                    self.loaded_at = 0.0
            else:
                self._close(conn, notify=True)

    def _write(self, conn: Conn, data: bytes) -> None:
        if conn.out:
            conn.out += data
            return
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn, notify=True)
            return
        if sent < len(data):
            conn.out += data[sent:]
            self.ep.modify(conn.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def _flush(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn, notify=True)
            return
        del conn.out[:sent]
        if not conn.out:
            self.ep.modify(conn.sock.fileno(), select.EPOLLIN)

    def _close(self, conn: Conn, notify: bool) -> None:
        fd = conn.sock.fileno()
        self._unwatch(fd)
        self.conns.pop(conn.chan, None)
        conn.sock.close()
        if notify:
            self.send(protocol.frame(protocol.CLOSE, conn.chan))

    def _on_logs(self, _events: int) -> None:
        self.drain_logs()

    def drain_logs(self) -> None:
        """Empty the output pipe and send what it held; of a flood only the last LOG_TAIL bytes
        cross the (slow) serial link, the rest is counted in a LOGDROP frame, so a chatty
        function is not slowed to the link's speed (the host keeps only a tail anyway)."""
        fd = self.log_fd
        buf = bytearray()
        dropped = 0
        while fd >= 0:
            try:
                data = os.read(fd, 262144)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if not data:  # every writer is gone
                self._unwatch(fd)
                os.close(fd)
                self.log_fd = fd = -1
                break
            buf += data
            if len(buf) > 2 * protocol.LOG_TAIL:
                cut = len(buf) - protocol.LOG_TAIL
                del buf[:cut]
                dropped += cut
        if dropped:
            self.send(protocol.frame(protocol.LOGDROP, 0, str(dropped).encode()))
        if buf:
            self.send(b"".join(protocol.frames(protocol.LOG, 0, bytes(buf))))

    # control messages

    def _on_control(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "load":
            try:
                pid, steps = self.load(message)
            except Exception as exc:  # reported to the host, which fails the start
                self.ctl({"op": "load-failed", "error": f"{type(exc).__name__}: {exc}"})
            else:
                self.ctl({"op": "loaded", "pid": pid, "steps": steps})
        elif op == "ping":  # also the host's clock probe: it compares "now" with its own clock
            self.ctl({"op": "pong", "t": message.get("t"), "now": time.time_ns()})
        elif op == "clock-step":
            time.clock_settime_ns(time.CLOCK_REALTIME, time.time_ns() + int(message["delta_ns"]))

    def load(self, message: dict[str, Any]) -> tuple[int, dict[str, float]]:
        """Make this VM the function's: clock, entropy, code, /tmp, then start the runtime.

        Everything unique to a clone happens here, after the restore: the wall clock is set
        from the host's (then refined by one ``ping`` exchange), the kernel CRNG gets fresh
        host entropy and is forced to reseed, and only then does the runtime run.
        Returns the runtime's pid and how long each step took (ms, for the host's timings).
        """
        if self.orders < 0:
            raise RuntimeError("the runtime was started already")
        if not self.child:
            raise RuntimeError("the runtime process is gone")
        steps: dict[str, float] = {}
        clock = time.perf_counter
        t = clock()
        time.clock_settime_ns(time.CLOCK_REALTIME, int(message["time_ns"]))
        reseed(bytes.fromhex(message["seed"]))
        steps["clock+reseed"], t = (clock() - t) * 1000, clock()
        code_fs = str(message.get("code_fs", "romfs"))
        if code_fs != "romfs":  # a romfs code disk was mounted at boot (see sandbox/microvm/codedisk)
            _mount(CODE_DEVICE, protocol.TASK_ROOT, code_fs, MS_RDONLY | MS_NOSUID | MS_NODEV)
            steps["code"], t = (clock() - t) * 1000, clock()
        # over the small tmpfs init.sh mounted (nothing wrote to it): a template's disk is blank
        _mount(TMP_DEVICE, protocol.TMP_DIR, "ext4", MS_NOSUID | MS_NODEV | MS_NOATIME)
        steps["tmp"], t = (clock() - t) * 1000, clock()
        self.cgroup.limit_memory()  # now: what the guest can give is known only after the restore
        steps["memory"], t = (clock() - t) * 1000, clock()
        env = {str(k): str(v) for k, v in message["env"].items()}
        zygote = (bool(message.get("zygote")) and self.zygote is not None
                  and not any(k.startswith("PYTHON") and k not in ZYGOTE_PYTHON_VARS for k in env))
        orders = json.dumps({"env": env, "argv": list(message["argv"]), "zygote": zygote}).encode()
        try:
            while orders:
                orders = orders[os.write(self.orders, orders):]
        finally:
            os.close(self.orders)
            self.orders = -1
        steps["start"] = (clock() - t) * 1000
        self.loaded_at = clock()
        return self.child, steps

    def _child(self, orders_fd: int, log_fd: int) -> None:
        """In the forked child: become the sandboxed runtime.  Never returns.

        Drops to the sandbox user at once (before the snapshot), then waits
        for its orders (environment, zygote or exec), written by ``load``.
        """
        code = 1
        try:
            os.setsid()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            null = os.open("/dev/null", os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.dup2(orders_fd, 3)
            os.closerange(4, 65536)
            for limit, value in ((resource.RLIMIT_NPROC, MAX_PROCESSES), (resource.RLIMIT_NOFILE, MAX_FILES),
                                 (resource.RLIMIT_CORE, 0)):
                resource.setrlimit(limit, (value, value))
            _drop_privileges()
            os.setgroups([])
            os.setgid(protocol.SANDBOX_GID)
            os.setuid(protocol.SANDBOX_UID)
            os.umask(0o022)
            chunks = []
            while chunk := os.read(3, 65536):
                chunks.append(chunk)
            os.close(3)
            if not chunks:  # the agent is gone
                os._exit(0)
            orders = json.loads(b"".join(chunks))
            env: dict[str, str] = orders["env"]
            os.chdir(protocol.TASK_ROOT)
            if not orders["zygote"]:
                argv: list[str] = orders["argv"]
                os.execve(argv[0], argv, env)
            os.environ.clear()
            os.environ.update(env)
            sys.argv = [protocol.PYTHON_CLIENT]
            if env.get("PYTHONDONTWRITEBYTECODE"):
                sys.dont_write_bytecode = True
            if env.get("PYTHONUNBUFFERED"):
                for stream in (sys.stdout, sys.stderr):
                    stream.reconfigure(write_through=True)  # type: ignore[union-attr]
            extra = [p for p in env.get("PYTHONPATH", "").split(":") if p]
            main = self.zygote.main
            if extra:
                real_main = main

                def main() -> None:  # bootstrap puts the task root first; PYTHONPATH follows it
                    sys.path[1:1] = extra
                    real_main()

            gc.unfreeze()
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

    # main loop

    def run(self) -> None:
        poll = self.ep.poll
        handlers = self.handlers
        while True:
            try:
                events = poll()
            except InterruptedError:
                continue
            for fd, mask in events:
                handler = handlers.get(fd)
                if handler is not None:
                    handler(mask)


def _install_pyc_loader() -> None:
    """Modules under TASK_ROOT load the host-compiled pycs of the code disk when present
    (see impuls.sandbox.microvm.codedisk); anything else imports as usual."""
    import importlib.machinery as machinery
    import importlib.util
    import marshal

    prefix = protocol.TASK_ROOT + "/"
    tag = sys.implementation.cache_tag
    magic = importlib.util.MAGIC_NUMBER

    class PrecompiledLoader(machinery.SourceFileLoader):
        def get_code(self, fullname: str) -> Any:
            path = self.get_filename(fullname)
            if path.startswith(prefix) and path.endswith(".py"):
                try:
                    with open(f"{PYCACHE_ROOT}/{path[len(prefix):-3]}.{tag}.pyc", "rb") as fh:
                        data = fh.read()
                except OSError:
                    pass
                else:
                    if data[:4] == magic and data[4:8] == b"\x01\x00\x00\x00":  # unchecked hash
                        return marshal.loads(memoryview(data)[16:])
            return super().get_code(fullname)

    finder = machinery.FileFinder.path_hook(
        (machinery.ExtensionFileLoader, machinery.EXTENSION_SUFFIXES),
        (PrecompiledLoader, machinery.SOURCE_SUFFIXES),
        (machinery.SourcelessFileLoader, machinery.BYTECODE_SUFFIXES))

    def hook(path: str) -> Any:
        if path == protocol.TASK_ROOT or path.startswith(prefix):
            return finder(path)
        raise ImportError("not under the task root")

    sys.path_hooks.insert(0, hook)
    sys.path_importer_cache.clear()


def _uptime() -> float:
    with open("/proc/uptime") as fh:
        return float(fh.read().split()[0])


def main() -> None:
    try:
        with open(protocol.CONFIG_PATH) as fh:
            config = json.load(fh)
    except OSError:
        config = {}
    agent = Agent(config)
    agent.listen()
    agent.prepare()
    # a snapshot template is saved right after this: until the host's `load`, the agent is every clone
    agent.ctl({"op": "hello", "runtime": agent.runtime, "uptime": _uptime(),
               "python": sys.version.split()[0]})
    agent.run()


if __name__ == "__main__":
    try:
        main()
    except BaseException as exc:  # PID 1 ending panics the kernel: the host sees the VM exit
        import traceback

        traceback.print_exc()
        print(f"impuls-agent: fatal: {exc!r}", file=sys.stderr, flush=True)
        raise
