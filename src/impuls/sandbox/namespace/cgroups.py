"""Per-instance cgroups of the ``namespace`` sandbox, on cgroup v1 or v2.

One instance gets one cgroup (one directory per v1 hierarchy) with a hard
memory limit (no swap), a pids limit and a proportional CPU weight.
:func:`detect` returns the host's :class:`CgroupV1Host` or
:class:`CgroupV2Host`, whose ``create`` makes a :class:`CgroupV1` or
:class:`CgroupV2`.  Every public method raises ``CgroupError`` (never a bare
``OSError``) when the kernel says no, and blocks (file I/O on cgroupfs,
short sleeps): from async code, call it through a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from impuls.errors import SandboxStartFailed

__all__ = ["Cgroup", "CgroupError", "CgroupHost", "CgroupV1", "CgroupV1Host", "CgroupV2",
           "CgroupV2Host", "detect"]

CGROUP_ROOT = "/sys/fs/cgroup"
PARENT_NAME = "impuls"
_V1_REQUIRED = ("memory", "pids", "cpu")
_V2_CONTROLLERS = ("memory", "pids", "cpu")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


class CgroupError(SandboxStartFailed):
    """A cgroup could not be set up, inspected, emptied or removed."""


# --- detection -----------------------------------------------------------------


def detect(root: str = CGROUP_ROOT, parent: str = PARENT_NAME) -> CgroupHost | None:
    """Find the cgroup version in use and prepare the Impuls parent cgroup(s).

    Returns ``None`` when the host has no usable cgroups: neither a cgroup2
    mount at ``root`` whose ``cgroup.controllers`` offers memory, pids and
    cpu, nor separately mounted v1 memory, pids and cpu hierarchies.  (A
    "hybrid" host -- v1 controllers plus an empty cgroup2 at
    ``root/unified`` -- counts as v1.)

    ``parent`` may be nested (``impuls/<server>``: one parent per server, so
    that one server's ``reap_stale`` never touches another's instances).

    Side effects: creates the parent directories (see the host classes) and,
    on v2, enables ``+memory +pids +cpu`` in ``cgroup.subtree_control`` of
    the root, of every level down to the parent, and of the parent.  Raises
    ``CgroupError`` when cgroups are there but cannot be prepared (not root,
    read-only cgroupfs, or -- on v2 -- a non-root cgroup that still holds
    processes, which the kernel's "no internal processes" rule forbids from
    delegating controllers).
    """
    try:
        mounts = _cgroup_mounts()
    except OSError as exc:
        raise CgroupError(f"cannot read /proc/self/mountinfo: {exc}") from exc
    root = os.path.normpath(root)
    host = _v2_host(mounts, root, parent) or _v1_host(mounts, parent)
    if host is None:
        return None
    try:
        host._make_parents(root)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EBUSY:
            hint = (" (cgroup v2 cannot enable controllers for children of a"
                    " cgroup that holds processes: run the server in a leaf cgroup"
                    " of a delegated subtree)")
        raise CgroupError(f"cannot prepare the impuls cgroup parent: {exc}{hint}") from exc
    return host


def _v2_host(mounts: dict[tuple[str, str], str], root: str, parent: str) -> CgroupV2Host | None:
    """The v2 host when ``root`` is a cgroup2 mount offering every controller we need."""
    if mounts.get(("cgroup2", "")) != root or \
            not os.path.exists(os.path.join(root, "cgroup.controllers")):
        return None
    try:
        available = _read_words(os.path.join(root, "cgroup.controllers"))
    except OSError as exc:
        raise CgroupError(f"cannot read {root}/cgroup.controllers: {exc}") from exc
    if not all(c in available for c in _V2_CONTROLLERS):
        return None
    return CgroupV2Host({"unified": os.path.join(root, parent)})


def _v1_host(mounts: dict[tuple[str, str], str], parent: str) -> CgroupV1Host | None:
    """The v1 host when memory, pids and cpu hierarchies are mounted (freezer: if it is)."""
    v1 = {c: mounts.get(("cgroup", c)) for c in (*_V1_REQUIRED, "freezer")}
    if not all(v1[c] for c in _V1_REQUIRED):
        return None
    parents: dict[str, str] = {}
    for ctrl, mnt in v1.items():
        if mnt is None:
            continue
        path = os.path.join(mnt, parent)
        if path not in parents.values():  # co-mounted controllers share a dir
            parents[ctrl] = path
    return CgroupV1Host(parents)


def _cgroup_mounts() -> dict[tuple[str, str], str]:
    """{("cgroup2", ""): mountpoint, ("cgroup", controller): mountpoint, ...}.

    The first mount wins, except that a mount whose root is "/" (the whole
    hierarchy, not a bind of a sub-cgroup) is preferred.
    """
    found: dict[tuple[str, str], tuple[bool, str]] = {}
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields, post_fields = pre.split(), post.split()
            if len(fields) < 5 or len(post_fields) < 3:
                continue
            fstype, super_opts = post_fields[0], post_fields[2]
            whole = fields[3] == "/"
            mountpoint = _unescape(fields[4])
            if fstype == "cgroup2":
                keys = [("cgroup2", "")]
            elif fstype == "cgroup":
                keys = [("cgroup", opt) for opt in super_opts.split(",")]
            else:
                continue
            for key in keys:
                prev = found.get(key)
                if prev is None or (whole and not prev[0]):
                    found[key] = (whole, mountpoint)
    return {k: v[1] for k, v in found.items()}


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


# --- host ------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupHost(ABC):
    """The cgroup setup of this host: its version and the Impuls parent cgroup(s).

    ``parents`` maps a hierarchy to the Impuls parent directory in it.  Usage::

        host = detect()                       # None: no usable cgroups on this host
        cg = host.create("i-1234", memory_mb=128, pids_max=64, cpu_weight=100)
        ... start the process *inside* the cgroup (Cgroup.add_pid) ...
        cg.oom_killed(); cg.memory_current()
        cg.remove()                           # kills what is left, then rmdir; idempotent
        host.reap_stale(keep={...})           # at server start: clean up after a crash
    """

    parents: dict[str, str]
    version: ClassVar[Literal["v1", "v2"]]
    _cgroup_class: ClassVar[type[Cgroup]]

    @property
    def parent_paths(self) -> list[str]:
        return list(self.parents.values())

    @abstractmethod
    def _make_parents(self, root: str) -> None:
        """Create the parent directories (``detect`` turns an ``OSError`` into ``CgroupError``)."""

    def create(self, name: str, memory_mb: int, pids_max: int, cpu_weight: int) -> Cgroup:
        """Create the cgroup of one instance and set its limits.

        * ``memory_mb``: hard limit, swap excluded.
        * ``pids_max``: ``pids.max`` (tasks, i.e. threads count too).
        * ``cpu_weight``: 1..10000, proportional (v2 ``cpu.weight``, default
          100).  The caller makes it proportional to the memory size, as
          Lambda does.

        (How each version writes them: ``CgroupV1``/``CgroupV2._write_limits``.)
        ``name`` must be new (``[A-Za-z0-9][A-Za-z0-9_.-]*``, <= 200 chars);
        ``CgroupError`` if it exists already or a write fails, in which case
        nothing is left behind; ``ValueError`` for arguments that can never work.
        """
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid cgroup name {name!r}")
        if not 1 <= cpu_weight <= 10000:
            raise ValueError(f"cpu_weight must be 1..10000, not {cpu_weight}")
        if memory_mb < 1 or pids_max < 1:
            raise ValueError("memory_mb and pids_max must be >= 1")

        cg = self._cgroup(name)
        created: list[str] = []
        try:
            for path in cg.paths.values():
                os.mkdir(path, 0o755)
                created.append(path)
            cg._write_limits(memory_mb * 1024 * 1024, pids_max, cpu_weight)
        except OSError as exc:
            for path in reversed(created):
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            what = "already exists" if exc.errno == errno.EEXIST else f"failed: {exc}"
            raise CgroupError(f"creating cgroup {name!r} {what}") from exc
        return cg

    def reap_stale(self, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Kill and remove every instance cgroup under the Impuls parent(s)
        whose name is not in ``keep``; return the removed names (sorted).

        Meant for server start after a crash.  Best effort over all leftovers;
        raises one ``CgroupError`` at the end naming those that could not be
        removed.
        """
        names: set[str] = set()
        for parent in self.parents.values():
            try:
                with os.scandir(parent) as it:
                    names.update(e.name for e in it if e.is_dir(follow_symlinks=False))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise CgroupError(f"cannot list {parent}: {exc}") from exc
        removed, failed = [], []
        for name in sorted(names - set(keep)):
            try:
                self._cgroup(name).remove()
                removed.append(name)
            except CgroupError as exc:
                failed.append(f"{name}: {exc}")
        if failed:
            raise CgroupError("could not reap stale cgroups: " + "; ".join(failed))
        return removed

    def _cgroup(self, name: str) -> Cgroup:
        return self._cgroup_class(name, {c: os.path.join(p, name) for c, p in self.parents.items()})


# --- one instance ---------------------------------------------------------------


@dataclass
class Cgroup(ABC):
    """The cgroup (one directory per v1 hierarchy, one on v2) of one instance.

    ``paths`` maps each hierarchy of the host's ``parents`` to this cgroup's
    directory in it.
    """

    name: str
    paths: dict[str, str]
    version: ClassVar[Literal["v1", "v2"]]
    #: the hierarchy (key of ``paths``) that holds the pids controller's files
    _pids_hierarchy: ClassVar[str]
    _procs_b: tuple[bytes, ...] = field(init=False, repr=False)
    _events_fd: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Encoded once so join_self() does nothing but open/write/close.
        self._procs_b = tuple(os.fsencode(p) for p in self.procs_paths)

    @property
    def procs_paths(self) -> list[str]:
        """The ``cgroup.procs`` files a process must be written into (one per
        v1 hierarchy, a single one on v2)."""
        return [os.path.join(p, "cgroup.procs") for p in self.paths.values()]

    def join_self(self) -> None:
        """Move the calling process into this cgroup.

        Meant for the child between fork and exec (``preexec_fn=cg.join_self``):
        only ``os.open``/``os.write``/``os.close`` of pre-encoded paths, writing
        "0" (= the writer's own thread group).  It works, but ``preexec_fn``
        runs Python between fork and exec, which CPython documents as unsafe
        when the parent has threads: prefer ``add_pid``.  Raises ``CgroupError``.
        """
        try:
            for path in self._procs_b:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)
        except OSError as exc:
            raise CgroupError(f"cannot join cgroup {self.name!r}: {exc}") from exc

    def add_pid(self, pid: int) -> None:
        """Move process ``pid`` (its whole thread group) into this cgroup.

        Only the process itself moves; children it already forked stay where
        they are -- call this before the process forks.  The way to have a
        sandbox inside its cgroup before any untrusted code runs, with no
        Python in the forked child: start ``bwrap --args FD``.  bwrap reads its
        options from FD before doing anything else (no namespace, no child
        yet), so the parent can ``add_pid(proc.pid)`` and only then write the
        options into the pipe and close it; everything bwrap forks afterwards
        is born inside the cgroup.
        """
        try:
            for path in self._procs_b:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, str(pid).encode())
                finally:
                    os.close(fd)
        except OSError as exc:
            raise CgroupError(f"cannot move pid {pid} into cgroup {self.name!r}: {exc}") from exc

    def set_limits(self, memory_mb: int, cpu_weight: int) -> None:
        """Change the memory limit and CPU weight (same meaning as in
        ``CgroupHost.create``), e.g. of a cgroup created ahead of time.

        A memory limit below the current usage fails.  Raises ``CgroupError``;
        ``ValueError`` for impossible values.
        """
        if memory_mb < 1 or not 1 <= cpu_weight <= 10000:
            raise ValueError("memory_mb must be >= 1 and cpu_weight 1..10000")
        try:
            self._set_limits(memory_mb * 1024 * 1024, cpu_weight)
        except (OSError, ValueError) as exc:
            raise CgroupError(f"cannot set the limits of cgroup {self.name!r}: {exc}") from exc

    def pids(self) -> set[int]:
        """Pids currently in the cgroup (union over the v1 hierarchies)."""
        try:
            return self._pids()
        except OSError as exc:
            raise CgroupError(f"cannot list processes of cgroup {self.name!r}: {exc}") from exc

    def oom_killed(self) -> bool:
        """True if the kernel OOM killer killed something in this cgroup."""
        try:
            return self._oom_killed()
        except (OSError, ValueError) as exc:
            raise CgroupError(f"cannot read OOM state of cgroup {self.name!r}: {exc}") from exc

    def pids_limit_hits(self) -> int:
        """How often a fork failed because of ``pids.max`` (``pids.events``
        ``max``; 0 when the kernel does not count it).  Cheap enough to ask
        after every invocation: the file stays open (``close_files``)."""
        try:
            if self._events_fd is None:
                path = os.path.join(self.paths[self._pids_hierarchy], "pids.events")
                self._events_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            data = os.pread(self._events_fd, 256, 0)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise CgroupError(f"cannot read pids.events of cgroup {self.name!r}: {exc}") from exc
        for line in data.split(b"\n"):
            if line.startswith(b"max "):
                return int(line[4:])
        return 0

    def close_files(self) -> None:
        """Close what ``pids_limit_hits`` keeps open (``remove`` does it too)."""
        if self._events_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._events_fd)
            self._events_fd = None

    def memory_current(self) -> int:
        """Bytes charged to the cgroup now (includes page cache and tmpfs pages)."""
        try:
            return self._memory_current()
        except (OSError, ValueError) as exc:
            raise CgroupError(f"cannot read memory usage of cgroup {self.name!r}: {exc}") from exc

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the cgroup and wait until it is empty.

        Unless the kernel can kill the whole cgroup at once (v2
        ``cgroup.kill``), the cgroup is frozen first when it can be, so that
        a fork loop cannot outrun the killer; every pid is SIGKILLed (through
        a pidfd, after re-checking that the pid is still a member, so a
        recycled pid is never hit), the cgroup is thawed, and this repeats
        until ``cgroup.procs`` is empty.  A cgroup that does not exist (any
        more) counts as empty.  ``CgroupError`` if processes are still there
        after ``timeout`` seconds (e.g. stuck in D state).  Zombies do not
        count: a killed child of the caller is gone from the cgroup even
        before the caller reaps it.
        """
        try:
            self._kill_all(time.monotonic() + timeout)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise CgroupError(f"cannot kill processes of cgroup {self.name!r}: {exc}") from exc

    def remove(self, timeout: float = 5.0) -> None:
        """Kill everything inside, then rmdir the cgroup directories
        (deepest first, retrying ``EBUSY`` for up to ``timeout`` s).
        Idempotent: removing a removed cgroup is a no-op."""
        self.close_files()
        if not any(os.path.isdir(p) for p in self.paths.values()):
            return
        deadline = time.monotonic() + timeout
        self.kill_all(timeout)
        for path in self.paths.values():
            try:
                _rmdir_tree(path, deadline)
            except OSError as exc:
                raise CgroupError(f"cannot remove cgroup {path}: {exc}") from exc

    # -- what each version does its own way (OSError/ValueError: the callers wrap them) --

    @abstractmethod
    def _write_limits(self, memory: int, pids_max: int, cpu_weight: int) -> None:
        """Set the limits (memory in bytes) of the newly created cgroup (``CgroupHost.create``)."""

    @abstractmethod
    def _set_limits(self, memory: int, cpu_weight: int) -> None:
        """Change the memory limit (bytes) and CPU weight (``set_limits``)."""

    @abstractmethod
    def _oom_killed(self) -> bool: ...

    @abstractmethod
    def _memory_current(self) -> int: ...

    @abstractmethod
    def _freezer(self) -> tuple[str, str, str] | None:
        """(state file, value that freezes, value that thaws); None: cannot be frozen."""

    @abstractmethod
    def _is_frozen(self) -> bool: ...

    # -- internals --

    def _pids(self) -> set[int]:
        pids: set[int] = set()
        for path in self.procs_paths:
            try:
                with open(path) as f:
                    pids.update(int(x) for x in f.read().split())
            except FileNotFoundError:
                continue
        return pids

    def _kill_all(self, deadline: float) -> None:
        freezer = self._freezer()
        if freezer is not None and self._pids():
            state_file, frozen, thawed = freezer
            _write(state_file, frozen)
            try:
                self._wait_frozen(min(deadline, time.monotonic() + 0.5))
                self._signal_members()
            finally:
                _write(state_file, thawed)
        self._wait_empty(deadline, signal_again=True)

    def _wait_frozen(self, until: float) -> None:
        """Wait (bounded) for the freeze to complete; a task in D state can
        keep it in FREEZING, and then we kill anyway."""
        while time.monotonic() < until:
            if self._is_frozen():
                return
            time.sleep(0.001)

    def _signal_members(self) -> None:
        pids = self._pids()
        if not pids:
            return
        pidfds: dict[int, int] = {}
        try:
            for pid in pids:
                try:
                    pidfds[pid] = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue
                except (AttributeError, OSError):  # no pidfd support: plain kill below
                    pidfds[pid] = -1
            still = self._pids()  # a pid opened above and still listed is ours
            for pid, fd in pidfds.items():
                if pid not in still:
                    continue
                try:
                    if fd >= 0:
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            for fd in pidfds.values():
                if fd >= 0:
                    os.close(fd)

    def _wait_empty(self, deadline: float, signal_again: bool) -> None:
        delay = 0.001
        while True:
            if not self._pids():
                return
            if time.monotonic() >= deadline:
                raise CgroupError(
                    f"cgroup {self.name!r} still has processes {sorted(self._pids())} "
                    "after SIGKILL")
            if signal_again:
                self._signal_members()
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


# --- cgroup v2 ---------------------------------------------------------------------


class CgroupV2(Cgroup):
    """One directory, ``paths["unified"]``, holding every controller's files."""

    version = "v2"
    _pids_hierarchy = "unified"

    def _write_limits(self, memory: int, pids_max: int, cpu_weight: int) -> None:
        d = self.paths["unified"]
        _write(os.path.join(d, "memory.max"), str(memory))
        _write_if_exists(os.path.join(d, "memory.swap.max"), "0")
        _write_if_exists(os.path.join(d, "memory.oom.group"), "1")  # an OOM kill takes it all
        _write(os.path.join(d, "pids.max"), str(pids_max))
        _write(os.path.join(d, "cpu.weight"), str(cpu_weight))

    def _set_limits(self, memory: int, cpu_weight: int) -> None:
        d = self.paths["unified"]
        _write(os.path.join(d, "memory.max"), str(memory))
        _write(os.path.join(d, "cpu.weight"), str(cpu_weight))

    def _oom_killed(self) -> bool:
        events = _read_keyed(os.path.join(self.paths["unified"], "memory.events"))
        return events.get("oom_kill", 0) > 0

    def _memory_current(self) -> int:
        with open(os.path.join(self.paths["unified"], "memory.current")) as f:
            return int(f.read().strip())

    def _kill_all(self, deadline: float) -> None:
        d = self.paths["unified"]
        if not os.path.isdir(d):
            return
        kill_file = os.path.join(d, "cgroup.kill")
        if os.path.exists(kill_file):  # Linux 5.14+: the kernel kills them all at once
            _write(kill_file, "1")
            self._wait_empty(deadline, signal_again=False)
            return
        super()._kill_all(deadline)

    def _freezer(self) -> tuple[str, str, str] | None:
        freeze_file = os.path.join(self.paths["unified"], "cgroup.freeze")
        return (freeze_file, "1", "0") if os.path.exists(freeze_file) else None

    def _is_frozen(self) -> bool:
        return _read_keyed(os.path.join(self.paths["unified"], "cgroup.events")).get("frozen", 0) == 1


class CgroupV2Host(CgroupHost):
    """A cgroup v2 host: ``parents == {"unified": "/sys/fs/cgroup/impuls"}``
    (instances at ``/sys/fs/cgroup/impuls/<name>``)."""

    version = "v2"
    _cgroup_class = CgroupV2

    def _make_parents(self, root: str) -> None:
        # The parent may be nested ("impuls/<server>"): every level between
        # the root and it must delegate the controllers.
        current = root
        for part in os.path.relpath(self.parents["unified"], root).split(os.sep):
            _enable_controllers(current)
            current = os.path.join(current, part)
            os.makedirs(current, exist_ok=True)
        _enable_controllers(current)


def _enable_controllers(path: str) -> None:
    enabled = _read_words(os.path.join(path, "cgroup.subtree_control"))
    for ctrl in _V2_CONTROLLERS:
        if ctrl not in enabled:
            _write(os.path.join(path, "cgroup.subtree_control"), "+" + ctrl)


# --- cgroup v1 ---------------------------------------------------------------------


class CgroupV1(Cgroup):
    """One directory per hierarchy: ``paths["memory"]``, ``["pids"]``, ``["cpu"]``
    and ``["freezer"]`` when the freezer is mounted."""

    version = "v1"
    _pids_hierarchy = "pids"

    def _write_limits(self, memory: int, pids_max: int, cpu_weight: int) -> None:
        # No swap: memory+swap limited to the same value when swap accounting
        # exists, else swappiness 0 (best effort).
        limit = str(memory)
        mem = self.paths["memory"]
        _write(os.path.join(mem, "memory.limit_in_bytes"), limit)
        if not _write_if_exists(os.path.join(mem, "memory.memsw.limit_in_bytes"), limit):
            _write_if_exists(os.path.join(mem, "memory.swappiness"), "0")
        _write(os.path.join(self.paths["pids"], "pids.max"), str(pids_max))
        _write(os.path.join(self.paths["cpu"], "cpu.shares"), str(_shares(cpu_weight)))

    def _set_limits(self, memory: int, cpu_weight: int) -> None:
        # memory.memsw.limit_in_bytes (when present) stays equal to the memory
        # limit; the kernel never lets it be below it, so which one is written
        # first depends on whether the limit goes up or down.
        limit = str(memory)
        mem = self.paths["memory"]
        files = [os.path.join(mem, "memory.limit_in_bytes")]
        memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
        if os.path.exists(memsw):
            with open(files[0]) as f:
                raising = int(f.read().strip()) < memory
            files = [memsw, *files] if raising else [*files, memsw]
        for path in files:
            _write(path, limit)
        _write(os.path.join(self.paths["cpu"], "cpu.shares"), str(_shares(cpu_weight)))

    def _oom_killed(self) -> bool:
        # memory.oom_control has oom_kill since kernel 4.13; before that,
        # under_oom or memory.failcnt > 0 (failcnt also counts limit hits that
        # reclaim resolved, so it is only a fallback).
        mem = self.paths["memory"]
        ctl = _read_keyed(os.path.join(mem, "memory.oom_control"))
        if "oom_kill" in ctl:
            return ctl["oom_kill"] > 0
        if ctl.get("under_oom", 0) > 0:
            return True
        with open(os.path.join(mem, "memory.failcnt")) as f:
            return int(f.read().strip() or 0) > 0

    def _memory_current(self) -> int:
        with open(os.path.join(self.paths["memory"], "memory.usage_in_bytes")) as f:
            return int(f.read().strip())

    def _freezer(self) -> tuple[str, str, str] | None:
        fz = self.paths.get("freezer")
        if fz is None:
            return None
        state_file = os.path.join(fz, "freezer.state")
        return (state_file, "FROZEN", "THAWED") if os.path.exists(state_file) else None

    def _is_frozen(self) -> bool:
        with open(os.path.join(self.paths["freezer"], "freezer.state")) as f:
            return f.read().strip() == "FROZEN"


class CgroupV1Host(CgroupHost):
    """A cgroup v1 host: ``parents`` maps ``memory``, ``pids``, ``cpu`` (and
    ``freezer`` when mounted) to ``/sys/fs/cgroup/<controller>/impuls``
    (instances at ``/sys/fs/cgroup/<controller>/impuls/<name>``)."""

    version = "v1"
    _cgroup_class = CgroupV1

    def _make_parents(self, root: str) -> None:
        for path in self.parents.values():
            os.makedirs(path, exist_ok=True)


def _shares(cpu_weight: int) -> int:
    """v1 ``cpu.shares`` for a v2-style weight: ``weight * 1024 / 100``
    clamped to 2..262144 (systemd's mapping)."""
    return max(2, min(262144, cpu_weight * 1024 // 100))


# --- small file helpers ------------------------------------------------------------


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _write_if_exists(path: str, value: str) -> bool:
    try:
        _write(path, value)
    except FileNotFoundError:
        return False
    return True


def _read_words(path: str) -> set[str]:
    with open(path) as f:
        return set(f.read().split())


def _read_keyed(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                with contextlib.suppress(ValueError):
                    out[parts[0]] = int(parts[1])
    return out


def _rmdir_tree(path: str, deadline: float) -> None:
    """rmdir ``path`` and any sub-cgroups, deepest first, retrying EBUSY."""
    if not os.path.isdir(path):
        return
    dirs = [root for root, _, _ in os.walk(path, topdown=False)]
    for d in dirs:
        delay = 0.001
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
