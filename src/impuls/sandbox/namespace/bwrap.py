"""The bubblewrap command line of one ``namespace`` sandbox instance: :func:`build`
turns a :class:`BwrapSpec` into it, and spawns nothing (it only looks at the host
paths it is asked to expose)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from impuls.errors import SandboxStartFailed

__all__ = [
    "BASE_ETC_PATHS",
    "BASE_HOST_PATHS",
    "RUNTIME_SOCKET",
    "TASK_DIR",
    "BwrapCommand",
    "BwrapConfigError",
    "BwrapSpec",
    "build",
    "build_argv",
    "data_fd",
    "etc_files",
]

BWRAP = "/usr/bin/bwrap"
TASK_DIR = "/var/task"
RUNTIME_SOCKET = "/run/impuls/runtime.sock"

#: Always exposed read-only (a host symlink becomes the same symlink).
BASE_HOST_PATHS: tuple[str, ...] = ("/usr", "/bin", "/lib", "/lib64", "/sbin")
#: Host /etc files worth sharing; missing ones are skipped.  Not /etc itself.
BASE_ETC_PATHS: tuple[str, ...] = (
    "/etc/ld.so.cache",      # dynamic loader cache (libraries resolve without it, slower)
    "/etc/localtime",        # time zone
    "/etc/ssl/certs",        # CA bundle (OpenSSL default dir; entries point into /usr)
    "/etc/ssl/openssl.cnf",  # /usr/lib/ssl/openssl.cnf points here on Debian
)

# Destinations the sandbox layout owns; host paths may not land on or under them.
_RESERVED = ("/proc", "/dev", "/tmp", TASK_DIR, "/run/impuls", "/etc/passwd",
             "/etc/group", "/etc/hosts", "/etc/nsswitch.conf")
# Host paths never exposed: these whole subtrees...
_FORBIDDEN_TREES = ("/proc", "/sys", "/dev", "/run", "/root")
# ...and these directories as a whole (a specific subdirectory is the caller's call).
_FORBIDDEN_EXACT = ("/", "/etc", "/home", "/var", "/tmp", "/boot", "/mnt", "/opt", "/srv")


class BwrapConfigError(SandboxStartFailed):
    """The sandbox description cannot be turned into a bwrap command line."""


@dataclass(frozen=True)
class BwrapSpec:
    """Everything that varies between two sandbox instances.

    * ``command``: argv run inside (absolute path first).
    * ``code_dir``: host directory bound read-only at ``/var/task``; None
      leaves an empty ``/var/task`` directory (a mount point for a template
      process, see ``cap_add``).
    * ``host_paths``: runtime-specific host paths to expose read-only in
      addition to ``BASE_HOST_PATHS`` and ``BASE_ETC_PATHS``; missing ones
      are skipped, symlinks are recreated (and their target exposed).
    * ``runtime_socket``: host path of a listening unix socket, bound
      read-only (the socket inode only, not its directory: other instances'
      sockets stay invisible) at ``/run/impuls/runtime.sock``.  Must exist
      at spawn time and not be re-created while the instance lives.  When
      it is None, ``data_fds`` may name ``/run/impuls/runtime.sock``: a plain
      file is created there (``--file``), a mount point for a template process.
    * ``tmp_mb``: size cap of the ``/tmp`` tmpfs (``--size``); writes beyond
      it fail with ENOSPC.  Its pages are also charged to the memory cgroup.
    * ``shm_mb``: size cap of the ``/dev/shm`` tmpfs (POSIX shm/semaphores,
      e.g. Python ``multiprocessing``); 0 leaves ``/dev/shm`` a read-only
      empty directory.
    * ``uid``/``gid``: identity inside, and the host uid/gid bwrap must be
      started as, e.g. ``Popen(..., user=spec.uid, group=spec.gid,
      extra_groups=[])``.  bwrap is not setuid here, so as a normal user it
      builds everything inside the user namespace it creates, and the sandbox
      uid maps to the *same* host uid.  Started as root, bwrap would map the
      sandbox uid onto host uid 0: no capabilities, but the process would own
      every root-owned file (and could signal root processes) as far as the
      kernel's DAC checks go.  Consequence: ``code_dir`` and the socket must
      be reachable by that uid -- every parent directory searchable (``x``)
      by it, the files readable, and the socket writable (``connect`` needs
      write permission on the socket inode; a read-only bind mount is fine).
      bwrap resolves ``--ro-bind-fd`` through ``realpath`` too, so passing an
      O_PATH fd does not get around a 0700 parent.  993 is what Lambda uses.
    * ``env``: the complete environment (nothing is inherited).
    * ``seccomp_fd``: fd holding ``build_filter_bpf()`` bytes (None: no filter,
      for tests only).
    * ``data_fds``: sandbox path -> fd whose content becomes a read-only file
      there (mode 0444); use it for ``etc_files()``.
    * bwrap reads these descriptors (``seccomp_fd``, ``data_fds``) to EOF: one
      fresh descriptor per run (``data_fd`` makes one), passed with
      ``pass_fds``, closed by the parent after the spawn.
    * ``cap_add``: capabilities (``CAP_SYS_ADMIN``...) the command keeps --
      inside its user namespace only (as ambient capabilities of the sandbox
      uid).  Only for a trusted *template* process that builds per-instance
      namespaces and drops everything before function code runs; never with
      function code as the command.
    * ``nested_userns``: leave out ``--disable-userns``, so that processes
      inside may create user namespaces (where the seccomp filter lets
      them).  Only for the template that forks version templates
      (docs/init-once.md): they make each forked instance's namespaces.
    """

    command: Sequence[str]
    code_dir: str | None
    host_paths: Sequence[str] = ()
    runtime_socket: str | None = None
    tmp_mb: int = 512
    shm_mb: int = 64
    uid: int = 993
    gid: int = 993
    hostname: str = "impuls"
    env: Mapping[str, str] = field(default_factory=dict)
    seccomp_fd: int | None = None
    data_fds: Mapping[str, int] = field(default_factory=dict)
    cap_add: Sequence[str] = ()
    nested_userns: bool = False
    bwrap: str = BWRAP


@dataclass(frozen=True)
class BwrapCommand:
    """bwrap, its options, and the sandboxed command, kept apart."""

    bwrap: str
    options: tuple[str, ...]
    command: tuple[str, ...]

    def argv(self) -> list[str]:
        """Plain argv: ``[bwrap, *options, "--", *command]``."""
        return [self.bwrap, *self.options, "--", *self.command]

    def argv_with_args_fd(self, fd: int) -> tuple[list[str], bytes]:
        """argv that makes bwrap read its options from ``fd`` (``--args``),
        and the bytes to write there (NUL-terminated options).

        bwrap blocks reading ``fd`` before it creates anything, which is the
        window to move it into its cgroup (``Cgroup.add_pid``); write the bytes
        and close the write end afterwards.  (bwrap only takes *options* from
        ``--args``, the command has to stay on the real command line.)
        """
        payload = b"".join(os.fsencode(o) + b"\0" for o in self.options)
        return [self.bwrap, "--args", str(fd), "--", *self.command], payload


def build_argv(spec: BwrapSpec) -> list[str]:
    """``build(spec).argv()``."""
    return build(spec).argv()


def build(spec: BwrapSpec) -> BwrapCommand:
    """Turn ``spec`` into the bwrap command line.  The sandbox it describes:

    * new user, pid, net (only ``lo``), ipc, uts (``--hostname``) and cgroup
      namespaces; nested user namespaces disabled (``--disable-userns``)
      unless ``nested_userns``;
    * runs as ``spec.uid``/``spec.gid`` with no capabilities (``--cap-drop
      ALL``), ``no_new_privs`` (bwrap sets it), a new session and SIGKILL when
      bwrap's parent dies;
    * a root of its own: a tmpfs that is remounted read-only once built,
      holding ``/usr`` (read-only) with ``/bin /lib /lib64 /sbin`` as they are
      on the host (host symlinks such as ``/bin -> usr/bin`` become
      ``--symlink``), a handful of read-only ``/etc`` files, generated
      ``/etc/passwd``, ``/etc/group``, ``/etc/hosts`` (see ``etc_files``), a
      fresh ``/proc`` (only the sandbox's pids), a minimal read-only ``/dev``
      with a size-capped ``/dev/shm``, a size-capped tmpfs ``/tmp``, the code
      read-only at ``/var/task`` and optionally the runtime API socket at
      ``/run/impuls/runtime.sock``;
    * the seccomp filter of ``impuls.sandbox.namespace.seccomp`` (installed
      by bwrap on the command and on its pid-1 reaper);
    * ``--clearenv`` plus exactly ``spec.env``; working directory ``/var/task``.

    Raises ``BwrapConfigError`` for a spec that cannot work (relative or
    forbidden paths, missing code dir or socket, bad env names, NUL bytes...).
    """
    if not spec.command or not spec.command[0].startswith("/"):
        raise BwrapConfigError("command must be a non-empty argv with an absolute path")
    if spec.tmp_mb < 1 or spec.shm_mb < 0:
        raise BwrapConfigError("tmp_mb must be >= 1 and shm_mb >= 0")
    if spec.uid <= 0 or spec.gid <= 0:
        raise BwrapConfigError("the sandbox must run as a non-root uid/gid")
    code_dir = None if spec.code_dir is None else _abs(spec.code_dir, "code_dir")
    if code_dir is not None and not os.path.isdir(code_dir):
        raise BwrapConfigError(f"code directory {code_dir} does not exist")
    for cap in spec.cap_add:
        if not (cap == "ALL" or (cap.startswith("CAP_") and cap[4:].replace("_", "").isalnum())):
            raise BwrapConfigError(f"invalid capability name {cap!r}")

    o: list[str] = [
        "--unshare-user", "--uid", str(spec.uid), "--gid", str(spec.gid),
        *(() if spec.nested_userns else ("--disable-userns",)),
        "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname", spec.hostname,
        # --die-with-parent is PR_SET_PDEATHSIG, which fires when the *thread*
        # that forked bwrap exits: spawn from a long-lived thread (the event
        # loop), not from a short-lived worker thread.  --new-session: no
        # TIOCSTI into the caller's terminal.
        "--die-with-parent", "--new-session",
        "--cap-drop", "ALL",
    ]
    for cap in spec.cap_add:
        o += ["--cap-add", cap]
    o += ["--clearenv"]
    for key, value in spec.env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise BwrapConfigError(f"invalid environment variable {key!r}")
        o += ["--setenv", key, value]

    try:
        o += _host_path_ops([*BASE_HOST_PATHS, *BASE_ETC_PATHS, *spec.host_paths])
    except OSError as exc:
        raise BwrapConfigError(f"cannot inspect host path: {exc}") from exc
    o += ["--proc", "/proc", "--dev", "/dev"]
    if spec.shm_mb:
        o += ["--size", str(spec.shm_mb * 1024 * 1024), "--tmpfs", "/dev/shm"]
    # bwrap's /dev is a tmpfs the sandbox uid could fill: make it read-only
    # (device nodes stay writable, /dev/shm and /dev/pts are mounts of their own).
    o += ["--remount-ro", "/dev",
          "--size", str(spec.tmp_mb * 1024 * 1024), "--tmpfs", "/tmp"]
    o += ["--dir", TASK_DIR] if code_dir is None else ["--ro-bind", code_dir, TASK_DIR]
    if spec.runtime_socket is not None:
        sock = _abs(spec.runtime_socket, "runtime_socket")
        if not os.path.exists(sock):
            raise BwrapConfigError(f"runtime socket {sock} does not exist")
        o += ["--ro-bind", sock, RUNTIME_SOCKET]
    for dest, fd in sorted(spec.data_fds.items()):
        dest = _abs(dest, "data_fds destination")
        if dest == RUNTIME_SOCKET and spec.runtime_socket is None:
            # A mount point must be a real file: a bind of bwrap's (unlinked)
            # data file cannot be mounted over (ENOENT).
            o += ["--perms", "0444", "--file", str(int(fd)), dest]
            continue
        if _under(dest, ("/proc", "/dev", "/tmp", TASK_DIR, "/run/impuls")):
            raise BwrapConfigError(f"data file destination {dest} is reserved")
        o += ["--perms", "0444", "--ro-bind-data", str(int(fd)), dest]
    # Everything is in place: freeze the root tmpfs (non-recursive: /tmp stays rw).
    o += ["--remount-ro", "/"]
    if spec.seccomp_fd is not None:
        o += ["--seccomp", str(int(spec.seccomp_fd))]
    o += ["--chdir", TASK_DIR]

    if any("\0" in a for a in (*o, *spec.command)):
        raise BwrapConfigError("NUL byte in the bwrap command line")
    return BwrapCommand(spec.bwrap, tuple(o), tuple(spec.command))


def etc_files(uid: int = 993, gid: int = 993, hostname: str = "impuls",
              user: str = "sbx_user1051") -> dict[str, bytes]:
    """Generated (not the host's) ``/etc`` files for ``BwrapSpec.data_fds``:
    passwd/group with the sandbox user and ``nobody`` (the overflow id that
    unmapped owners show up as), hosts with localhost and the hostname, and
    an nsswitch.conf that only consults those files."""
    return {
        "/etc/passwd": (f"{user}:x:{uid}:{gid}::/tmp:/usr/sbin/nologin\n"
                        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n").encode(),
        "/etc/group": f"{user}:x:{gid}:\nnogroup:x:65534:\n".encode(),
        "/etc/hosts": f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost\n".encode(),
        "/etc/nsswitch.conf": b"passwd: files\ngroup: files\nhosts: files\n",
    }


def data_fd(data: bytes, name: str = "impuls-bwrap") -> int:
    """A fresh (close-on-exec, so pass it with ``pass_fds``) memfd holding
    ``data``, positioned at 0, for ``--seccomp``/``--ro-bind-data``.  One
    per bwrap run: bwrap reads it to EOF.  Raises ``BwrapConfigError``."""
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    except OSError as exc:
        raise BwrapConfigError(f"memfd_create failed: {exc}") from exc
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError as exc:
        os.close(fd)
        raise BwrapConfigError(f"cannot fill memfd: {exc}") from exc
    return fd


# --- helpers -----------------------------------------------------------------------


def _abs(path: str, what: str) -> str:
    if not path.startswith("/") or "\0" in path:
        raise BwrapConfigError(f"{what} must be an absolute path, not {path!r}")
    return os.path.normpath(path)


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _forbidden(path: str) -> bool:
    return path in _FORBIDDEN_EXACT or _under(path, _FORBIDDEN_TREES)


def _host_path_ops(paths: Sequence[str]) -> list[str]:
    """--ro-bind / --symlink ops exposing ``paths`` read-only at the same place.

    A path already visible through another bound path is skipped; a symlink
    is recreated with its target text, and its resolved target is bound too
    unless already covered.  Binds come out parents first, symlinks last.
    """
    binds: list[str] = []
    links: list[tuple[str, str]] = []
    wanted = []
    for p in paths:
        p = _abs(p, "host path")
        if _forbidden(p) or _under(p, _RESERVED):
            raise BwrapConfigError(f"host path {p} may not be exposed")
        wanted.append(p)

    for p in wanted:
        if not os.path.lexists(p):
            continue
        if os.path.islink(p):
            links.append((os.readlink(p), p))
            real = os.path.realpath(p)
            if _forbidden(real):
                raise BwrapConfigError(f"host path {p} points to {real}, which may not be exposed")
            if os.path.exists(real):
                binds.append(real)
        else:
            binds.append(p)

    kept: list[str] = []
    for b in sorted(set(binds), key=lambda s: (s.count("/"), s)):
        if not _under(b, kept):
            kept.append(b)
    ops: list[str] = []
    for b in kept:
        ops += ["--ro-bind", b, b]
    seen = set()
    for target, p in links:
        if p in seen or _under(p, kept):
            continue
        seen.add(p)
        ops += ["--symlink", target, p]
    return ops
