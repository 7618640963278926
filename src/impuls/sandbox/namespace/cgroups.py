"""Per-instance cgroups for the ``namespace`` sandbox (cgroup v1 and v2).

One instance = one cgroup (one per v1 hierarchy) holding a hard memory limit
(no swap), a pids limit and a proportional CPU weight.  Layout::

    v2: /sys/fs/cgroup/impuls/<name>                      (one directory)
    v1: /sys/fs/cgroup/{memory,pids,cpu}/impuls/<name>    (+ freezer/impuls/<name>
                                                           when the freezer is mounted)

Usage::

    host = detect()                       # None: no usable cgroups on this host
    cg = host.create("i-1234", memory_mb=128, pids_max=64, cpu_weight=100)
    ... start the process *inside* the cgroup (see below) ...
    cg.oom_killed(); cg.memory_current()
    cg.remove()                           # kills what is left, then rmdir; idempotent
    host.reap_stale(keep={...})           # at server start: clean up after a crash

Putting the process in the cgroup before any untrusted code runs -- two ways:

* recommended, no Python in the forked child: start ``bwrap --args FD``.  bwrap
  reads its options from FD before doing anything else (no namespace, no
  child yet), so the parent can ``cg.add_pid(proc.pid)`` and only then write
  the options into the pipe and close it.  Everything bwrap forks afterwards
  is born inside the cgroup.
* ``preexec_fn=cg.join_self`` (plain ``os.open``/``os.write`` of "0" into each
  ``procs_paths`` file).  Works, but ``preexec_fn`` runs Python between fork
  and exec, which CPython documents as unsafe when the parent has threads.

Every public method raises ``CgroupError`` (never a bare ``OSError``) when the
kernel says no; ``ValueError`` for arguments that can never work.  All calls
are blocking (file I/O on cgroupfs, short sleeps in ``kill_all``/``remove``);
from async code call them through a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Literal

from impuls.errors import SandboxStartFailed

__all__ = ["Cgroup", "CgroupError", "CgroupHost", "detect"]

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

    Side effects: creates ``<root>/<parent>`` (v2) or
    ``<root>/<controller>/<parent>`` (v1, plus the freezer if mounted) and,
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

    v2_root = mounts.get(("cgroup2", ""))
    if v2_root == root and os.path.exists(os.path.join(root, "cgroup.controllers")):
        try:
            available = _read_words(os.path.join(root, "cgroup.controllers"))
        except OSError as exc:
            raise CgroupError(f"cannot read {root}/cgroup.controllers: {exc}") from exc
        if all(c in available for c in _V2_CONTROLLERS):
            host = CgroupHost("v2", {"unified": os.path.join(root, parent)})
            host._prepare(root)
            return host

    v1 = {c: mounts.get(("cgroup", c)) for c in (*_V1_REQUIRED, "freezer")}
    if all(v1[c] for c in _V1_REQUIRED):
        parents: dict[str, str] = {}
        for ctrl, mnt in v1.items():
            if mnt is None:
                continue
            path = os.path.join(mnt, parent)
            if path not in parents.values():  # co-mounted controllers share a dir
                parents[ctrl] = path
        host = CgroupHost("v1", parents)
        host._prepare(root)
        return host
    return None


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
class CgroupHost:
    """The cgroup setup of this host: version and the Impuls parent cgroup(s).

    ``parents`` maps a hierarchy to the Impuls parent directory in it:
    ``{"unified": "/sys/fs/cgroup/impuls"}`` on v2,
    ``{"memory": ".../memory/impuls", "pids": ..., "cpu": ..., ["freezer": ...]}``
    on v1.
    """

    version: Literal["v1", "v2"]
    parents: dict[str, str]

    @property
    def parent_paths(self) -> list[str]:
        return list(self.parents.values())

    def _prepare(self, root: str) -> None:
        try:
            if self.version == "v2":
                # The parent may be nested ("impuls/<server>"): every level
                # between the root and it must delegate the controllers.
                current = root
                for part in os.path.relpath(self.parents["unified"], root).split(os.sep):
                    _enable_controllers(current)
                    current = os.path.join(current, part)
                    os.makedirs(current, exist_ok=True)
                _enable_controllers(current)
            else:
                for path in self.parents.values():
                    os.makedirs(path, exist_ok=True)
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EBUSY:
                hint = (" (cgroup v2 cannot enable controllers for children of a"
                        " cgroup that holds processes: run the server in a leaf cgroup"
                        " of a delegated subtree)")
            raise CgroupError(f"cannot prepare the impuls cgroup parent: {exc}{hint}") from exc

    def create(self, name: str, memory_mb: int, pids_max: int, cpu_weight: int) -> Cgroup:
        """Create the cgroup of one instance and set its limits.

        * ``memory_mb``: hard limit, swap excluded.  v1: ``memory.limit_in_bytes``
          and ``memory.memsw.limit_in_bytes`` (memory+swap) to the same value
          when swap accounting exists, else ``memory.swappiness=0`` (best
          effort); v2: ``memory.max``, ``memory.swap.max=0`` and
          ``memory.oom.group=1`` (an OOM kill takes the whole instance).
        * ``pids_max``: ``pids.max`` (tasks, i.e. threads count too).
        * ``cpu_weight``: 1..10000, proportional (v2 ``cpu.weight``, default
          100).  v1 gets ``cpu.shares = weight * 1024 / 100`` (clamped to
          2..262144), the mapping systemd uses.  The caller makes it
          proportional to the memory size, as Lambda does.

        ``name`` must be new (``[A-Za-z0-9][A-Za-z0-9_.-]*``, <= 200 chars);
        ``CgroupError`` if it exists already or a write fails, in which case
        nothing is left behind.
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
            limit = str(memory_mb * 1024 * 1024)
            if self.version == "v2":
                d = cg.paths["unified"]
                _write(os.path.join(d, "memory.max"), limit)
                _write_if_exists(os.path.join(d, "memory.swap.max"), "0")
                _write_if_exists(os.path.join(d, "memory.oom.group"), "1")
                _write(os.path.join(d, "pids.max"), str(pids_max))
                _write(os.path.join(d, "cpu.weight"), str(cpu_weight))
            else:
                mem = cg.paths["memory"]
                _write(os.path.join(mem, "memory.limit_in_bytes"), limit)
                if not _write_if_exists(os.path.join(mem, "memory.memsw.limit_in_bytes"), limit):
                    _write_if_exists(os.path.join(mem, "memory.swappiness"), "0")
                _write(os.path.join(cg.paths["pids"], "pids.max"), str(pids_max))
                _write(os.path.join(cg.paths["cpu"], "cpu.shares"), str(_shares(cpu_weight)))
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
        return Cgroup(self.version, name, {c: os.path.join(p, name) for c, p in self.parents.items()})


# --- one instance ---------------------------------------------------------------


@dataclass
class Cgroup:
    """The cgroup (one directory per v1 hierarchy, one on v2) of one instance."""

    version: Literal["v1", "v2"]
    name: str
    paths: dict[str, str]
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

        Meant for the child between fork and exec (``preexec_fn``): only
        ``os.open``/``os.write``/``os.close`` of pre-encoded paths, writing
        "0" (= the writer's own thread group).  Raises ``CgroupError``.
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
        they are -- call this before the process forks (see module doc).
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

        v1 keeps ``memory.memsw.limit_in_bytes`` (when present) equal to the
        memory limit, writing them in the order the kernel accepts (memsw may
        never be below memory).  A memory limit below the current usage
        fails.  Raises ``CgroupError``; ``ValueError`` for impossible values.
        """
        if memory_mb < 1 or not 1 <= cpu_weight <= 10000:
            raise ValueError("memory_mb must be >= 1 and cpu_weight 1..10000")
        limit = str(memory_mb * 1024 * 1024)
        try:
            if self.version == "v2":
                d = self.paths["unified"]
                _write(os.path.join(d, "memory.max"), limit)
                _write(os.path.join(d, "cpu.weight"), str(cpu_weight))
                return
            mem = self.paths["memory"]
            files = [os.path.join(mem, "memory.limit_in_bytes")]
            memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):
                with open(files[0]) as f:
                    raising = int(f.read().strip()) < int(limit)
                files = [memsw, *files] if raising else [*files, memsw]
            for path in files:
                _write(path, limit)
            _write(os.path.join(self.paths["cpu"], "cpu.shares"), str(_shares(cpu_weight)))
        except (OSError, ValueError) as exc:
            raise CgroupError(f"cannot set the limits of cgroup {self.name!r}: {exc}") from exc

    def pids(self) -> set[int]:
        """Pids currently in the cgroup (union over the v1 hierarchies)."""
        try:
            return self._pids()
        except OSError as exc:
            raise CgroupError(f"cannot list processes of cgroup {self.name!r}: {exc}") from exc

    def oom_killed(self) -> bool:
        """True if the kernel OOM killer killed something in this cgroup.

        v2: ``memory.events`` ``oom_kill`` > 0.  v1: ``memory.oom_control``
        ``oom_kill`` > 0 (kernel >= 4.13); on older kernels without that
        line, ``under_oom`` or ``memory.failcnt`` > 0 (failcnt can also count
        limit hits that reclaim resolved, so it is only a fallback).
        """
        try:
            mem = self.paths["unified" if self.version == "v2" else "memory"]
            if self.version == "v2":
                return _read_keyed(os.path.join(mem, "memory.events")).get("oom_kill", 0) > 0
            ctl = _read_keyed(os.path.join(mem, "memory.oom_control"))
            if "oom_kill" in ctl:
                return ctl["oom_kill"] > 0
            if ctl.get("under_oom", 0) > 0:
                return True
            with open(os.path.join(mem, "memory.failcnt")) as f:
                return int(f.read().strip() or 0) > 0
        except (OSError, ValueError) as exc:
            raise CgroupError(f"cannot read OOM state of cgroup {self.name!r}: {exc}") from exc

    def pids_limit_hits(self) -> int:
        """How often a fork failed because of ``pids.max`` (``pids.events``
        ``max``; 0 when the kernel does not count it).  Cheap enough to ask
        after every invocation: the file stays open (``close_files``)."""
        try:
            if self._events_fd is None:
                path = os.path.join(self.paths["unified" if self.version == "v2" else "pids"],
                                    "pids.events")
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
        """Bytes charged to the cgroup now (v2 ``memory.current``, v1
        ``memory.usage_in_bytes``; includes page cache and tmpfs pages)."""
        try:
            if self.version == "v2":
                path = os.path.join(self.paths["unified"], "memory.current")
            else:
                path = os.path.join(self.paths["memory"], "memory.usage_in_bytes")
            with open(path) as f:
                return int(f.read().strip())
        except (OSError, ValueError) as exc:
            raise CgroupError(f"cannot read memory usage of cgroup {self.name!r}: {exc}") from exc

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the cgroup and wait until it is empty.

        v2: ``cgroup.kill`` when the kernel has it (5.14+).  Otherwise the
        cgroup is frozen first (v2 ``cgroup.freeze``, v1 freezer hierarchy
        when mounted) so a fork loop cannot outrun the killer, every pid is
        SIGKILLed (through a pidfd, after re-checking that the pid is still a
        member, so a recycled pid is never hit), the cgroup is thawed, and
        this repeats until ``cgroup.procs`` is empty.  A cgroup that does not
        exist (any more) counts as empty.  ``CgroupError`` if processes are
        still there after ``timeout`` seconds (e.g. stuck in D state).
        Zombies do not count: a killed child of the caller is gone from the
        cgroup even before the caller reaps it.
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
        if self.version == "v2":
            d = self.paths["unified"]
            if not os.path.isdir(d):
                return
            kill_file = os.path.join(d, "cgroup.kill")
            if os.path.exists(kill_file):
                _write(kill_file, "1")
                self._wait_empty(deadline, signal_again=False)
                return
            freeze_file = os.path.join(d, "cgroup.freeze")
            freeze = ("1", "0") if os.path.exists(freeze_file) else None
        else:
            fz = self.paths.get("freezer")
            freeze_file = os.path.join(fz, "freezer.state") if fz else ""
            freeze = ("FROZEN", "THAWED") if fz and os.path.exists(freeze_file) else None

        if freeze is not None and self._pids():
            _write(freeze_file, freeze[0])
            try:
                self._wait_frozen(freeze_file, min(deadline, time.monotonic() + 0.5))
                self._signal_members()
            finally:
                _write(freeze_file, freeze[1])
        self._wait_empty(deadline, signal_again=True)

    def _wait_frozen(self, state_file: str, until: float) -> None:
        """Wait (bounded) for the freeze to complete; a task in D state can
        keep it in FREEZING, and then we kill anyway."""
        done = "FROZEN" if self.version == "v1" else None
        events = os.path.join(os.path.dirname(state_file), "cgroup.events")
        while time.monotonic() < until:
            if done is not None:
                with open(state_file) as f:
                    if f.read().strip() == done:
                        return
            elif _read_keyed(events).get("frozen", 0) == 1:
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


# --- small file helpers ------------------------------------------------------------


def _shares(cpu_weight: int) -> int:
    """v1 ``cpu.shares`` for a v2-style weight (systemd's mapping)."""
    return max(2, min(262144, cpu_weight * 1024 // 100))


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


def _enable_controllers(path: str) -> None:
    enabled = _read_words(os.path.join(path, "cgroup.subtree_control"))
    for ctrl in _V2_CONTROLLERS:
        if ctrl not in enabled:
            _write(os.path.join(path, "cgroup.subtree_control"), "+" + ctrl)


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
