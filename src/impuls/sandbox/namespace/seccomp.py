"""The seccomp filter every ``namespace`` sandbox runs under: ``build_filter_bpf()``
returns it as raw classic BPF for ``bwrap --seccomp FD`` (and for the template, which
installs it itself)."""

from __future__ import annotations

import contextlib
import errno
import os
import threading

from impuls.errors import SandboxStartFailed

__all__ = [
    "DENIED_SYSCALLS",
    "NAMESPACE_CLONE_FLAGS",
    "TEMPLATE_ALLOWED_SYSCALLS",
    "SeccompError",
    "build_filter_bpf",
    "build_version_template_filter_bpf",
]


class SeccompError(SandboxStartFailed):
    """The seccomp filter could not be built (libseccomp missing or failing)."""


#: Syscalls answered with EPERM whatever their arguments.
DENIED_SYSCALLS: tuple[str, ...] = (
    # inspecting / tampering with other processes
    "ptrace", "process_vm_readv", "process_vm_writev",
    # creating or entering namespaces, mounting, changing root: the ways out of
    # the bwrap layout (unprivileged user namespaces would otherwise hand the
    # process a full capability set inside a fresh namespace); clone() with
    # CLONE_NEW* flags is filtered by argument in _build
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",
    "fsopen", "fsmount", "fsconfig", "fspick", "move_mount", "open_tree",
    "mount_setattr",
    # large or historically buggy kernel attack surface that no function
    # needs (keyrings are not namespaced)
    "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "lookup_dcookie", "uselib",
    # file handles bypass path-based confinement ("shocker")
    "open_by_handle_at", "name_to_handle_at",
    # whole-machine administration (syslog: the kernel log; iopl/ioperm: raw port I/O)
    "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "reboot", "swapon", "swapoff", "acct", "quotactl",
    "quotactl_fd", "syslog", "iopl", "ioperm",
    # the clock is shared by every namespace (even read-only adjtimex(modes=0)
    # queries get EPERM; nothing in the runtimes uses them)
    "settimeofday", "clock_settime", "adjtimex", "clock_adjtime",
)

#: clone(2) flag bits that create namespaces; clone() with any of them -> EPERM.
#: (CLONE_NEWTIME, 0x80, is only honoured by clone3/unshare: in clone() that
#: bit belongs to the exit-signal byte.)
NAMESPACE_CLONE_FLAGS: dict[str, int] = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

#: What the filter of a version template (a Python function initialised once, see
#: docs/init-once.md) allows beyond the instance filter: to make the namespaces of each
#: instance it forks, it may ``unshare`` -- only together with a new user namespace, so
#: that every namespace it makes is owned by that user namespace and grants nothing
#: over the template's own -- and mount inside them.  Each instance installs the full
#: filter on top (filters stack, the strictest answer wins) before it serves a call.
TEMPLATE_ALLOWED_SYSCALLS: tuple[str, ...] = ("unshare", "mount", "move_mount")

_PERSONALITY_QUERY = 0xFFFFFFFF

_lock = threading.Lock()
_cached: dict[bool, bytes] = {}


def build_filter_bpf() -> bytes:
    """Return the sandbox seccomp filter as raw BPF bytes for ``bwrap --seccomp``.

    Contract: the same bytes for the life of the process (built on first call,
    thread-safe, then cached: cheap to call repeatedly); a multiple of 8 bytes
    (``struct sock_filter[]``, libseccomp's ``seccomp_export_bpf`` format).
    Raises ``SeccompError`` if libseccomp is missing or rejects the filter.

    bwrap installs it on the sandboxed command *and* on its own pid-1 reaper,
    after it has built the namespaces, so the filter does not get in the way
    of bwrap's own setup.

    The bytes have to reach bwrap through a file descriptor that bwrap reads
    to EOF; a descriptor is consumed by one bwrap run (see
    ``impuls.sandbox.namespace.bwrap.data_fd``).
    """
    return _cached_filter(version_template=False)


def build_version_template_filter_bpf() -> bytes:
    """The filter of a version template process (as ``build_filter_bpf``, same contract):
    the instance filter but for ``TEMPLATE_ALLOWED_SYSCALLS``, and ``unshare`` only with
    ``CLONE_NEWUSER``."""
    return _cached_filter(version_template=True)


def _cached_filter(version_template: bool) -> bytes:
    cached = _cached.get(version_template)
    if cached is not None:
        return cached
    with _lock:
        if version_template not in _cached:
            _cached[version_template] = _build(version_template)
        return _cached[version_template]


def _build(version_template: bool = False) -> bytes:
    # pyseccomp (a ctypes binding to libseccomp.so.2) is imported here, so that
    # importing this module never fails on a host without libseccomp.
    try:
        import pyseccomp as sc
    except (ImportError, OSError, RuntimeError) as exc:  # RuntimeError: no libseccomp
        raise SeccompError(f"cannot load libseccomp (pyseccomp): {exc}") from exc

    eperm = sc.ERRNO(errno.EPERM)
    try:
        # Default ALLOW and a deny-list: enough because the filter is one layer
        # of several (unprivileged uid, no capabilities, no_new_privs, its own
        # user/pid/net/ipc/uts/cgroup/mount namespaces).  Its job is to shrink the
        # kernel attack surface reachable from there and to make sure nothing
        # can undo the other layers.
        flt = sc.SyscallFilter(sc.ALLOW)
        # The filter is built for the native architecture only; a syscall
        # through any other ABI gets the "bad arch" action, and kills the whole
        # process rather than one thread, so nothing is left half-alive.  On
        # x86_64 that covers the 32-bit int 0x80 entry (AUDIT_ARCH_I386) and
        # x32: x32 syscalls arrive with the x86_64 audit arch but with bit 30
        # (__X32_SYSCALL_BIT) set in the number, and libseccomp's x86_64 code
        # emits a "nr >= 0x40000000 -> bad arch" check when x32 is not one of
        # the filter's arches.
        flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
        # Binary-tree dispatch on the syscall number instead of a linear list.
        with contextlib.suppress(OSError):  # libseccomp < 2.5: keep the linear layout
            flt.set_attr(sc.Attr.CTL_OPTIMIZE, 2)

        for name in DENIED_SYSCALLS:
            nr = _resolve(sc, name)
            if nr is not None and not (version_template and name in TEMPLATE_ALLOWED_SYSCALLS):
                flt.add_rule(eperm, nr)
        if version_template:
            new_user = NAMESPACE_CLONE_FLAGS["CLONE_NEWUSER"]
            flt.add_rule(eperm, _require(sc, "unshare"), sc.Arg(0, sc.MASKED_EQ, new_user, 0))

        # clone3's flags live in a struct in memory that seccomp cannot inspect,
        # so it cannot be filtered by flag: ENOSYS makes glibc (>= 2.34) and musl
        # fall back to clone, which is filtered below.
        flt.add_rule(sc.ERRNO(errno.ENOSYS), _require(sc, "clone3"))

        # One rule per CLONE_NEW* bit: libseccomp can only test a masked value
        # for equality.
        clone = _require(sc, "clone")
        for bit in NAMESPACE_CLONE_FLAGS.values():
            flt.add_rule(eperm, clone, sc.Arg(0, sc.MASKED_EQ, bit, bit))

        # personality(x) denied unless x is PER_LINUX (0) or the query value
        # 0xffffffff, so ADDR_NO_RANDOMIZE / READ_IMPLIES_EXEC cannot be switched
        # on.  libseccomp cannot put two comparisons on the same argument into
        # one rule, so "x not in {0, 0xffffffff}" is written as "two adjacent
        # bits (of the 32 the kernel looks at) differ": 31 pairs x 2 patterns =
        # 62 masked-equality rules, only evaluated for personality itself.
        personality = _require(sc, "personality")
        for i in range(31):
            pair = (1 << i) | (1 << (i + 1))
            flt.add_rule(eperm, personality, sc.Arg(0, sc.MASKED_EQ, pair, 1 << i))
            flt.add_rule(eperm, personality, sc.Arg(0, sc.MASKED_EQ, pair, 1 << (i + 1)))

        return _export(flt)
    except OSError as exc:
        raise SeccompError(f"libseccomp rejected the sandbox filter: {exc}") from exc


def _resolve(sc, name: str) -> int | None:  # type: ignore[no-untyped-def]
    """Syscall number on the native arch; None if libseccomp has never heard of it.

    libseccomp returns a negative pseudo-number for a syscall that exists on
    some arch but not this one; rules on those are accepted and ignored.
    """
    nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
    return None if nr == -1 else nr  # -1 is __NR_SCMP_ERROR


def _require(sc, name: str) -> int:  # type: ignore[no-untyped-def]
    nr = _resolve(sc, name)
    if nr is None:
        raise SeccompError(f"libseccomp does not know the syscall {name!r}")
    return nr


def _export(flt) -> bytes:  # type: ignore[no-untyped-def]
    """Run libseccomp's ``seccomp_export_bpf`` into a memfd and read it back."""
    fd = os.memfd_create("impuls-seccomp", os.MFD_CLOEXEC)
    try:
        flt.export_bpf(_Fileno(fd))
        size = os.lseek(fd, 0, os.SEEK_END)
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    if not data or len(data) % 8:
        raise SeccompError(f"libseccomp exported a malformed filter ({len(data)} bytes)")
    return data


class _Fileno:
    """What ``SyscallFilter.export_bpf`` wants: an object with ``fileno()``."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd
