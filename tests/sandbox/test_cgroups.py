"""Real-cgroup tests of impuls.sandbox.namespace.cgroups (root + cgroup v1 or v2)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from impuls.sandbox.namespace import cgroups
from impuls.sandbox.namespace.cgroups import Cgroup, CgroupError, CgroupHost, CgroupV2Host

PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

pytestmark = pytest.mark.namespace

# A parent of our own, so reap_stale() here never touches a live server's cgroups.
TEST_PARENT = f"impuls-test-{os.getpid()}"


def _rmdir_parents(host: CgroupHost) -> None:
    for p in host.parent_paths:
        with contextlib.suppress(OSError):
            os.rmdir(p)


@pytest.fixture(scope="module")
def host():
    if os.geteuid() != 0:
        pytest.skip("cgroup tests need root")
    h = cgroups.detect(parent=TEST_PARENT)
    if h is None:
        pytest.skip("no usable cgroups (need v2 with memory/pids/cpu or v1 memory+pids+cpu)")
    yield h
    try:
        h.reap_stale()
    finally:
        _rmdir_parents(h)


@pytest.fixture
def make_cg(host):
    made: list[Cgroup] = []

    def make(memory_mb=64, pids_max=64, cpu_weight=100, name=None) -> Cgroup:
        cg = host.create(name or f"t-{uuid.uuid4().hex[:12]}", memory_mb, pids_max, cpu_weight)
        made.append(cg)
        return cg

    yield make
    for cg in made:
        cg.remove()


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _spawn_in(cg: Cgroup, code: str, **kw) -> subprocess.Popen:
    # join_self in preexec_fn: the process is in the cgroup before exec.
    return subprocess.Popen([PY, "-c", code], preexec_fn=cg.join_self, **kw)


def test_detect_reports_version_and_parents(host):
    assert host.version in ("v1", "v2")
    for p in host.parent_paths:
        assert os.path.isdir(p)
        assert os.path.basename(p) == TEST_PARENT
    if host.version == "v1":
        assert {"memory", "pids", "cpu"} <= set(host.parents)
    else:
        assert list(host.parents) == ["unified"]
        ctl = _read(os.path.join(host.parents["unified"], "cgroup.subtree_control")).split()
        assert {"memory", "pids", "cpu"} <= set(ctl)


def test_limits_are_written(host, make_cg):
    cg = make_cg(memory_mb=96, pids_max=33, cpu_weight=250)
    limit = 96 * 1024 * 1024
    if host.version == "v1":
        mem = cg.paths["memory"]
        assert int(_read(f"{mem}/memory.limit_in_bytes")) == limit
        if os.path.exists(f"{mem}/memory.memsw.limit_in_bytes"):
            assert int(_read(f"{mem}/memory.memsw.limit_in_bytes")) == limit
        assert _read(f"{cg.paths['pids']}/pids.max").strip() == "33"
        assert int(_read(f"{cg.paths['cpu']}/cpu.shares")) == 250 * 1024 // 100
    else:
        d = cg.paths["unified"]
        assert int(_read(f"{d}/memory.max")) == limit
        if os.path.exists(f"{d}/memory.swap.max"):
            assert _read(f"{d}/memory.swap.max").strip() == "0"
        assert _read(f"{d}/pids.max").strip() == "33"
        assert _read(f"{d}/cpu.weight").strip() == "250"
    assert len(cg.procs_paths) == len(host.parents)
    assert all(p.endswith("/cgroup.procs") and os.path.exists(p) for p in cg.procs_paths)


def test_bad_arguments(host, make_cg):
    with pytest.raises(ValueError):
        host.create("../escape", 64, 10, 100)
    with pytest.raises(ValueError):
        host.create("ok-name", 64, 10, 0)
    with pytest.raises(ValueError):
        host.create("ok-name", 64, 10, 10001)
    cg = make_cg()
    with pytest.raises(CgroupError, match="already exists"):
        host.create(cg.name, 64, 10, 100)
    # the failed create did not take the existing cgroup down with it
    assert all(os.path.isdir(p) for p in cg.paths.values())


def test_oom_kill_is_detected(make_cg):
    cg = make_cg(memory_mb=64)
    # b"x" * n touches every page (a bytearray(n) would stay lazily zero-mapped).
    p = _spawn_in(cg, "b = b'x' * (200 << 20); print('survived')", stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, out
    assert b"survived" not in out
    assert cg.oom_killed() is True


def test_no_oom_under_the_limit(make_cg):
    cg = make_cg(memory_mb=64)
    p = _spawn_in(cg, "import sys, time; b = b'x' * (20 << 20); print('ok', flush=True);"
                      " sys.stdin.read()",
                  stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"ok"
        assert cg.memory_current() >= 20 << 20
        assert p.pid in cg.pids()
    finally:
        p.communicate(b"", timeout=30)
    assert p.returncode == 0
    assert cg.oom_killed() is False


def test_pids_max_stops_a_fork_loop(make_cg):
    cg = make_cg(pids_max=20)
    code = (
        "import os, time, errno\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(200):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60); os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print(n, errno.errorcode[e.errno], flush=True)\n"
        "else:\n"
        "    print(n, 'NOLIMIT', flush=True)\n"
    )
    p = _spawn_in(cg, code, stdout=subprocess.PIPE)
    try:
        # (the sleeping children keep the pipe open: read one line, not to EOF)
        forked, err = p.stdout.readline().split()
        assert err == b"EAGAIN"
        assert int(forked) < 20
        assert len(cg.pids()) <= 20
    finally:
        cg.kill_all()
        p.wait(timeout=10)
        p.stdout.close()
    assert cg.pids() == set()


def test_kill_all_and_remove_leave_nothing(make_cg):
    cg = make_cg(pids_max=200)
    # A parent that keeps forking (and ignores failures) plus sleeping children.
    code = (
        "import os, time\n"
        "print(os.getpid(), flush=True)\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(120); os._exit(0)\n"
        "    except OSError:\n"
        "        pass\n"
        "    time.sleep(0.005)\n"
    )
    p = _spawn_in(cg, code, stdout=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()
    time.sleep(0.3)
    members = cg.pids()
    assert len(members) > 5
    cg.kill_all()
    assert cg.pids() == set()
    assert p.wait(timeout=10) == -signal.SIGKILL
    for pid in members - {p.pid}:
        assert not _alive(pid), pid
    cg.remove()
    assert not any(os.path.exists(d) for d in cg.paths.values())
    cg.remove()  # idempotent
    cg.kill_all()  # a vanished cgroup counts as empty


def test_add_pid_moves_a_running_process(make_cg):
    cg = make_cg()
    p = subprocess.Popen(["sleep", "60"])
    try:
        cg.add_pid(p.pid)
        assert cg.pids() == {p.pid}
        cg.remove()
        assert p.wait(timeout=10) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_reap_stale_removes_leftovers(host, make_cg):
    a, b, c = make_cg(), make_cg(), make_cg()
    procs = [_spawn_in(cg, "import time; time.sleep(120)") for cg in (a, b, c)]
    try:
        time.sleep(0.2)
        removed = host.reap_stale(keep={c.name})
        assert sorted(removed) == sorted([a.name, b.name])
        for cg in (a, b):
            assert not any(os.path.exists(d) for d in cg.paths.values())
        assert procs[0].wait(timeout=10) == -signal.SIGKILL
        assert procs[1].wait(timeout=10) == -signal.SIGKILL
        assert procs[2].poll() is None
        assert all(os.path.isdir(d) for d in c.paths.values())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_errors_are_wrapped(host):
    ghost = host._cgroup("never-created")
    with pytest.raises(CgroupError):
        ghost.join_self()
    with pytest.raises(CgroupError):
        ghost.oom_killed()
    with pytest.raises(CgroupError):
        ghost.memory_current()
    assert ghost.pids() == set()
    ghost.remove()  # no-op


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


# --- v2 mechanics on a hybrid v1 host --------------------------------------------


def _hybrid_unified_mount() -> str | None:
    for line in _read("/proc/self/mountinfo").splitlines():
        pre, _, post = line.partition(" - ")
        if post.split()[:1] == ["cgroup2"]:
            mnt = pre.split()[4]
            if mnt != cgroups.CGROUP_ROOT:
                return mnt
    return None


@pytest.mark.host_variant
def test_v2_kill_and_remove_mechanics_on_hybrid_mount(host):
    """On a v1 host the v2 code paths (cgroup.kill / cgroup.freeze, one
    cgroup.procs, reap_stale) are still exercised on the controller-less
    cgroup2 mount of a hybrid setup.  Limits need controllers and are covered
    by the tests above on a real v2 host."""
    if host.version == "v2":
        pytest.skip("host is v2: covered by the other tests")
    mnt = _hybrid_unified_mount()
    if mnt is None:
        pytest.skip("no separate cgroup2 mount")
    parent = os.path.join(mnt, TEST_PARENT)
    os.makedirs(parent, exist_ok=True)
    v2 = CgroupV2Host({"unified": parent})
    try:
        cg = v2._cgroup("v2-one")
        os.mkdir(cg.paths["unified"])
        p = _spawn_in(cg, "import os, time\nfor _ in range(5):\n    os.fork()\ntime.sleep(120)")
        time.sleep(0.3)
        assert len(cg.pids()) == 32
        cg.kill_all()
        assert cg.pids() == set()
        assert p.wait(timeout=10) == -signal.SIGKILL
        cg.remove()
        assert not os.path.exists(cg.paths["unified"])

        stale = v2._cgroup("v2-stale")
        os.mkdir(stale.paths["unified"])
        q = _spawn_in(stale, "import time; time.sleep(120)")
        time.sleep(0.1)
        assert v2.reap_stale() == ["v2-stale"]
        assert q.wait(timeout=10) == -signal.SIGKILL
    finally:
        v2.reap_stale()
        os.rmdir(parent)


def test_detect_prefers_unified_v2_layout(tmp_path, monkeypatch):
    """detect() on a (fake) pure v2 root: one parent, controllers enabled."""
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "impuls").mkdir()
    (root / "impuls" / "cgroup.subtree_control").write_text("")
    monkeypatch.setattr(cgroups, "_cgroup_mounts", lambda: {("cgroup2", ""): str(root)})
    h = cgroups.detect(root=str(root))
    assert h == CgroupV2Host({"unified": str(root / "impuls")})
    # a fake file keeps only the last "+ctrl" written; the point is that writes happen
    assert (root / "cgroup.subtree_control").read_text().startswith("+")


def test_detect_none_without_cgroups(monkeypatch):
    monkeypatch.setattr(cgroups, "_cgroup_mounts", lambda: {})
    assert cgroups.detect() is None
    monkeypatch.setattr(cgroups, "_cgroup_mounts",
                        lambda: {("cgroup", "memory"): "/sys/fs/cgroup/memory"})
    assert cgroups.detect() is None  # pids and cpu missing


def test_detect_errors_are_wrapped(tmp_path, monkeypatch):
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    # no cgroup.subtree_control: preparing the parent fails with ENOENT
    monkeypatch.setattr(cgroups, "_cgroup_mounts", lambda: {("cgroup2", ""): str(root)})
    with pytest.raises(CgroupError) as ei:
        cgroups.detect(root=str(root))
    assert isinstance(ei.value.__cause__, OSError)
    assert ei.value.__cause__.errno == errno.ENOENT
