"""The machine description, and per-process CPU time and memory read from /proc."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parents[1]


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_total_gib() -> float:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def distro() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.system()


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def machine(runtime_versions: dict[str, str], wrk: str) -> dict[str, str]:
    cores = os.cpu_count() or 0
    hypervisor = any(line.startswith("flags") and " hypervisor" in line
                     for line in _read("/proc/cpuinfo").splitlines())
    return {
        "cpu": f"{cpu_model()}, {cores} logical CPUs" + (" (virtual machine)" if hypervisor else ""),
        "cores": str(cores),
        "ram": f"{mem_total_gib():.1f} GiB",
        "kernel": f"Linux {platform.release()}",
        "os": distro(),
        "python (harness, server)": platform.python_version(),
        **runtime_versions,
        "load generator": wrk,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git commit": git_commit(),
    }


# --- processes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    own_ticks: int  # utime + stime
    children_ticks: int  # cutime + cstime (reaped children)


def _stat(pid: int) -> ProcStat | None:
    raw = _read(f"/proc/{pid}/stat")
    if not raw:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # after "pid (comm) "
    return ProcStat(pid, int(fields[1]), int(fields[11]) + int(fields[12]),
                    int(fields[13]) + int(fields[14]))


def _children_map() -> dict[int, list[int]]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                parents.setdefault(st.ppid, []).append(st.pid)
    return parents


def _subtree(children: dict[int, list[int]], root: int) -> list[int]:
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (not ``root`` itself)."""
    return _subtree(_children_map(), root)


@dataclass(frozen=True)
class InstanceMemory:
    instances: dict[str, list[int]]  # mark -> PSS (KiB) of each instance's processes
    shared_kib: int  # processes below the server that belong to no single instance (templates, spares)


def instance_memory(server: int, marks: list[str]) -> InstanceMemory:
    """PSS per instance: each runtime process (its command line contains one of ``marks``) with the
    largest ancestor chain below ``server`` that holds no other runtime (e.g. its sandbox's init)."""
    children = _children_map()
    parent = {c: p for p, kids in children.items() for c in kids}
    below = _subtree(children, server)
    runtime_of = {pid: m for pid in below for m in marks if m in cmdline(pid)}

    def runtimes_under(pid: int) -> int:
        return sum(1 for p in [pid, *_subtree(children, pid)] if p in runtime_of)

    sizes: dict[str, list[int]] = {m: [] for m in marks}
    owned: set[int] = set()
    for pid, mark in runtime_of.items():
        top = pid
        while parent.get(top, server) != server and runtimes_under(parent[top]) == 1:
            top = parent[top]
        members = [top, *_subtree(children, top)]
        owned.update(members)
        sizes[mark].append(sum(pss_kib(p) or 0 for p in members))
    shared = sum(pss_kib(p) or 0 for p in below if p not in owned)
    return InstanceMemory(sizes, shared)


@dataclass(frozen=True)
class CpuSample:
    server_s: float  # the server process itself
    others_s: float  # everything below it: runtimes, sandbox helpers, reaped children


def cpu_sample(root: int) -> CpuSample:
    """CPU seconds used so far by ``root`` and by everything it started (live or reaped)."""
    top = _stat(root)
    if top is None:
        return CpuSample(0.0, 0.0)
    others = top.children_ticks
    for pid in descendants(root):
        st = _stat(pid)
        if st is not None:
            others += st.own_ticks + st.children_ticks
    return CpuSample(top.own_ticks / CLK_TCK, others / CLK_TCK)


def _ksoftirqd_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _read(f"/proc/{entry}/comm").startswith("ksoftirqd/"):
            pids.append(int(entry))
    return pids


_KSOFTIRQD: list[int] = []


def system_busy_s() -> float:
    """CPU seconds the machine's CPUs spent running processes since boot (user, nice, system, steal),
    less the kernel's network and interrupt work (irq, softirq, ksoftirqd), which is mostly our
    own loopback traffic rather than someone else's load."""
    first = _read("/proc/stat").splitlines()[0].split()  # cpu user nice system idle iowait irq softirq steal
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(x) for x in first[1:9])
    if not _KSOFTIRQD:
        _KSOFTIRQD.extend(_ksoftirqd_pids())
    softirqd = sum(st.own_ticks for pid in _KSOFTIRQD if (st := _stat(pid)) is not None)
    return (user + nice + system + steal - softirqd) / CLK_TCK


def pss_kib(pid: int) -> int | None:
    for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def cmdline(pid: int) -> str:
    return _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()


def ipc_round_trip_us(cpus: tuple[int, int] | None = None, rounds: int = 4000) -> float:
    """Median round trip of 200 bytes between this process and a forked echo child over a unix
    socket pair: the least a hop into a separate runtime process costs on this machine. With
    ``cpus`` the parent runs on the first CPU and the child on the second."""
    import socket
    import statistics
    import time

    saved = os.sched_getaffinity(0)
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echo child: no cleanup handlers, leave with os._exit
        ours.close()
        try:
            if cpus is not None:
                os.sched_setaffinity(0, {cpus[1]})
            while data := theirs.recv(4096):
                theirs.sendall(data)
        finally:
            os._exit(0)
    theirs.close()
    message, times = b"x" * 200, []
    try:
        if cpus is not None:
            os.sched_setaffinity(0, {cpus[0]})
        for _ in range(rounds):
            t0 = time.perf_counter()
            ours.sendall(message)
            ours.recv(4096)
            times.append(time.perf_counter() - t0)
    finally:
        os.sched_setaffinity(0, saved)
        ours.close()
        os.waitpid(pid, 0)
    return statistics.median(times[rounds // 10:]) * 1e6


def ipc_round_trips() -> dict[str, float]:
    """:func:`ipc_round_trip_us` with both processes on one CPU, and on two different CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    out = {"same CPU": ipc_round_trip_us((cpus[0], cpus[0]))}
    if len(cpus) > 1:
        out["across CPUs"] = ipc_round_trip_us((cpus[0], cpus[1]))
    return out
