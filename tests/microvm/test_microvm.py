"""The microvm sandbox on real QEMU (TCG here): images, invocations, failures, no leftovers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from impuls.errors import InvocationTimedOut, OutOfMemory, RuntimeExited
from impuls.images import cli as images_cli
from impuls.images.builder import Builder
from impuls.runtimes import node_dist
from impuls.sandbox.microvm.codedisk import CodeDisks
from impuls.sandbox.microvm.driver import MicroVMDriver, MicroVMInstance
from impuls.sandbox.microvm.images import ImageStore
from tests.microvm.conftest import CALL_TIMEOUT, Specs, guest_node, invocation, run, wait_gone

pytestmark = pytest.mark.microvm

PY = """
import os, random, sys, threading, time
print("init output")
COUNT = 0
LAST = GAP = 0.0
def tick():
    global LAST, GAP
    while True:
        time.sleep(0.002)
        now = time.monotonic()
        GAP, LAST = max(GAP, now - LAST), now
def handler(event, context):
    global COUNT, LAST
    COUNT += 1
    print("called", COUNT)
    if event.get("ticker"):
        LAST = time.monotonic()
        threading.Thread(target=tick, daemon=True).start()
    if "gap" in event:  # the longest the ticker thread went without running, until now
        return max(GAP, time.monotonic() - LAST)
    if event.get("sleep"):
        time.sleep(event["sleep"])
    return {"count": COUNT, "request_id": context.aws_request_id, "urandom": os.urandom(16).hex(),
            "random": random.random(), "uid": os.getuid(), "task": sorted(os.listdir("/var/task")),
            "loader": type(sys.modules[__name__].__spec__.loader).__name__,
            "left_ms": context.get_remaining_time_in_millis(), "var": os.environ.get("FUNCTION_VAR")}
"""


def driver(images_dir: Path, tmp_path: Path) -> MicroVMDriver:
    return MicroVMDriver(tmp_path / "sandbox" / "microvm", images_dir=images_dir)


def test_image_build_is_idempotent_and_listed(images_dir: Path) -> None:
    report = Builder(ImageStore(images_dir)).build()
    assert report.built == [] and "rootfs-python" in report.cached and "kernel" in report.cached
    console = Console(record=True, width=300)
    assert images_cli.listing(console, images_dir) == 0
    text = console.export_text()
    for name in ("kernel", "initramfs", "rootfs-python", "rootfs-nodejs", "rootfs-java", "rootfs-ruby",
                 "rootfs-dotnet"):
        assert name in text
    assert " MB" in text


def test_code_disks_share_their_first_blocks(tmp_path: Path) -> None:
    """What a restored kernel cached from the template's disk is the same on every code disk."""
    disks = CodeDisks(tmp_path / "disks")
    heads = []
    for n, files in enumerate([{"handler.py": "x = 1\n"}, {"a.py": "y = 2\n", "sub/b.js": "1"}]):
        code = tmp_path / f"code{n}"
        for name, text in files.items():
            (code / name).parent.mkdir(parents=True, exist_ok=True)
            (code / name).write_text(text)
        disk = disks.disk_for(code, "3.11")
        assert disk.fstype == "romfs"
        heads.append(disk.path.read_bytes()[:(1 << 20) + 2048])
    heads.append(disks.blank().read_bytes()[:(1 << 20) + 2048])
    assert heads[0] == heads[1] == heads[2]


def test_python_restore_based_cold_start(images_dir: Path, tmp_path: Path, specs: Specs) -> None:
    async def scenario() -> None:
        d = driver(images_dir, tmp_path)
        spec = specs({"handler.py": PY})
        first = await d.create(spec)  # makes the snapshot if this host has none yet
        clone = await d.create(replace(spec, instance_id=spec.instance_id + "b"))
        try:
            assert clone.note.startswith("restored from snapshot"), clone.note
            assert isinstance(clone, MicroVMInstance) and "ready" in clone.timings
            inv = invocation({"n": 1})
            reply = await clone.invoke(inv, CALL_TIMEOUT)
            assert reply.ok, reply.body
            doc = json.loads(reply.body)
            logs, _ = clone.output.take()
            assert "init output" in logs and "called 1" in logs  # output arrives before the reply
            assert doc["request_id"] == inv.request_id and doc["uid"] != 0 and doc["var"] == "fn"
            assert doc["task"] == ["handler.py"] and doc["loader"] == "PrecompiledLoader"
            assert 0 < doc["left_ms"] <= CALL_TIMEOUT * 1000  # the guest clock was set on restore
            assert json.loads((await clone.invoke(invocation({}), CALL_TIMEOUT)).body)["count"] == 2  # warm
            other = json.loads((await first.invoke(invocation({}), CALL_TIMEOUT)).body)
            assert other["urandom"] != doc["urandom"] and other["random"] != doc["random"]  # unique clones
            await clone.invoke(invocation({"ticker": True}), CALL_TIMEOUT)
            await asyncio.sleep(2.0)  # between invocations the runtime is frozen, threads included
            gap = json.loads((await clone.invoke(invocation({"gap": True}), CALL_TIMEOUT)).body)
            assert gap >= 1.0, gap  # a thread that was never frozen would have run every few ms
        finally:
            pids = [pid for i in (first, clone) if i.vm is not None and (pid := i.vm.qemu_pid) is not None]
            await first.destroy()
            await clone.destroy()
            await clone.destroy()  # idempotent
        assert all(wait_gone(pid) for pid in pids)
        assert not list((tmp_path / "sandbox" / "microvm" / "run").glob("*.json"))

    run(scenario())


def test_function_module_named_like_the_agents(images_dir: Path, tmp_path: Path, specs: Specs) -> None:
    """The agent's own protocol module (preloaded in the Python runtime's zygote) does not shadow
    a function's module of that name."""
    code = {"handler.py": "import protocol\ndef handler(event, context):\n    return protocol.WHO\n",
            "protocol.py": "WHO = 'the function'\n"}

    async def scenario() -> None:
        d = driver(images_dir, tmp_path)
        instance = await d.create(specs(code))
        try:
            reply = await instance.invoke(invocation({}), CALL_TIMEOUT)
            assert json.loads(reply.body) == "the function", reply.body
        finally:
            await instance.destroy()

    run(scenario())


@pytest.mark.parametrize("major", sorted(node_dist.RELEASES))
def test_node_invocation(major: str, images_dir: Path, tmp_path: Path, specs: Specs) -> None:
    """Each pinned Node.js runs in the guest: the very build the other sandboxes run."""
    node = guest_node(ImageStore(images_dir), major)
    assert node is not None, f"the nodejs rootfs does not offer nodejs{major}"
    code = ("console.log('init output');\n"
            "exports.handler = async (event, context) => {\n"
            "  console.log('called');\n"
            "  return {version: process.version, echo: event, id: context.awsRequestId};\n};\n")

    async def scenario() -> None:
        d = driver(images_dir, tmp_path)
        instance = await d.create(specs({"index.js": code}, runtime=node, handler="index.handler"))
        try:
            inv = invocation({"k": "v"})
            doc = json.loads((await instance.invoke(inv, CALL_TIMEOUT)).body)
            assert doc["version"] == "v" + node_dist.RELEASES[major].version
            assert doc["echo"] == {"k": "v"} and doc["id"] == inv.request_id
            assert "called" in instance.output.take()[0]
        finally:
            await instance.destroy()

    run(scenario())


def test_timeout_then_the_vm_is_gone(images_dir: Path, tmp_path: Path, specs: Specs) -> None:
    async def scenario() -> None:
        d = driver(images_dir, tmp_path)
        instance = await d.create(specs({"handler.py": PY}))
        assert isinstance(instance, MicroVMInstance) and instance.vm is not None
        pid = instance.vm.qemu_pid
        assert pid is not None
        started = time.monotonic()
        with pytest.raises(InvocationTimedOut):
            await instance.invoke(invocation({"sleep": 120}), 1.0)
        assert time.monotonic() - started < 60  # ended by its timeout, not by the handler's return
        await instance.destroy()
        assert instance.exited.done() and wait_gone(pid)

    run(scenario())


# Memory bombs.  Under emulation the guest kernel's own OOM killer did not act on "objects"
# within 300 s (the page cache the interpreter runs from was evicted and read back, over and
# over), and on "child" it killed only the child, leaving the runtime waiting: both ran into
# the function's timeout until the agent put the function in a memory cgroup of its own.
BOMB = """
import os, time
def eat(chunk):
    hog, i = [], 0
    while True:
        hog.append(b"x" * chunk if chunk else i)
        i += 1
def handler(event, context):
    bomb = event.get("bomb")
    if bomb == "bytes":  # large blocks
        eat(8 << 20)
    if bomb == "objects":  # small objects: the interpreter runs all the time, as in most leaks
        eat(0)
    if bomb == "child":  # a child process takes the memory; the runtime only waits
        if os.fork() == 0:
            eat(1 << 20)
        time.sleep(3600)
    return {"ok": True}
"""


@pytest.mark.parametrize("bomb", ["bytes", "objects", "child"])
def test_oom_inside_the_guest(images_dir: Path, tmp_path: Path, specs: Specs, bomb: str) -> None:
    async def scenario() -> None:
        d = driver(images_dir, tmp_path)
        instance = await d.create(specs({"handler.py": BOMB}))
        assert isinstance(instance, MicroVMInstance) and instance.vm is not None
        pid = instance.vm.qemu_pid
        assert pid is not None
        with pytest.raises(OutOfMemory):  # not InvocationTimedOut: the call allows CALL_TIMEOUT
            await instance.invoke(invocation({"bomb": bomb}), CALL_TIMEOUT)
        assert instance.oom_killed()
        assert wait_gone(pid)  # the VM is killed as soon as its runtime is gone
        await instance.destroy()

    run(scenario())


def test_memory_bomb_through_the_server(images_dir: Path, make_server: object) -> None:
    """A 128 MB function that allocates without bound ends as Runtime.OutOfMemory, not by its
    60 s timeout, and the next call of the function (a new instance) works."""
    srv = make_server(env={"IMPULS_IMAGES_DIR": str(images_dir)},  # type: ignore[operator]
                      args=["--sandbox", "microvm"])
    fn = srv.deploy(runtime="python3.11", handler="handler.handler", code=BOMB, memory_mb=128,
                    timeout_sec=60)

    def invoke(event: dict[str, str]) -> dict[str, object]:  # waits longer than timeout + a cold start
        return dict(srv.client.post(f"/api/v1/functions/{fn['name']}/invoke", json=event, timeout=300).json())

    first = invoke({})
    assert first["status_code"] == 200, first
    for bomb in ("objects", "child"):
        doc = invoke({"bomb": bomb})
        assert doc["status_code"] == 500 and doc["error_type"] == "Runtime.OutOfMemory", doc
        after = invoke({})
        assert after["status_code"] == 200 and after["body"] == {"ok": True}, after
        assert after["cold_start"] is True, after  # the OOM-killed instance is gone: a new one


def test_guest_panic_and_qemu_crash_end_the_call(images_dir: Path, tmp_path: Path, specs: Specs) -> None:
    async def scenario() -> None:
        d = driver(images_dir, tmp_path)
        panicking, crashing = await asyncio.gather(d.create(specs({"handler.py": PY})),
                                                   d.create(specs({"handler.py": PY})))
        assert isinstance(panicking, MicroVMInstance) and panicking.vm is not None
        assert isinstance(crashing, MicroVMInstance) and crashing.vm is not None
        try:
            call = asyncio.ensure_future(panicking.invoke(invocation({"sleep": 600}), CALL_TIMEOUT))
            await asyncio.sleep(0.5)
            await (await panicking.vm.monitor()).execute("inject-nmi")  # the guest panics on NMI
            with pytest.raises(RuntimeExited, match="Kernel panic"):
                await call
            call = asyncio.ensure_future(crashing.invoke(invocation({"sleep": 600}), CALL_TIMEOUT))
            await asyncio.sleep(0.5)
            assert crashing.vm.qemu_pid is not None
            os.kill(crashing.vm.qemu_pid, signal.SIGSEGV)
            with pytest.raises(RuntimeExited) as info:
                await call
            assert type(info.value) is RuntimeExited
        finally:
            await panicking.destroy()
            await crashing.destroy()

    run(scenario())


CRASHING_SERVER = """
import asyncio, sys
from pathlib import Path
from impuls.sandbox.microvm.driver import MicroVMDriver
from tests.microvm.conftest import Specs

async def main():
    d = MicroVMDriver(Path(sys.argv[1]), images_dir=Path(sys.argv[2]))
    spec = Specs(Path(sys.argv[3]))({"handler.py": "def handler(e, c):\\n    return 1\\n"})
    instance = await d.create(spec)
    print(instance.vm.qemu_pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_no_qemu_survives_a_killed_server(images_dir: Path, tmp_path: Path, specs: Specs) -> None:
    work = tmp_path / "sandbox" / "microvm"
    server = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CRASHING_SERVER), str(work), str(images_dir), str(tmp_path)],
        stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
    assert server.stdout is not None
    line = server.stdout.readline()
    assert line.strip(), "the child did not start a VM"
    pid = int(line)
    server.send_signal(signal.SIGKILL)
    server.wait()
    assert wait_gone(pid), "QEMU outlived the server that started it (PR_SET_PDEATHSIG)"

    async def scenario() -> None:  # a VM that survived anyway is killed by the next server
        d = driver(images_dir, tmp_path)
        instance = await d.create(specs({"handler.py": PY}))
        assert isinstance(instance, MicroVMInstance) and instance.vm is not None
        orphan = instance.vm.qemu_pid
        assert orphan is not None
        successor = driver(images_dir, tmp_path)
        assert await successor.reap_orphans() >= 1
        assert wait_gone(orphan)
        with pytest.raises(RuntimeExited):
            await instance.invoke(invocation({}), CALL_TIMEOUT)
        await instance.destroy()

    run(scenario())


def test_http_api_python_and_node(images_dir: Path, make_server: object) -> None:
    """Through a real server (``--sandbox microvm``): a Python and a Node function."""
    srv = make_server(env={"IMPULS_IMAGES_DIR": str(images_dir)},  # type: ignore[operator]
                      args=["--sandbox", "microvm"])
    health = srv.request("GET", "/health").json()
    assert health["sandbox"] == "microvm" and health["accel"] in ("kvm", "tcg")
    py = srv.deploy(runtime="python3.11", handler="handler.handler", timeout_sec=int(CALL_TIMEOUT),
                    code="def handler(event, context):\n    return {'py': event}\n")
    doc = srv.invoke(py["name"], {"a": 1}).json()
    assert doc["status_code"] == 200 and doc["body"] == {"py": {"a": 1}}, doc
    node = guest_node(ImageStore(images_dir))
    assert node is not None
    js = srv.deploy(runtime=node.id, handler="index.handler", timeout_sec=int(CALL_TIMEOUT),
                    code="exports.handler = async (event) => ({node: process.version, event});\n")
    doc = srv.invoke(js["name"], {"b": 2}).json()
    assert doc["status_code"] == 200 and doc["body"]["event"] == {"b": 2}, doc


def test_server_refuses_microvm_without_images(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMPULS_")}
    env["IMPULS_IMAGES_DIR"] = str(tmp_path / "no-images")
    out = subprocess.run([sys.executable, "-m", "impuls", "server", "--port", "1", "--data-dir",
                          str(tmp_path / "data"), "--sandbox", "microvm"],
                         capture_output=True, text=True, timeout=60, env=env, check=False)
    assert out.returncode != 0
    assert "impuls images build" in out.stderr and "Traceback" not in out.stderr


def test_images_ls_cli(images_dir: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "impuls", "images", "ls", "--images-dir", str(images_dir)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    for name in ("kernel", "initramfs", "rootfs-python"):
        assert name in out.stdout
    assert "MB" in out.stdout or "MiB" in out.stdout
