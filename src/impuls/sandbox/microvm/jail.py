"""QEMU's confinement: its own uid, namespaces and file system, two seccomp filters, no capabilities.

Every QEMU the driver starts (and the KVM probe) is assumed to be attacked by the code in its
guest, so it gets nothing it does not need (see docs/sandboxes.md, microvm)::

    setpriv --pdeathsig KILL --                 # on the host: dies with the server (even SIGKILL)
      bwrap --unshare-{pid,net,ipc,uts,cgroup} --die-with-parent --clearenv --seccomp FD
            /usr (ro), the /lib* links, /dev/{null,urandom[,kvm]}, its own /proc, a private /tmp,
            /vm/<file> for each file it is given, / read-only --
        prlimit --core=0 --                     # a core dump would hold guest memory
          setpriv --reuid 994 --regid 994 --clear-groups --inh-caps -all --bounding-set -all
                  --no-new-privs --
            qemu-system-x86_64 -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
                                        resourcecontrol=deny ...

bwrap runs as root (it is not setuid and makes no user namespace), so it can bind files from
directories QEMU's uid could never reach (a 0700 data directory); only then does the inner
``setpriv`` drop to QEMU's uid.  Every QEMU shares that uid, so each gets its own pid namespace:
it cannot name, signal or ptrace another.  The socketpairs to QEMU, the RAM of a restored clone
(a sealed memfd, see :mod:`.snapshots`) and the snapshot state (QMP ``getfd``) are file
descriptors: no socket path, and no snapshot file it could write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from impuls.errors import SandboxStartFailed

#: QEMU's uid and gid on the host: dedicated, no /etc/passwd entry needed (not 0, and not the
#: namespace sandbox's 993: a QEMU must never be able to signal or ptrace a function's process).
QEMU_UID = 994
QEMU_GID = 994
#: QEMU's own seccomp filter: the default deny-list plus every optional set.  spawn=deny
#: kills it on fork/execve (so migrations go to file descriptors, never ``exec:``),
#: elevateprivileges=deny on set*id, resourcecontrol=deny on scheduler changes.
QEMU_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
VM_ROOT = "/vm"  # inside the jail: the files QEMU is given
TMP_BYTES = 16 << 20
#: Part of the KVM probe's cache key: a verdict holds for one way of confining QEMU.
JAIL_RECIPE = "1"
HOST_LINKS = ("/lib", "/lib32", "/lib64", "/libx32")

#: The second filter (bwrap --seccomp, EPERM), for what QEMU's deny-list leaves open and a
#: device model never needs: other processes, namespaces and mounts, kernel subsystems with a
#: long record of privilege escalations (io_uring, bpf, userfaultfd, keyrings, perf), file
#: handles, modules, the clock and whole-machine administration.
EXTRA_DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsmount", "fsconfig",
    "fspick", "move_mount", "open_tree", "mount_setattr",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "lookup_dcookie", "uselib",
    "open_by_handle_at", "name_to_handle_at",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "iopl", "ioperm", "vhangup",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
)
NAMESPACE_CLONE_FLAGS = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET


def unavailable() -> str | None:
    """None when QEMU can be confined here, else why not."""
    if os.geteuid() != 0:
        return (f"the microvm sandbox runs QEMU confined as uid {QEMU_UID} (bubblewrap, setpriv): "
                "the server must run as root")
    for tool, package in (("bwrap", "bubblewrap"), ("setpriv", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package {package}); the microvm sandbox needs it"
    return None


def readable(path: Path) -> bool:
    """Whether QEMU's uid may read ``path`` (its mode; the directories above it do not matter)."""
    st = path.stat()
    return bool(st.st_mode & stat.S_IROTH
                or (st.st_uid == QEMU_UID and st.st_mode & stat.S_IRUSR)
                or (st.st_gid == QEMU_GID and st.st_mode & stat.S_IRGRP))


def give_to_qemu(path: Path | int, mode: int = 0o640) -> None:
    """Make a file the server wrote readable by QEMU's group only (``mode``, group 994)."""
    if os.geteuid() != 0:
        return
    if isinstance(path, int):
        os.fchown(path, 0, QEMU_GID)
        os.fchmod(path, mode)
    else:
        os.chown(path, 0, QEMU_GID)
        os.chmod(path, mode)


def kvm_access(device: str = "/dev/kvm") -> tuple[int | None, str]:
    """(the extra group QEMU needs for ``device``, or None; why QEMU's uid cannot use it, or "")."""
    try:
        st = os.stat(device)
    except OSError as exc:
        return None, f"{device}: {exc.strerror}"
    if st.st_mode & 0o006 == 0o006:  # read-write for everyone
        return None, ""
    if st.st_gid != 0 and st.st_mode & 0o060 == 0o060:  # e.g. root:kvm 0660: QEMU joins that group
        return st.st_gid, ""
    return None, (f"{device} ({stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid}) is not usable by QEMU's "
                  f"uid {QEMU_UID}: it needs a group of its own (e.g. root:kvm 0660)")


@dataclass(frozen=True)
class Mount:
    """A host file QEMU is given, at ``/vm/<name>`` in its jail (read-only unless ``writable``)."""

    host: Path
    name: str
    writable: bool = False

    @property
    def inside(self) -> str:
        return f"{VM_ROOT}/{self.name}"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SandboxStartFailed(f"{name} is not installed: QEMU cannot be confined")
    return path


def _host_links() -> list[str]:
    """The host's /lib* as they are: symlinks into /usr (merged /usr), else read-only binds."""
    args: list[str] = []
    for path in HOST_LINKS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def command(qemu_argv: Sequence[str], mounts: Sequence[Mount], accel: str, seccomp_fd: int) -> list[str]:
    """The confined command line of ``qemu_argv`` (whose paths name ``/vm/...`` files of
    ``mounts``).  ``seccomp_fd``: :func:`seccomp_fd`, passed to the child and closed after."""
    binary = qemu_argv[0]
    setpriv, prlimit = _tool("setpriv"), shutil.which("prlimit")
    args = [setpriv, "--pdeathsig", "KILL", "--", _tool("bwrap"),
            "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--clearenv", "--chdir", "/",
            "--ro-bind", "/usr", "/usr", *_host_links()]
    for tool in (binary, setpriv, prlimit):  # the tools themselves, when they live outside /usr
        if tool is not None and not tool.startswith("/usr/"):
            args += ["--ro-bind", tool, tool]
    args += ["--tmpfs", "/dev", "--dev-bind", "/dev/null", "/dev/null",
             "--dev-bind", "/dev/urandom", "/dev/urandom"]
    groups = ["--clear-groups"]
    if accel == "kvm":
        group, why = kvm_access()
        if why:
            raise SandboxStartFailed(f"cannot run QEMU under KVM: {why}")
        args += ["--dev-bind", "/dev/kvm", "/dev/kvm"]
        if group is not None:
            groups = ["--groups", str(group)]
    args += ["--proc", "/proc", "--perms", "1777", "--size", str(TMP_BYTES), "--tmpfs", "/tmp",
             "--dir", VM_ROOT]
    for mount in mounts:
        args += ["--bind" if mount.writable else "--ro-bind", str(mount.host), mount.inside]
    args += ["--remount-ro", "/", "--seccomp", str(seccomp_fd), "--"]
    if prlimit is not None:
        args += [prlimit, "--core=0", "--"]
    args += [setpriv, "--reuid", str(QEMU_UID), "--regid", str(QEMU_GID), *groups,
             "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", *qemu_argv]
    return args


# --- the second seccomp filter ------------------------------------------------------------

_lock = threading.Lock()
_filter: bytes | None = None


def seccomp_filter() -> bytes:
    """The extra filter as raw BPF for ``bwrap --seccomp`` (built once per process)."""
    global _filter
    with _lock:
        if _filter is None:
            _filter = _build_filter()
        return _filter


def seccomp_fd() -> int:
    """A fresh descriptor bwrap reads the filter from (one per start: bwrap reads it to EOF)."""
    data = seccomp_filter()
    fd = os.memfd_create("impuls-qemu-seccomp", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _build_filter() -> bytes:
    try:
        import pyseccomp as sc
    except (ImportError, OSError, RuntimeError) as exc:  # RuntimeError: no libseccomp
        raise SandboxStartFailed(f"cannot load libseccomp (pyseccomp) for QEMU's filter: {exc}") from exc
    eperm = sc.ERRNO(errno.EPERM)
    try:
        flt = sc.SyscallFilter(sc.ALLOW)
        flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)  # x32 and int 0x80 system calls
        for name in EXTRA_DENIED:
            nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
            if nr != -1:
                flt.add_rule(eperm, nr)
        clone = sc.resolve_syscall(sc.Arch.NATIVE, "clone")
        for bit in range(32):
            if NAMESPACE_CLONE_FLAGS & (1 << bit):
                flt.add_rule(eperm, clone, sc.Arg(0, sc.MASKED_EQ, 1 << bit, 1 << bit))
        # clone3's flags are in memory seccomp cannot read: ENOSYS sends glibc back to clone
        flt.add_rule(sc.ERRNO(errno.ENOSYS), sc.resolve_syscall(sc.Arch.NATIVE, "clone3"))
        fd = os.memfd_create("impuls-seccomp-export", os.MFD_CLOEXEC)
        try:
            flt.export_bpf(_Fileno(fd))
            data = os.pread(fd, os.lseek(fd, 0, os.SEEK_END), 0)
        finally:
            os.close(fd)
    except OSError as exc:
        raise SandboxStartFailed(f"libseccomp rejected QEMU's filter: {exc}") from exc
    if not data or len(data) % 8:
        raise SandboxStartFailed(f"libseccomp exported a malformed filter ({len(data)} bytes)")
    return data


class _Fileno:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


def close_quietly(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None and fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
