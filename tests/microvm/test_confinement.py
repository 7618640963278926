"""The microvm sandbox assumes the code in its guests is hostile: QEMU runs confined (its own
uid, no capabilities, seccomp, namespaces, only its files), and inside the guest the function
runs unprivileged and cannot take the VM down with it."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from impuls.runtimes import Runtime, default_registry
from impuls.runtimes.guest.protocol import SANDBOX_UID
from impuls.sandbox.microvm.driver import MicroVMDriver, MicroVMInstance
from impuls.sandbox.microvm.images import ImageStore
from impuls.sandbox.microvm.jail import QEMU_GID, QEMU_UID
from impuls.sandbox.microvm.vm import VM
from tests.microvm.conftest import CALL_TIMEOUT, Specs, guest_node, invocation, run, wait_gone

pytestmark = pytest.mark.microvm

ZERO_CAPS = "0000000000000000"


def driver(images_dir: Path, tmp_path: Path) -> MicroVMDriver:
    return MicroVMDriver(tmp_path / "data" / "sandbox" / "microvm", images_dir=images_dir)


def status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def mounts(pid: int) -> dict[str, set[str]]:
    """Mount point → its per-mount options, as QEMU sees them."""
    found: dict[str, set[str]] = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        found[fields[4]] = set(fields[5].split(","))
    return found


def open_files(pid: int) -> dict[str, str]:
    """What each descriptor of ``pid`` names → the descriptor."""
    links = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            links[os.readlink(f"/proc/{pid}/fd/{fd}")] = fd
    return links


def qemu_pid(vm: VM, timeout: float = 30.0) -> int:
    """QEMU's host pid, once the jail has exec'd it."""
    deadline = time.monotonic() + timeout
    while (pid := vm.qemu_pid) is None:
        assert time.monotonic() < deadline, "QEMU did not start in its jail"
        time.sleep(0.01)
    return pid


def assert_confined(pid: int, data_dir: Path) -> None:
    st = status(pid)
    assert st["Uid"].split() == [str(QEMU_UID)] * 4, st["Uid"]  # real, effective, saved, fs
    assert st["Gid"].split() == [str(QEMU_GID)] * 4, st["Gid"]
    assert QEMU_UID not in (0, SANDBOX_UID)
    assert st["Groups"] == ""
    assert st["Seccomp"] == "2" and int(st.get("Seccomp_filters", "1")) >= 1
    assert st["NoNewPrivs"] == "1"
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert st[caps] == ZERO_CAPS, (caps, st[caps])
    assert len(st["NSpid"].split()) == 2  # its own pid namespace: no other process to name
    for ns in ("pid", "net", "mnt", "ipc", "uts"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    root = Path(f"/proc/{pid}/root")
    top = set(os.listdir(root))
    assert top <= {"usr", "lib", "lib32", "lib64", "libx32", "dev", "proc", "tmp", "vm"}, top
    assert not (root / "root").exists() and not (root / "etc").exists() and not (root / "home").exists()
    assert not (root / str(data_dir).lstrip("/")).exists()  # the server's data directory
    assert not any((root / "tmp").iterdir())  # its own, empty /tmp
    assert set(os.listdir(root / "dev")) <= {"null", "urandom", "kvm"}
    seen = mounts(pid)
    assert "ro" in seen["/usr"] and "ro" in seen["/"]
    for name in os.listdir(root / "vm"):
        if name not in ("ram", "tmp.img"):  # a snapshot template's RAM, the guest's /tmp disk
            assert "ro" in seen[f"/vm/{name}"], name


def test_qemu_runs_confined_and_restores_from_a_sealed_snapshot(images_dir: Path, tmp_path: Path,
                                                                specs: Specs) -> None:
    async def scenario() -> None:
        d = driver(images_dir, tmp_path)
        spec = specs({"handler.py": "import os\ndef handler(e, c):\n    return os.getuid()\n"})
        await (await d.create(spec)).destroy()  # makes the snapshot if this host has none yet
        instance = await d.create(replace(spec, instance_id=spec.instance_id + "b"))
        assert isinstance(instance, MicroVMInstance) and instance.vm is not None
        try:
            assert instance.note.startswith("restored from snapshot"), instance.note
            pid = qemu_pid(instance.vm)
            assert_confined(pid, tmp_path / "data")
            assert sorted(os.listdir(f"/proc/{pid}/root/vm")) == ["code.img", "rootfs.ext4", "tmp.img"]
            # its RAM is the snapshot's, through a sealed memfd: neither the RAM file nor the
            # state file is open in QEMU, and the memfd refuses writes even to root
            links = open_files(pid)
            assert not [link for link in links if "snapshots" in link], links
            memfd = next(fd for link, fd in links.items() if link.startswith("/memfd:impuls-snapshot-ram"))
            with open(f"/proc/{pid}/fd/{memfd}", "r+b", buffering=0) as ram, pytest.raises(PermissionError):
                ram.write(b"x")
            reply = await instance.invoke(invocation({}), CALL_TIMEOUT)
            assert reply.ok and json.loads(reply.body) == SANDBOX_UID, reply.body
        finally:
            await instance.destroy()
        assert wait_gone(pid)

    run(scenario())


def test_snapshot_made_and_restored_through_descriptors(images_dir: Path, tmp_path: Path,
                                                        specs: Specs) -> None:
    """A fresh snapshot: the template's QEMU (confined, its RAM file the one writable file it
    has) is saved with ``fd:`` migration (QEMU may not spawn), and a clone restores from it."""
    async def scenario() -> None:
        d = driver(images_dir, tmp_path)
        d.snapshots.root = tmp_path / "snapshots"  # not the shared one: this test makes its own
        templates: list[dict[str, Any]] = []
        start_template = d.snapshots.start_template

        async def watched(*args: Any) -> VM:
            vm = await start_template(*args)
            pid = qemu_pid(vm)
            templates.append({"pid": pid, "vm": sorted(os.listdir(f"/proc/{pid}/root/vm")),
                              "mounts": mounts(pid), "status": status(pid)})
            assert_confined(pid, tmp_path / "data")
            return vm

        d.snapshots.start_template = watched
        spec = specs({"handler.py": "def handler(e, c):\n    return 'hi'\n"})
        first = await d.create(spec)
        second = await d.create(replace(spec, instance_id=spec.instance_id + "b"))
        try:
            assert first.note == "restored from snapshot (snapshot made for this start)", first.note
            assert second.note == "restored from snapshot", second.note
            for instance in (first, second):
                assert json.loads((await instance.invoke(invocation({}), CALL_TIMEOUT)).body) == "hi"
        finally:
            await first.destroy()
            await second.destroy()
        assert len(templates) == 1
        template = templates[0]
        assert template["vm"] == ["code.img", "initramfs", "ram", "rootfs.ext4", "tmp.img", "vmlinux"]
        assert "rw" in template["mounts"]["/vm/ram"] and "ro" in template["mounts"]["/vm/code.img"]
        (snapshot,) = (p for p in d.snapshots.root.iterdir() if not p.name.startswith("."))
        for name in ("ram", "state"):  # made for QEMU's uid while it ran, root's only after
            st = (snapshot / name).stat()
            assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600), (name, st.st_uid, oct(st.st_mode))
        assert wait_gone(template["pid"])

    run(scenario())


def test_code_disks_and_data_directory_are_not_for_other_users(images_dir: Path, tmp_path: Path,
                                                                specs: Specs) -> None:
    d = driver(images_dir, tmp_path)
    disk = d.codes.disk_for(specs({"handler.py": "x = 1\n"}).code_dir, "3.11")
    st = disk.path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, QEMU_GID, 0o640)
    for path in (d.codes.root, tmp_path / "data" / "sandbox" / "microvm"):
        assert path.stat().st_mode & 0o077 == 0, path


# --- inside the guest: the function is unprivileged and cannot end the VM -------------------

PY_FN = """
import os, subprocess, sys
def handler(event, context):
    if event.get("kill"):
        child = subprocess.Popen(["sleep", "600"])  # another process of the function's user
        os.kill(-1, 9)  # every process the function may signal, but itself
        return {"killed": child.wait(), "uid": os.getuid()}
    return {"uid": os.getuid(), "euid": os.geteuid(), "pid": os.getpid(), "warnoptions": sys.warnoptions}
"""

NODE_FN = """
const { spawn } = require("child_process");
exports.handler = async (event) => {
  if (event.kill) {
    const child = spawn("sleep", ["600"]);
    const done = new Promise((resolve) => child.on("exit", (code, signal) => resolve(signal)));
    await new Promise((resolve) => child.on("spawn", resolve));
    process.kill(-1, "SIGKILL");
    return { killed: await done, uid: process.getuid() };
  }
  return { uid: process.getuid(), euid: process.geteuid(), pid: process.pid };
};
"""

# A custom runtime: its own bootstrap, over the Runtime API by hand.
PROVIDED_BOOTSTRAP = """#!/usr/bin/python3
import json, os, subprocess, urllib.request
api = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime/invocation/"
while True:
    with urllib.request.urlopen(api + "next") as resp:
        rid = resp.headers["Lambda-Runtime-Aws-Request-Id"]
        event = json.loads(resp.read())
    if event.get("kill"):
        child = subprocess.Popen(["sleep", "600"])
        os.kill(-1, 9)
        body = {"killed": child.wait(), "uid": os.getuid()}
    else:
        body = {"uid": os.getuid(), "euid": os.geteuid(), "pid": os.getpid()}
    urllib.request.urlopen(urllib.request.Request(api + rid + "/response", data=json.dumps(body).encode(),
                                                  method="POST"))
"""


def guest_function(runtime_id: str, images_dir: Path) -> tuple[Runtime, dict[str, str], str]:
    if runtime_id == "nodejs20":
        node = guest_node(ImageStore(images_dir))
        assert node is not None, "the nodejs rootfs offers no runtime id"
        return node, {"index.js": NODE_FN}, "index.handler"
    runtime = default_registry().resolve(runtime_id.split("-")[0])
    if runtime_id == "provided":
        return runtime, {"bootstrap": PROVIDED_BOOTSTRAP}, "function.handler"
    return runtime, {"handler.py": PY_FN}, "handler.handler"


@pytest.mark.parametrize("runtime_id", ["python3.11", "python3.11-exec", "nodejs20", "provided"])
def test_function_is_unprivileged_and_kill_all_spares_the_vm(runtime_id: str, images_dir: Path,
                                                             tmp_path: Path, specs: Specs) -> None:
    """Every way the agent starts a runtime: the preloaded Python zygote, a fresh Python (a
    PYTHON* variable the zygote cannot honour), Node.js, a package's own ``bootstrap``."""
    runtime, files, handler = guest_function(runtime_id, images_dir)
    environment = {"PYTHONWARNINGS": "ignore"} if runtime_id.endswith("-exec") else {}

    async def scenario() -> None:
        d = driver(images_dir, tmp_path)
        spec = specs(files, runtime=runtime, handler=handler, environment=environment)
        if runtime_id == "provided":
            (spec.code_dir / "bootstrap").chmod(0o755)
        instance = await d.create(spec)
        assert isinstance(instance, MicroVMInstance) and instance.vm is not None
        try:
            reply = await instance.invoke(invocation({}), CALL_TIMEOUT)
            assert reply.ok, reply.body
            before = json.loads(reply.body)
            assert before["uid"] == before["euid"] == SANDBOX_UID != 0, before
            if environment:  # a fresh interpreter read PYTHONWARNINGS; the zygote could not have
                assert before["warnoptions"] == ["ignore"], before
            # kill(-1, SIGKILL): the function's other process dies; the runtime (the caller),
            # the agent (PID 1, root) and the VM do not
            reply = await instance.invoke(invocation({"kill": True}), CALL_TIMEOUT)
            assert reply.ok, reply.body
            killed = json.loads(reply.body)
            assert killed["killed"] in (-9, "SIGKILL") and killed["uid"] == SANDBOX_UID, killed
            await asyncio.sleep(0.5)
            assert not instance.exited.done() and instance.vm.proc.poll() is None
            for _ in range(2):  # the same runtime process keeps answering
                reply = await instance.invoke(invocation({}), CALL_TIMEOUT)
                assert reply.ok, reply.body
                assert json.loads(reply.body)["pid"] == before["pid"]
        finally:
            await instance.destroy()

    run(scenario())


def test_function_cannot_regain_root_in_the_guest(images_dir: Path, tmp_path: Path, specs: Specs) -> None:
    """No capabilities, no_new_privs (setuid binaries of the rootfs grant nothing), no user
    namespaces."""
    code = """
import ctypes, os, subprocess
def handler(event, context):
    status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
    libc = ctypes.CDLL(None, use_errno=True)
    unshare = libc.unshare(0x10000000)  # CLONE_NEWUSER
    unshare_errno = ctypes.get_errno()
    try:
        os.setuid(0)
        setuid = "ok"
    except PermissionError:
        setuid = "EPERM"
    try:  # a setuid-root binary of the rootfs
        su = subprocess.run(["su", "-c", "id -u"], capture_output=True, text=True, input="").returncode
    except OSError:
        su = 127
    return {"caps": [status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")],
            "nnp": status["NoNewPrivs"].strip(), "unshare": [unshare, unshare_errno], "setuid": setuid,
            "su": su, "agent": os.path.exists("/proc/1/cmdline") and open("/proc/1/cmdline").read()}
"""

    async def scenario() -> None:
        d = driver(images_dir, tmp_path)
        instance = await d.create(specs({"handler.py": code}))
        try:
            reply = await instance.invoke(invocation({}), CALL_TIMEOUT)
            assert reply.ok, reply.body
            seen = json.loads(reply.body)
        finally:
            await instance.destroy()
        assert seen["caps"] == [ZERO_CAPS] * 5 and seen["nnp"] == "1", seen
        assert seen["unshare"][0] == -1 and seen["unshare"][1] in (errno.EPERM, errno.ENOSPC, errno.EINVAL)
        assert seen["setuid"] == "EPERM" and seen["su"] != 0
        assert not seen["agent"]  # /proc shows the function only its own processes

    run(scenario())
