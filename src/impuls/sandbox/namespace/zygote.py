"""The template ("zygote") process of the ``namespace`` sandbox: runs INSIDE a sandbox
and forks instances on the server's request (see docs/sandboxes.md).  Standard library
only: Impuls's own packages are not in the sandbox."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import importlib
import json
import os
import resource
import selectors
import signal
import socket
import stat
import struct
import sys
import time
from typing import Any

RUNTIME_DIR = "/var/runtime"
TASK_DIR = "/var/task"
SOCKET_PATH = "/run/impuls/runtime.sock"
SECCOMP_FILE = RUNTIME_DIR + "/seccomp.bpf"
#: the filter of a version template: SECCOMP_FILE's but for unshare with a new user
#: namespace and mounting (impuls.sandbox.namespace.seccomp.TEMPLATE_ALLOWED_SYSCALLS)
TEMPLATE_SECCOMP_FILE = RUNTIME_DIR + "/seccomp-template.bpf"
PYTHON_BOOTSTRAP = RUNTIME_DIR + "/bootstrap.py"
MAX_REQUEST = 256 * 1024
FD_SIZE = struct.calcsize("5i")  # at most: code, socket, output, /tmp, a fork channel
RELAY_ADDRESS = ("127.0.0.1", 9001)
RELAY_CHUNK = 65536

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x20000000, 0x40000000
CLONE_NEWUSER = 0x10000000
#: the descriptor a version template's fork requests arrive on (kept across closerange)
TEMPLATE_FD = 3
#: the descriptor a runtime started ahead of time reads its assignment from
PRESTART_FD = 3
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
AT_FDCWD, MOVE_MOUNT_F_EMPTY_PATH, SYS_MOVE_MOUNT = -100, 4, 429
PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECCOMP = 4, 24, 22
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 38, 47
#: open files of a function's processes (impuls.sandbox.base.INSTANCE_OPEN_FILES: this file runs
#: in the sandbox, where impuls is not importable)
INSTANCE_OPEN_FILES = 1024
PR_CAP_AMBIENT_CLEAR_ALL, SECCOMP_MODE_FILTER = 4, 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522
SIOCSIFFLAGS, IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x8914, 0x1, 0x8, 0x40
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus")

_libc = ctypes.CDLL(None, use_errno=True)
_ulong = ctypes.c_ulong


class SetupError(Exception):
    """A step of building the instance failed (sent to the server as ``error ...``)."""


def _check(result: int, what: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)} ({errno.errorcode.get(err, err)})")


def _prctl(option: int, arg2: int = 0, arg3: int = 0, what: str = "prctl") -> None:
    _check(_libc.prctl(ctypes.c_int(option), _ulong(arg2), _ulong(arg3), _ulong(0), _ulong(0)), what)


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(_libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                       _ulong(flags), data and data.encode()), f"mount {target}")


def _move_mount(fd: int, target: str) -> None:
    _check(_libc.syscall(ctypes.c_long(SYS_MOVE_MOUNT), ctypes.c_int(fd), b"", ctypes.c_int(AT_FDCWD),
                         target.encode(), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)), f"attach {target}")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


class Zygote:
    """The template process's state, prepared once before any fork: the filter, the
    runtime client, the socket.

    :mod:`impuls.sandbox.namespace.template` starts this file once per driver,
    with the system interpreter of the Python runtime, inside a bwrap sandbox
    that has the instance layout (read-only root, ``/usr``, ``/etc`` files,
    runtime clients in ``/var/runtime``, empty mount points ``/var/task`` and
    ``/run/impuls/runtime.sock``) and that keeps ``CAP_SYS_ADMIN``,
    ``CAP_NET_ADMIN`` and ``CAP_SETPCAP`` *inside its own user namespace*
    (uid 993 on the host, like every instance).
    """

    def __init__(self, control_fd: int) -> None:
        self.control = socket.socket(fileno=control_fd)
        self._filters = [_load_filter(SECCOMP_FILE)]
        self.fprog = self._filters[0][1]
        self.template_fprog: _SockFprog | None = None
        if os.path.exists(TEMPLATE_SECCOMP_FILE):
            self._filters.append(_load_filter(TEMPLATE_SECCOMP_FILE))
            self.template_fprog = self._filters[1][1]
        with open("/proc/sys/kernel/cap_last_cap") as f:
            self.cap_last = int(f.read())
        self.bootstrap: Any = None
        self._argv: list[bytes] = []  # a version template's runtime command line
        if os.path.exists(PYTHON_BOOTSTRAP):
            self.bootstrap = importlib.import_module("bootstrap")  # sys.path[0] is /var/runtime
        self.arg_area = _arg_area()

    def serve(self) -> None:
        """Build one slot per request: a message (``{"op": "slot"}``) on the
        ``SOCK_SEQPACKET`` socket whose fd number is ``argv[1]``, with the slot's
        own control socket attached (``SCM_RIGHTS``; the server's end has
        ``SO_PASSCRED``).  Returns when the server closes the socket."""
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
        gc.collect()
        gc.freeze()  # keep the collector off shared pages in the children
        self.control.send(b"ready")
        while True:
            try:
                msg, ancdata, _, _ = self.control.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(FD_SIZE),
                                                          socket.MSG_CMSG_CLOEXEC)
            except InterruptedError:
                continue
            if not msg:
                return  # the server closed the channel
            fds = _fds(ancdata)
            try:
                prestart = json.loads(msg).get("prestart")
            except (ValueError, AttributeError):
                prestart = None
            if len(fds) != (1 if prestart is None else 2):  # control (and the output pipe)
                _close_all(fds)
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pid = os.fork()
            except OSError as exc:
                _report(fds[0], f"fork failed: {exc}")
                pid = -1
            if pid == 0:
                self._slot(fds[0], prestart, fds[1] if prestart is not None else -1)  # never returns
            _close_all(fds)

    # --- A: the namespaces ---------------------------------------------------------------

    def _slot(self, ctl_fd: int, prestart: dict[str, Any] | None = None, output_fd: int = -1) -> None:
        """A: report our pid (``SCM_CREDENTIALS``: the kernel translates it to the
        host pid), unshare mount, network, ipc, uts and pid namespaces, make every
        mount private and bring ``lo`` up; wait for ``go`` (the server has moved us
        into the slot's cgroup), unshare the cgroup namespace, fork B and exit.
        Setup errors go to the server as ``error <text>``.  ``prestart`` (``argv``,
        ``env``) and ``output_fd``: the slot's runtime is started now (``_prestart``)."""
        code = 1
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            self.control.close()
            ctl = socket.socket(fileno=ctl_fd)
            creds = struct.pack("3i", os.getpid(), os.getuid(), os.getgid())
            ctl.sendmsg([b"pid"], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])
            _check(_libc.unshare(ctypes.c_int(
                CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID)), "unshare")
            _mount(None, "/", None, MS_REC | MS_PRIVATE)
            _loopback_up()
            if ctl.recv(16) != b"go":
                raise SetupError("the server did not confirm the cgroup")
            _check(_libc.unshare(ctypes.c_int(CLONE_NEWCGROUP)), "unshare cgroup")
            if os.fork() == 0:
                self._init(ctl, prestart, output_fd)  # never returns
            code = 0
        except BaseException as exc:
            _report(ctl_fd, _describe(exc))
        finally:
            os._exit(code)

    # --- B: pid 1 of the instance ---------------------------------------------------------

    def _init(self, ctl: socket.socket, prestart: dict[str, Any] | None = None,
              output_fd: int = -1) -> None:
        """B, pid 1 of the new pid namespace: mount its own ``/proc`` (``PROC_READ_ONLY``
        entries read-only, as bwrap does) and a fresh devpts, fork C (which waits),
        and send ``ready`` with our credentials (the server can then kill the whole
        instance by killing B).

        Then the assignment: JSON (``id``, ``argv``, ``env``, ``mode``, ``shm_mb``,
        ``relay``) with four descriptors -- a detached read-only mount of the code
        directory (``open_tree``), a detached mount of the Runtime API socket, the write
        end of the stdout/stderr pipe and a detached mount of the instance's ``/tmp``
        disk (a version template: its fork channel fifth).  B attaches them
        (``_assign``), answers ``assigned``, hands the assignment to C, drops its
        privileges like C, and becomes the namespace's reaper: when C exits it
        sends ``exit <status>`` and exits, which kills whatever is left in the
        namespace.  For a runtime client that only speaks TCP (``relay``) it also
        relays ``127.0.0.1:9001`` inside the instance's network namespace to the
        Runtime API socket.

        A slot whose runtime was started ahead of time (``prestart``, ``mode:
        prestarted``) gets three descriptors (code, socket, ``/tmp``: its output pipe
        came with the slot) and hands C only the environment, as JSON.
        """
        code = 1
        try:
            # A version template's /proc must be "fully visible" (no read-only entries
            # over it): the kernel lets the instances it forks, in user namespaces of their
            # own, mount a /proc only then; they make their own entries read-only.
            _mount_proc_and_pts(read_only_entries=self.template_fprog is None)
            to_runtime, for_runtime = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            runtime = os.fork()
            if runtime == 0:
                ctl.close()
                to_runtime.close()
                if prestart is not None:
                    self._prestart(for_runtime, prestart, output_fd)  # never returns
                self._runtime(for_runtime)  # never returns
            for_runtime.close()
            if output_fd >= 0:
                os.close(output_fd)
            _set_title(self.arg_area, [b"impuls-slot"])
            creds = struct.pack("3i", os.getpid(), os.getuid(), os.getgid())
            ctl.sendmsg([b"ready"], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])
            msg, ancdata, _, _ = ctl.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(FD_SIZE),
                                             socket.MSG_CMSG_CLOEXEC)
            if not msg:
                raise SystemExit(0)  # the server gave the slot up
            fds = _fds(ancdata)
            # code, socket, output, /tmp (a version template: its channel fifth); a slot whose
            # runtime started ahead of time has its output already: code, socket, /tmp
            expected = (3,) if prestart is not None else (4, 5)
            if len(fds) not in expected:
                raise SetupError(f"expected {' or '.join(map(str, expected))} descriptors, got {len(fds)}")
            request = json.loads(msg)
            listener = self._assign(request, fds[0], fds[1], fds[-1 if prestart is not None else 3])
            ctl.send(b"assigned")
            if prestart is not None:
                to_runtime.send(json.dumps({"env": request["env"], "cwd": TASK_DIR}).encode())
            else:
                to_runtime.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            struct.pack(f"{len(fds) - 3}i", fds[2], *fds[4:]))])
            _close_all(fds)
            to_runtime.close()
            _set_title(self.arg_area, [b"impuls-init", str(request["id"]).encode()])
            # The runtime may not read or write our memory through /proc/1.
            _prctl(PR_SET_DUMPABLE, 0, what="dumpable")
            self.lock_down()
            status = _reap_until(runtime) if listener is None else _relay_until(listener, runtime)
            with contextlib.suppress(OSError):
                ctl.send(b"exit %d" % status)
            code = 0
        except BaseException as exc:
            _report(ctl.fileno(), _describe(exc))
        finally:
            os._exit(code)

    def _assign(self, request: dict[str, Any], code_fd: int, sock_fd: int,
                tmp_fd: int) -> socket.socket | None:
        """Bind the function into the slot: code, socket, /tmp (its disk, see
        :mod:`.tmpdisk`), /dev/shm (and the relay)."""
        _move_mount(code_fd, TASK_DIR)
        _mount(None, TASK_DIR, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        _move_mount(sock_fd, SOCKET_PATH)  # connect() needs no write access to the mount
        _mount(None, SOCKET_PATH, None,
               MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        _mount_scratch(tmp_fd, int(request["shm_mb"]))
        return _relay_listener() if request.get("relay") else None

    # --- C: the runtime ----------------------------------------------------------------------

    def _runtime(self, assignment: socket.socket) -> None:
        """C: once assigned, start a new session, take the pipe as stdout/stderr,
        ``/dev/null`` as stdin, ``/var/task`` as working directory and exactly the
        instance's environment, ``lock_down``, and only then either call the
        preloaded runtime client's ``main()`` (``mode: python``) or ``execve`` argv.

        ``mode: template`` makes C a version template (docs/init-once.md): it locks
        down with the template filter, runs the client's init (the function's
        import) and, instead of serving calls, forks instances on the requests that
        come on the fourth descriptor of the assignment (``_serve_forks``)."""
        code = 1
        try:
            msg, ancdata, _, _ = assignment.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(FD_SIZE))
            fds = _fds(ancdata)
            if not msg or len(fds) not in (1, 2):
                raise SystemExit(0)  # the slot was given up
            assignment.close()
            request = json.loads(msg)
            template = request["mode"] == "template"
            if template and (len(fds) != 2 or self.template_fprog is None or self.bootstrap is None):
                raise SetupError("this sandbox cannot host a version template")
            _new_session(fds[0])
            if template:
                os.dup2(fds[1], TEMPLATE_FD)
            os.closerange(TEMPLATE_FD + 1 if template else 3, _max_fd())
            os.chdir(TASK_DIR)
            env: dict[str, str] = request["env"]
            os.environ.clear()
            os.environ.update(env)
            time.tzset()
            self.lock_down(self.template_fprog if template else None)
            argv = [a.encode() for a in request["argv"]]
            if template:  # named apart from the runtimes that serve calls
                _set_title(self.arg_area, [b"impuls-template", str(request["id"]).encode()])
                self._argv = argv
                sys.argv = list(request["argv"][1:])
                fork_server = socket.socket(fileno=TEMPLATE_FD)
                code = _run_python(self.bootstrap, lambda: self._serve_forks(fork_server))
                return
            if request["mode"] != "python" or self.bootstrap is None:
                try:
                    os.execve(argv[0], argv, env)
                except OSError as exc:
                    os.write(2, f"impuls: cannot start {request['argv'][0]}: {exc}\n".encode())
                    os._exit(127)
            _set_title(self.arg_area, argv)
            sys.argv = list(request["argv"][1:])
            code = _run_python(self.bootstrap)
        except SystemExit:
            code = 0
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(2, f"impuls: sandbox setup failed: {_describe(exc)}\n".encode())
        finally:
            os._exit(code)

    def _prestart(self, assignment: socket.socket, prestart: dict[str, Any], output_fd: int) -> None:
        """C of a slot whose runtime starts ahead of time (Node.js): everything
        ``_runtime`` does but the working directory and the function's environment,
        now -- a new session, ``/dev/null`` as stdin, the output pipe as stdout/stderr,
        ``lock_down`` -- then ``execve`` the runtime (``argv``) with a neutral
        environment (``env``) and the assignment socket as ``PRESTART_FD``.  The
        runtime client reads its assignment from it (JSON: ``env``, ``cwd``) before it
        does anything else (``runtimes/nodejs/bootstrap.js``)."""
        try:
            _new_session(output_fd)
            os.dup2(assignment.fileno(), PRESTART_FD)
            os.set_inheritable(PRESTART_FD, True)
            os.closerange(PRESTART_FD + 1, _max_fd())
            os.chdir("/")
            argv = [a.encode() for a in prestart["argv"]]
            env = {**prestart["env"], "IMPULS_PRESTART_FD": str(PRESTART_FD)}
            self.lock_down()
            os.execve(argv[0], argv, env)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(2, f"impuls: cannot start the runtime ahead of time: {_describe(exc)}\n".encode())
        os._exit(127)

    def lock_down(self, fprog: _SockFprog | None = None) -> None:
        """Drop every capability for good (bounding, ambient, effective, permitted,
        inheritable), set no_new_privs, install the seccomp filter (``fprog``: another
        one, the version template's)."""
        for cap in range(self.cap_last + 1):
            _prctl(PR_CAPBSET_DROP, cap, what="drop bounding capability")
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, what="clear ambient capabilities")
        header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")
        resource.setrlimit(resource.RLIMIT_NOFILE, (INSTANCE_OPEN_FILES, INSTANCE_OPEN_FILES))
        _prctl(PR_SET_NO_NEW_PRIVS, 1, what="no_new_privs")
        _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog or self.fprog), what="seccomp")

    # --- V: a version template and the instances it forks ----------------------------------

    def _serve_forks(self, requests: socket.socket) -> None:
        """V, the version template, once the function's init succeeded: say ``ready`` on
        ``requests`` and fork one instance slot per request -- JSON (``shm_mb``) with two
        descriptors, the slot's control socket and its ``/tmp`` (a detached mount of its
        disk, which gets a copy of what the init left in ``/tmp``).  Returns only in a
        forked instance's runtime process, once it is assigned and ready to serve
        (``_fork_slot``); exits when the server closes ``requests``."""
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # its children are reaped by the kernel
        requests.send(b"ready")
        while True:
            try:
                msg, ancdata, _, _ = requests.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(FD_SIZE),
                                                      socket.MSG_CMSG_CLOEXEC)
            except InterruptedError:
                continue
            if not msg:
                _flush_output()
                os._exit(0)  # retired: the server closed the channel
            fds = _fds(ancdata)
            if len(fds) != 2:  # the slot's control socket, its /tmp
                _close_all(fds)
                continue
            _flush_output()
            try:
                pid = os.fork()
            except OSError as exc:
                _report(fds[0], f"fork failed: {exc}")
                pid = -1
            if pid == 0:
                requests.close()
                self._fork_slot(json.loads(msg), fds[0], fds[1])
                return  # in the instance's runtime, which goes on to serve calls
            _close_all(fds)

    def _fork_slot(self, request: dict[str, Any], ctl_fd: int, tmp_fd: int) -> None:
        """X, forked from V: like A (report our pid, wait for ``go``: we are in the
        slot's cgroup), but the namespaces are made in a new user namespace of our own
        -- V has no capability to give -- mapping the sandbox uid to itself; then fork Y
        (the instance's pid 1, ``_fork_init``) and exit.  Returns only in the
        instance's runtime process."""
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _set_title(self.arg_area, [b"impuls-slot"])  # only the template itself shows its name
        ctl = socket.socket(fileno=ctl_fd)
        try:
            creds = struct.pack("3i", os.getpid(), os.getuid(), os.getgid())
            ctl.sendmsg([b"pid"], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])
            if ctl.recv(16) != b"go":
                raise SetupError("the server did not confirm the cgroup")
            uid, gid = os.geteuid(), os.getegid()
            _check(_libc.unshare(ctypes.c_int(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC
                                              | CLONE_NEWUTS | CLONE_NEWPID | CLONE_NEWCGROUP)), "unshare")
            for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"),
                               ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
            _mount(None, "/", None, MS_REC | MS_PRIVATE)
            _loopback_up()
            if os.fork() == 0:
                self._fork_init(ctl, request, tmp_fd)
                return
        except BaseException as exc:
            _report(ctl.fileno(), _describe(exc))
            os._exit(1)
        os._exit(0)

    def _fork_init(self, ctl: socket.socket, request: dict[str, Any], tmp_fd: int) -> None:
        """Y, pid 1 of the forked instance: its own ``/proc``, ``/dev/pts``, ``/tmp`` (a
        copy of what the init left in the template's) and ``/dev/shm``; fork the runtime
        (Z), send ``ready`` and wait for the assignment -- JSON (``id``, ``env``) with
        two descriptors, a detached mount of the Runtime API socket and the output
        pipe.  Then, as B: attach the socket, answer ``assigned``, hand the rest to Z,
        lock down and reap until Z exits.  Returns only in Z (``_become_instance``)."""
        code = 1
        try:
            _mount_proc_and_pts()
            init_tmp = os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)  # the template's, hidden next
            _mount_scratch(tmp_fd, int(request["shm_mb"]))
            os.close(tmp_fd)
            _copy_tree(init_tmp, "/tmp")
            os.close(init_tmp)
            to_runtime, for_runtime = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            runtime = os.fork()
            if runtime == 0:
                ctl.close()
                to_runtime.close()
                self._become_instance(for_runtime)
                return
            for_runtime.close()
            creds = struct.pack("3i", os.getpid(), os.getuid(), os.getgid())
            ctl.sendmsg([b"ready"], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])
            msg, ancdata, _, _ = ctl.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(FD_SIZE),
                                             socket.MSG_CMSG_CLOEXEC)
            if not msg:
                raise SystemExit(0)  # the server gave the slot up
            fds = _fds(ancdata)
            if len(fds) != 2:
                raise SetupError(f"expected 2 descriptors, got {len(fds)}")
            _move_mount(fds[0], SOCKET_PATH)
            _mount(None, SOCKET_PATH, None,
                   MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
            ctl.send(b"assigned")
            to_runtime.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fds[1]))])
            _close_all(fds)
            to_runtime.close()
            _set_title(self.arg_area, [b"impuls-init", str(json.loads(msg)["id"]).encode()])
            _prctl(PR_SET_DUMPABLE, 0, what="dumpable")
            self.lock_down()
            status = _reap_until(runtime)
            with contextlib.suppress(OSError):
                ctl.send(b"exit %d" % status)
            code = 0
        except SystemExit:
            code = 0
        except BaseException as exc:
            _report(ctl.fileno(), _describe(exc))
        os._exit(code)

    def _become_instance(self, assignment: socket.socket) -> None:
        """Z: once assigned, a new session, the instance's output pipe and environment,
        every capability dropped and the instance filter on top of the template's; then
        uniqueness re-established (``reseed``) before the runtime client goes on to
        serve calls on a fresh connection."""
        try:
            msg, ancdata, _, _ = assignment.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(FD_SIZE))
            fds = _fds(ancdata)
            if not msg or len(fds) != 1:
                os._exit(0)  # the slot was given up
            assignment.close()
            os.setsid()
            os.dup2(fds[0], 1)
            os.dup2(fds[0], 2)
            os.close(fds[0])
            env: dict[str, str] = json.loads(msg)["env"]
            os.environ.clear()
            os.environ.update(env)
            time.tzset()
            _set_title(self.arg_area, self._argv)
            self.lock_down()
            reseed()
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(2, f"impuls: sandbox setup failed: {_describe(exc)}\n".encode())
            os._exit(1)


# --- helpers ---------------------------------------------------------------------------


def reseed() -> None:
    """Make a forked instance's randomness its own: ``os.urandom``, ``secrets`` and
    ``uuid.uuid4`` read the kernel on every call and differ anyway; ``random``'s global
    generator and OpenSSL's pool are state copied from the template, so they are
    seeded afresh from the kernel, and ``tempfile``'s name generator is dropped (it
    renews itself only when the pid changes, and every instance's runtime has the
    template's pid in its own namespace) -- each only if the function imported it."""
    random = sys.modules.get("random")
    if random is not None:
        random.seed()
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        tempfile._name_sequence = None  # type: ignore[attr-defined]
    ssl = sys.modules.get("ssl")
    if ssl is not None:
        ssl.RAND_add(os.urandom(32), 32.0)


def _run_python(bootstrap: Any, after_init: Any = None) -> int:
    """Run the runtime client's main() as if it were the program; its exit status.
    ``after_init`` goes to ``main`` (a version template's fork loop)."""
    code = 0
    try:
        if after_init is None:
            bootstrap.main()
        else:
            bootstrap.main(after_init)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            sys.stderr.write(exc.code + "\n")
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    threading = sys.modules.get("threading")
    try:
        if threading is not None:
            threading._shutdown()
        import atexit

        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # nothing left to report to
                stream.flush()
    return code


def _reap_until(child: int) -> int:
    """Reap every child (B is the namespace's pid 1) until ``child`` exits; its status."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return -signal.SIGKILL
        except InterruptedError:
            continue
        if pid == child:
            return os.waitstatus_to_exitcode(status)


def _reap_nowait(child: int) -> int | None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return -signal.SIGKILL
        if pid == 0:
            return None
        if pid == child:
            return os.waitstatus_to_exitcode(status)


def _relay_listener() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(RELAY_ADDRESS)
    listener.listen(16)
    return listener


def _relay_until(listener: socket.socket, child: int) -> int:
    """Relay 127.0.0.1:9001 to the Runtime API socket until ``child`` exits; its status."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(wake_r, selectors.EVENT_READ, None)
    sel.register(listener, selectors.EVENT_READ, None)
    peers: dict[socket.socket, socket.socket] = {}

    def drop(sock: socket.socket) -> None:
        for s in (sock, peers.pop(sock, None)):
            if s is not None:
                peers.pop(s, None)
                sel.unregister(s)
                s.close()

    while True:
        status = _reap_nowait(child)
        if status is not None:
            return status
        for key, _ in sel.select():
            if key.fileobj == wake_r:
                while True:
                    try:
                        if not os.read(wake_r, 512):
                            break
                    except BlockingIOError:
                        break
            elif key.fileobj is listener:
                try:
                    conn, _ = listener.accept()
                    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                except OSError:
                    continue
                try:
                    upstream.connect(SOCKET_PATH)
                except OSError:
                    conn.close()
                    upstream.close()
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peers[conn], peers[upstream] = upstream, conn
                sel.register(conn, selectors.EVENT_READ, None)
                sel.register(upstream, selectors.EVENT_READ, None)
            else:
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock not in peers:
                    continue
                try:
                    data = sock.recv(RELAY_CHUNK)
                    if data:
                        peers[sock].sendall(data)
                except OSError:
                    data = b""
                if not data:
                    drop(sock)


def _new_session(output_fd: int) -> None:
    """The runtime's own session, ``/dev/null`` as stdin and ``output_fd`` as stdout/stderr."""
    os.setsid()
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _load_filter(path: str) -> tuple[Any, _SockFprog]:
    """A BPF filter file, as a buffer and the ``sock_fprog`` pointing into it."""
    with open(path, "rb") as f:
        bpf = f.read()
    buffer = ctypes.create_string_buffer(bpf, len(bpf))
    return buffer, _SockFprog(len(bpf) // 8, ctypes.addressof(buffer))


def _mount_proc_and_pts(read_only_entries: bool = True) -> None:
    """A ``/proc`` of the current pid namespace (``PROC_READ_ONLY`` entries read-only, as
    bwrap does, if ``read_only_entries``) and a fresh devpts."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for name in PROC_READ_ONLY if read_only_entries else ():
        path = f"/proc/{name}"
        if os.path.exists(path):
            _mount(path, path, None, MS_BIND | MS_REC)
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")


def _mount_scratch(tmp_fd: int, shm_mb: int) -> None:
    """The instance's ``/tmp`` (a detached mount of its disk, see :mod:`.tmpdisk`) and an
    empty, size-capped tmpfs on ``/dev/shm``."""
    _move_mount(tmp_fd, "/tmp")
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"size={shm_mb}m,mode=0755")


def _copy_tree(source_fd: int, target: str) -> None:
    """Copy the directory tree open at ``source_fd`` into the directory ``target``
    (files, directories, symlinks and their modes)."""
    for path, dirs, files, dir_fd in os.fwalk(".", dir_fd=source_fd):
        there = os.path.join(target, path)
        for name in dirs:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                os.symlink(os.readlink(name, dir_fd=dir_fd), os.path.join(there, name))
            else:
                os.mkdir(os.path.join(there, name), stat.S_IMODE(mode))
        for name in files:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                os.symlink(os.readlink(name, dir_fd=dir_fd), os.path.join(there, name))
            elif stat.S_ISREG(mode):
                source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
                try:
                    copy = os.open(os.path.join(there, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                   stat.S_IMODE(mode))
                    try:
                        while chunk := os.read(source, 1 << 20):
                            os.write(copy, chunk)
                    finally:
                        os.close(copy)
                finally:
                    os.close(source)


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING)
        try:
            fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, ifreq)
        except OSError as exc:
            raise SetupError(f"cannot bring lo up: {exc}") from exc


def _arg_area() -> tuple[int, int] | None:
    """Where this process's argv lives (to rename the children like setproctitle)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])
    except (OSError, ValueError, IndexError):
        return None
    return (start, end) if end > start else None


def _set_title(area: tuple[int, int] | None, argv: list[bytes]) -> None:
    """Make ``/proc/<pid>/cmdline`` read ``argv`` (truncated to the original's length)."""
    if area is None:
        return
    start, end = area
    data = b"\0".join(argv)[: end - start - 1]
    ctypes.memmove(start, data.ljust(end - start, b"\0"), end - start)


def _fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _report(ctl_fd: int, text: str) -> None:
    if ctl_fd < 0:
        return
    with contextlib.suppress(OSError):
        os.write(ctl_fd, b"error " + text.encode("utf-8", "replace")[:4000])


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, SetupError) else f"{type(exc).__name__}: {exc}"


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        return 1024


def main() -> None:
    Zygote(int(sys.argv[1])).serve()


if __name__ == "__main__":
    main()
