"""The namespace sandbox end to end: real bwrap + seccomp filter + cgroup.

Instances are started the way the engine is meant to: bwrap runs as the
sandbox uid, reads its options through ``--args`` from a pipe, and is moved
into its cgroup (``Cgroup.add_pid``) before that pipe is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import threading
import uuid

import pytest

from impuls.sandbox.namespace import bwrap, cgroups, seccomp
from impuls.sandbox.namespace.bwrap import BwrapConfigError, BwrapSpec

PY = "/usr/bin/python3"
UID = GID = 993
SIGSYS_EXIT = 128 + signal.SIGSYS  # bwrap's pid 1 reports "killed by SIG" as 128+SIG


def _pyseccomp_ok() -> bool:
    try:
        seccomp.build_filter_bpf()
    except seccomp.SeccompError:
        return False
    return True


# --- builder unit tests (no root needed) --------------------------------------


def test_filter_is_cached_bpf():
    if not _pyseccomp_ok():
        pytest.skip("libseccomp / pyseccomp not available")
    a = seccomp.build_filter_bpf()
    assert a is seccomp.build_filter_bpf()
    assert len(a) % 8 == 0 and len(a) > 8 * len(seccomp.DENIED_SYSCALLS)


def test_argv_shape(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    spec = BwrapSpec(command=[PY, "-c", "pass"], code_dir=str(code), seccomp_fd=7,
                     data_fds={"/etc/passwd": 8}, env={"A": "1", "B": "x y"}, tmp_mb=3)
    argv = bwrap.build_argv(spec)
    s = " ".join(argv)
    assert argv[0] == "/usr/bin/bwrap" and argv[-4:] == ["--", PY, "-c", "pass"]
    for flag in ("--unshare-user --uid 993 --gid 993", "--disable-userns", "--unshare-pid",
                 "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                 "--die-with-parent", "--new-session", "--cap-drop ALL", "--clearenv",
                 "--proc /proc", "--dev /dev", f"--size {3 << 20} --tmpfs /tmp",
                 f"--ro-bind {code} /var/task", "--seccomp 7", "--chdir /var/task",
                 "--perms 0444 --ro-bind-data 8 /etc/passwd", "--ro-bind /usr /usr"):
        assert flag in s, flag
    i = argv.index("--setenv")
    assert argv[i:i + 6] == ["--setenv", "A", "1", "--setenv", "B", "x y"]
    # the root tmpfs is frozen after every mount / file op
    last_fs_op = max(i for i, a in enumerate(argv)
                     if a in ("--ro-bind", "--symlink", "--tmpfs", "--ro-bind-data", "--proc"))
    ro_root = [i for i, a in enumerate(argv[:-1]) if a == "--remount-ro" and argv[i + 1] == "/"]
    assert ro_root and ro_root[0] > last_fs_op
    for merged in ("/bin", "/lib", "/lib64", "/sbin"):
        if os.path.islink(merged):
            assert f"--symlink {os.readlink(merged)} {merged}" in s
    assert "/etc/shadow" not in s and " /etc /etc" not in s and "/root" not in s


def test_args_fd_payload_round_trip(tmp_path):
    cmd = bwrap.build(BwrapSpec(command=[PY, "-V"], code_dir=str(tmp_path)))
    argv, payload = cmd.argv_with_args_fd(9)
    assert argv == ["/usr/bin/bwrap", "--args", "9", "--", PY, "-V"]
    assert payload.endswith(b"\0")
    assert payload[:-1].split(b"\0") == [o.encode() for o in cmd.options]


@pytest.fixture
def var_tmp_path():
    # host paths may not live under /tmp (the sandbox mounts its own /tmp there)
    import pathlib
    d = tempfile.mkdtemp(prefix="impuls-bwrap-test-", dir="/var/tmp")
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_host_path_symlinks_and_coverage(var_tmp_path):
    tmp_path = var_tmp_path
    real = tmp_path / "runtime-1.2"
    (real / "bin").mkdir(parents=True)
    link = tmp_path / "runtime"
    link.symlink_to("runtime-1.2")
    code = tmp_path / "code"
    code.mkdir()
    spec = BwrapSpec(command=[PY], code_dir=str(code),
                     host_paths=[str(link), str(real / "bin"), "/usr/lib", str(tmp_path / "nope")])
    s = " ".join(bwrap.build_argv(spec))
    assert f"--symlink runtime-1.2 {link}" in s
    assert f"--ro-bind {real} {real}" in s
    assert f"--ro-bind {real / 'bin'}" not in s  # covered by its parent
    assert "--ro-bind /usr/lib /usr/lib" not in s  # covered by /usr
    assert "nope" not in s  # missing paths are skipped


@pytest.mark.parametrize("bad", [
    {"host_paths": ["/"]}, {"host_paths": ["/etc"]}, {"host_paths": ["/proc/1"]},
    {"host_paths": ["/root/.ssh"]}, {"host_paths": ["relative"]}, {"host_paths": ["/tmp"]},
    {"env": {"A=B": "1"}}, {"env": {"A": "x\0y"}}, {"uid": 0}, {"tmp_mb": 0},
    {"command": ["python3"]}, {"code_dir": "/nonexistent/code"},
    {"runtime_socket": "/nonexistent.sock"}, {"data_fds": {"/var/task/x": 3}},
])
def test_bad_specs_are_rejected(tmp_path, bad):
    kw = {"command": [PY], "code_dir": str(tmp_path), **bad}
    with pytest.raises(BwrapConfigError):
        bwrap.build(BwrapSpec(**kw))


def test_host_symlink_to_forbidden_place_is_rejected(tmp_path):
    link = tmp_path / "sneaky"
    link.symlink_to("/root")
    with pytest.raises(BwrapConfigError):
        bwrap.build(BwrapSpec(command=[PY], code_dir=str(tmp_path), host_paths=[str(link)]))


# --- the real sandbox ------------------------------------------------------------


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (cgroups, switching to the sandbox uid)"
    if not os.access("/usr/bin/bwrap", os.X_OK):
        return "bubblewrap not installed"
    if not os.path.exists(PY):
        return f"{PY} missing"
    if not _pyseccomp_ok():
        return "libseccomp / pyseccomp not available"
    return None


@pytest.fixture(scope="module")
def cg_host():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    host = cgroups.detect(parent=f"impuls-test-sbx-{os.getpid()}")
    if host is None:
        pytest.skip("no usable cgroups")
    yield host
    host.reap_stale()
    for p in host.parent_paths:
        with contextlib.suppress(OSError):
            os.rmdir(p)


@pytest.fixture(scope="module")
def world():
    """A code dir and a socket dir the sandbox uid can reach (pytest's tmp_path
    sits under a 0700 directory, which the sandbox uid could not traverse)."""
    base = tempfile.mkdtemp(prefix="impuls-sbx-test-")
    os.chmod(base, 0o711)
    code = os.path.join(base, "code")
    os.mkdir(code, 0o755)
    with open(os.path.join(code, "handler.py"), "w") as f:
        f.write("def handler(event, context):\n    return event\n")
    os.chmod(os.path.join(code, "handler.py"), 0o644)
    yield {"base": base, "code": code}
    shutil.rmtree(base, ignore_errors=True)


class Sandbox:
    def __init__(self, cg_host, world):
        self.cg_host = cg_host
        self.world = world
        self.cgroups: list[cgroups.Cgroup] = []

    def run(self, code: str, *, memory_mb: int = 256, tmp_mb: int = 16, socket_path=None,
            timeout: float = 60, seccomp_filter: bool = True, on_start=None):
        cg = self.cg_host.create(f"sbx-{uuid.uuid4().hex[:10]}", memory_mb, 64, 100)
        self.cgroups.append(cg)
        fds = {path: bwrap.data_fd(data) for path, data in bwrap.etc_files(UID, GID).items()}
        sfd = bwrap.data_fd(seccomp.build_filter_bpf()) if seccomp_filter else None
        spec = BwrapSpec(
            command=[PY, "-c", textwrap.dedent(code)], code_dir=self.world["code"],
            runtime_socket=socket_path, tmp_mb=tmp_mb, uid=UID, gid=GID,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, seccomp_fd=sfd, data_fds=fds)
        r, w = os.pipe()
        argv, payload = bwrap.build(spec).argv_with_args_fd(r)
        passed = [r, *fds.values(), *([sfd] if sfd is not None else [])]
        try:
            proc = subprocess.Popen(argv, pass_fds=passed, user=UID, group=GID, extra_groups=[],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        finally:
            for fd in passed:
                os.close(fd)
        try:
            cg.add_pid(proc.pid)          # before bwrap has read its options
        finally:
            os.write(w, payload)
            os.close(w)
        if on_start:
            on_start(proc, cg)
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode(), err.decode(), cg

    def cleanup(self):
        for cg in self.cgroups:
            cg.remove()


@pytest.fixture
def sandbox(cg_host, world):
    sb = Sandbox(cg_host, world)
    yield sb
    sb.cleanup()


def _json_run(sandbox, code, **kw):
    rc, out, err, _cg = sandbox.run(code, **kw)
    assert rc == 0, (rc, out, err)
    return json.loads(out.strip().splitlines()[-1])


PRELUDE = """
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def err(r):
    return "ok" if r != -1 else errno.errorcode[ctypes.get_errno()]
"""


def test_dangerous_syscalls_fail(sandbox):
    res = _json_run(sandbox, PRELUDE + textwrap.dedent("""
    CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET, SIGCHLD = 0x10000000, 0x20000, 0x40000000, 17
    r = {}
    r["ptrace_traceme"] = err(libc.ptrace(0, 0, None, None))
    r["mount"] = err(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
    r["umount"] = err(libc.umount2(b"/tmp", 0))
    r["unshare_user"] = err(libc.unshare(CLONE_NEWUSER))
    r["unshare_ns"] = err(libc.unshare(CLONE_NEWNS))
    r["setns"] = err(libc.syscall(308, 0, 0))
    r["chroot"] = err(libc.chroot(b"/tmp"))
    r["bpf"] = err(libc.syscall(321, 0, 0, 0))
    r["keyctl"] = err(libc.syscall(250, 0, 0))
    r["perf_event_open"] = err(libc.syscall(298, 0, 0, -1, -1, 0))
    r["userfaultfd"] = err(libc.syscall(323, 0))
    r["personality_noaslr"] = err(libc.personality(0x0040000))
    r["personality_query"] = err(libc.personality(0xffffffff))
    for name, flags in (("clone_newuser", CLONE_NEWUSER), ("clone_newnet", CLONE_NEWNET)):
        pid = libc.syscall(56, flags | SIGCHLD, 0, 0, 0, 0)
        if pid == 0:
            os._exit(0)
        r[name] = err(pid)
    r["clone3"] = err(libc.syscall(435, 0, 0))
    # ...and the ordinary things still work (glibc falls back from clone3 to clone)
    import threading, subprocess
    t = threading.Thread(target=lambda: None); t.start(); t.join()
    r["subprocess"] = subprocess.run(["/bin/echo", "hi"], capture_output=True).stdout.decode()
    print(json.dumps(r))
    """))
    for key in ("ptrace_traceme", "mount", "umount", "unshare_user", "unshare_ns", "setns",
                "chroot", "bpf", "keyctl", "perf_event_open", "userfaultfd",
                "personality_noaslr", "clone_newuser", "clone_newnet"):
        assert res[key] == "EPERM", (key, res)
    assert res["clone3"] == "ENOSYS"
    assert res["personality_query"] == "ok"
    assert res["subprocess"] == "hi\n"


def test_x32_syscall_kills_the_process(sandbox):
    rc, out, err, _ = sandbox.run(PRELUDE + textwrap.dedent("""
    print("before", flush=True)
    libc.syscall(0x40000000 | 39)   # x32 getpid
    print("after", flush=True)
    """))
    assert rc == SIGSYS_EXIT, (rc, out, err)
    assert "before" in out and "after" not in out


I386_GETPID = """
import ctypes, mmap, os
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(bytes([0xb8, 20, 0, 0, 0, 0xcd, 0x80, 0xc3]))  # mov eax,20; int 0x80; ret
f = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))
print("before", flush=True)
print("pid", f(), os.getpid(), flush=True)
"""


@pytest.mark.host_variant
def test_i386_syscall_kills_the_process(sandbox):
    if os.uname().machine != "x86_64":
        pytest.skip("x86_64 only")
    plain = subprocess.run([PY, "-c", I386_GETPID], capture_output=True, timeout=30)
    if plain.returncode != 0:
        pytest.skip("this kernel has no ia32 emulation (int 0x80 fails outside the sandbox too)")
    rc, out, err, _ = sandbox.run(I386_GETPID)
    assert rc == SIGSYS_EXIT, (rc, out, err)
    assert "before" in out and "pid" not in out


def test_identity_and_privileges(sandbox):
    seen_host_uids = []

    def on_start(proc, cg):
        # bwrap and everything it starts are in the cgroup, as host uid 993
        import time
        for _ in range(200):
            if len(cg.pids()) >= 3:
                break
            time.sleep(0.01)
        for pid in cg.pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    status = f.read()
            except FileNotFoundError:
                continue
            uid_line = next(x for x in status.splitlines() if x.startswith("Uid:"))
            seen_host_uids.append(set(uid_line.split()[1:]))

    res = _json_run(sandbox, """
    import json, os, pwd, socket, time
    st = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
    pid1 = dict(l.split(":\\t", 1) for l in open("/proc/1/status").read().splitlines() if ":\\t" in l)
    print(json.dumps({
        "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
        "user": pwd.getpwuid(os.getuid()).pw_name,
        "CapEff": st["CapEff"], "CapPrm": st["CapPrm"], "CapBnd": st["CapBnd"],
        "CapAmb": st["CapAmb"], "NoNewPrivs": st["NoNewPrivs"], "Seccomp": st["Seccomp"],
        "pid1_Seccomp": pid1["Seccomp"], "hostname": socket.gethostname(),
        "env": dict(os.environ), "cwd": os.getcwd(),
        "cgroup": open("/proc/self/cgroup").read(),
    }))
    time.sleep(0.5)
    """, on_start=on_start)
    assert res["uid"] == res["euid"] == UID and res["gid"] == GID
    assert res["user"] == "sbx_user1051"
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(res[cap], 16) == 0, (cap, res[cap])
    assert res["NoNewPrivs"] == "1"
    assert res["Seccomp"] == "2" and res["pid1_Seccomp"] == "2"
    assert res["hostname"] == "impuls"
    assert res["cwd"] == "/var/task"
    assert set(res["env"]) <= {"PATH", "LANG", "PWD", "LC_CTYPE"}
    assert seen_host_uids and all(u == {str(UID)} for u in seen_host_uids), seen_host_uids


def test_filesystem_view(sandbox):
    res = _json_run(sandbox, """
    import json, os
    def probe(path):
        try:
            os.stat(path)
        except OSError as e:
            return errno_name(e)
        try:
            open(path).read() if os.path.isfile(path) else os.listdir(path)
            return "readable"
        except OSError as e:
            return errno_name(e)
    def errno_name(e):
        import errno
        return errno.errorcode[e.errno]
    def write(path):
        try:
            with open(path, "w") as f:
                f.write("x")
            return "ok"
        except OSError as e:
            return errno_name(e)
    procs = [p for p in os.listdir("/proc") if p.isdigit()]
    print(json.dumps({
        "root": sorted(os.listdir("/")),
        "etc": sorted(os.listdir("/etc")),
        "shadow": probe("/etc/shadow"), "root_home": probe("/root"), "home": probe("/home"),
        "work": probe("/work"), "var_lib": probe("/var/lib"), "sys": probe("/sys/fs/cgroup"),
        "task": sorted(os.listdir("/var/task")),
        "procs": procs,
        "w_root": write("/evil"), "w_task": write("/var/task/evil"),
        "w_usr": write("/usr/evil"), "w_etc": write("/etc/passwd"),
        "w_dev": write("/dev/evil"), "w_tmp": write("/tmp/fine"),
        "w_shm": write("/dev/shm/fine"), "w_null": write("/dev/null"),
    }))
    """)
    assert res["root"] == sorted(["bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "tmp",
                                  "usr", "var"]) or set(res["root"]) <= {
        "bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "tmp", "usr", "var", "run"}
    assert "shadow" not in res["etc"] and "gshadow" not in res["etc"]
    for key in ("shadow", "root_home", "home", "work", "var_lib", "sys"):
        assert res[key] == "ENOENT", (key, res[key])
    assert res["task"] == ["handler.py"]
    assert len(res["procs"]) <= 3, res["procs"]  # bwrap's pid 1 and us
    for key in ("w_root", "w_task", "w_usr", "w_etc", "w_dev"):
        assert res[key] in ("EROFS", "EACCES"), (key, res[key])
    for key in ("w_tmp", "w_shm", "w_null"):
        assert res[key] == "ok", (key, res[key])


def test_tmp_is_capped(sandbox):
    res = _json_run(sandbox, """
    import errno, json, os
    written = 0
    try:
        with open("/tmp/big", "wb") as f:
            for _ in range(64):
                f.write(b"x" * (1 << 20))
                f.flush()
                written += 1 << 20
        e = "none"
    except OSError as ex:
        e = errno.errorcode[ex.errno]
    print(json.dumps({"err": e, "size": os.path.getsize("/tmp/big")}))
    """, tmp_mb=8)
    assert res["err"] == "ENOSPC"
    assert res["size"] <= 8 << 20


def test_network_is_only_loopback(sandbox):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        res = _json_run(sandbox, f"""
        import errno, json, socket
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", {port}))
            r = "connected"
        except OSError as e:
            r = errno.errorcode.get(e.errno, str(e))
        out = {{"ifaces": socket.if_nameindex(), "tcp": r}}
        try:
            socket.create_connection(("1.1.1.1", 53), timeout=3)
            out["internet"] = "connected"
        except OSError as e:
            out["internet"] = errno.errorcode.get(e.errno, str(e))
        print(json.dumps(out))
        """)
    finally:
        listener.close()
    assert res["ifaces"] == [[1, "lo"]]
    assert res["tcp"] == "ECONNREFUSED"
    assert res["internet"] == "ENETUNREACH"


def test_runtime_socket_is_reachable(sandbox, world):
    sock_dir = os.path.join(world["base"], f"s-{uuid.uuid4().hex[:6]}")
    os.mkdir(sock_dir, 0o711)
    path = os.path.join(sock_dir, "api.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o666)  # connect() needs write permission on the socket
    srv.listen()
    got = []

    def serve():
        conn, _ = srv.accept()
        got.append(conn.recv(100))
        conn.sendall(b"pong")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        res = _json_run(sandbox, """
        import json, os, socket
        s = socket.socket(socket.AF_UNIX)
        s.connect("/run/impuls/runtime.sock")
        s.sendall(b"ping")
        print(json.dumps({"reply": s.recv(100).decode(),
                          "dir": sorted(os.listdir("/run/impuls"))}))
        """, socket_path=path)
        t.join(10)
    finally:
        srv.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert got == [b"ping"]
    assert res == {"reply": "pong", "dir": ["runtime.sock"]}


def test_kill_minus_one_stays_inside(sandbox):
    # Same host uid as the sandbox: only the pid namespace protects it.
    victim = subprocess.Popen(["sleep", "60"], user=UID, group=GID, extra_groups=[])
    try:
        res = _json_run(sandbox, """
        import json, os, signal, subprocess, time
        child = subprocess.Popen(["sleep", "60"])
        try:
            os.kill(-1, signal.SIGKILL)
            r = "sent"
        except OSError as e:
            r = str(e)
        child.wait()
        print(json.dumps({"kill": r, "child": child.returncode}))
        """)
        assert res == {"kill": "sent", "child": -signal.SIGKILL}
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_memory_limit_applies_inside(sandbox):
    rc, out, err, cg = sandbox.run("b = b'x' * (200 << 20); print('survived')", memory_mb=64)
    # v1: the OOM killer picks python, bwrap's pid 1 reports 128+9; v2 with
    # memory.oom.group=1 kills the whole instance, bwrap included.
    assert rc in (128 + signal.SIGKILL, -signal.SIGKILL), (rc, out, err)
    assert "survived" not in out
    assert cg.oom_killed()


def test_kill_all_takes_the_whole_instance(sandbox):
    state = {}

    def on_start(proc, cg):
        import time
        for _ in range(500):
            if len(cg.pids()) >= 5:  # bwrap, its pid 1, python, 2 sleeps
                break
            time.sleep(0.01)
        state["members"] = cg.pids()
        cg.kill_all()
        state["after"] = cg.pids()

    rc, _out, _err, _cg = sandbox.run("""
    import subprocess, time
    ps = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    time.sleep(60)
    """, on_start=on_start)
    assert len(state["members"]) >= 5
    assert state["after"] == set()
    assert rc == -signal.SIGKILL
