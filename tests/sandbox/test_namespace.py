"""The namespace driver through its real launchers (template and one bwrap per instance).

Needs root, bubblewrap, libseccomp and cgroups; skipped with the reason from
``impuls.sandbox.namespace.available()`` otherwise.  The shared behaviour is in
``test_conformance.py``; this file covers what is particular to the driver:
isolation as seen from inside, limits, destroy, crash recovery and template rotation.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from impuls import config
from impuls.errors import ConfigError, InitFailed, InvocationTimedOut, OutOfMemory, RuntimeExited
from impuls.runtimes import default_registry
from impuls.sandbox import make_driver, namespace
from tests.helpers import live_pids, processes_with
from tests.sandbox.conftest import SpecFactory, run
from tests.sandbox.test_conformance import call

pytestmark = pytest.mark.namespace

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = ["template", "bwrap"]


@pytest.fixture(autouse=True)
def _needs_namespace() -> None:
    reason = namespace.available()
    if reason:
        pytest.skip(f"namespace sandbox unavailable here: {reason}")


def make_namespace_driver(work: Path, launcher: str = "template", **template: Any):  # type: ignore[no-untyped-def]
    from impuls.runtimes import default_registry
    from impuls.sandbox.namespace.bwrap_launch import BwrapLauncher
    from impuls.sandbox.namespace.driver import NamespaceDriver
    from impuls.sandbox.namespace.template import TemplateLauncher

    if launcher == "bwrap":
        return NamespaceDriver(work, default_registry(), launcher=lambda host, _, __: BwrapLauncher(host))
    return NamespaceDriver(work, default_registry(), launcher=lambda host, runtimes, tmp: TemplateLauncher(
        host, runtimes.available(), tmp, **template))


@pytest.fixture(params=LAUNCHERS)
def launcher(request: pytest.FixtureRequest) -> str:
    return str(request.param)


PROBE = r'''
import errno, json, os, resource, socket
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
def status(pid):
    return dict(l.split(":\t", 1) for l in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in l)
def handler(event, context):
    me, init = status("self"), status(1)
    if event.get("fill_tmp"):
        def fill():
            with open("/tmp/big", "wb") as f:
                for _ in range(event["fill_tmp"]):
                    f.write(b"x" * (1 << 20))
        return {"fill": attempt(fill)}
    return {
        "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
        "caps": {k: int(me[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
        "init_caps": {k: int(init[k], 16) for k in ("CapPrm", "CapEff", "CapBnd", "CapAmb")},
        "no_new_privs": me["NoNewPrivs"], "seccomp": me["Seccomp"], "init_seccomp": init["Seccomp"],
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "interfaces": sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:]),
        "hostname": socket.gethostname(), "cwd": os.getcwd(),
        "shadow": attempt(lambda: os.stat("/etc/shadow")),
        "home": attempt(lambda: os.listdir("/home")), "root_home": attempt(lambda: os.listdir("/root")),
        "write_task": attempt(lambda: open("/var/task/x", "w")),
        "write_usr": attempt(lambda: open("/usr/x", "w")),
        "write_tmp": attempt(lambda: open("/tmp/x", "w").write("x")),
        "cgroup": open("/proc/self/cgroup").read().split("\n")[0],
        "task": sorted(os.listdir("/var/task")),
        "init_memory": attempt(lambda: open("/proc/1/mem", "rb")),
        "open_files": resource.getrlimit(resource.RLIMIT_NOFILE),
    }
'''


def test_isolation_seen_from_inside(launcher: str, make_spec: SpecFactory, world_dir: Path) -> None:
    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox", launcher)
        instance = await driver.create(make_spec({"handler.py": PROBE}, ephemeral_storage_mb=8))
        try:
            seen = json.loads((await call(instance, {})).body)
            filled = json.loads((await call(instance, {"fill_tmp": 16})).body)
        finally:
            await instance.destroy()
            await driver.close()
        assert (seen["uid"], seen["gid"], seen["groups"]) == (993, 993, [])
        assert not any(seen["caps"].values()) and not any(seen["init_caps"].values()), seen
        assert seen["no_new_privs"] == "1" and seen["seccomp"] == "2" and seen["init_seccomp"] == "2"
        assert seen["pids"] == [1, 2], seen["pids"]  # an init and the runtime, nothing of the host
        assert seen["interfaces"] == ["lo"]
        assert seen["hostname"] == "impuls" and seen["cwd"] == "/var/task"
        assert seen["shadow"] == seen["home"] == seen["root_home"] == "ENOENT"
        assert seen["write_task"] == seen["write_usr"] == "EROFS"
        assert seen["write_tmp"] == "ok" and filled["fill"] == "ENOSPC"  # /tmp capped at 8 MB
        assert seen["task"] == ["handler.py"]
        assert seen["open_files"] == [1024, 1024]  # Lambda's, whatever the server's limit is
        if launcher == "template":  # the template's pid 1 is not dumpable
            assert seen["init_memory"] == "EACCES"

    run(scenario())


def test_code_below_a_private_directory(make_spec: SpecFactory, world_dir: Path) -> None:
    """The template attaches code through a mount the server clones: a 0700 parent is fine."""
    spec = make_spec({"handler.py": "def handler(e, c):\n    return 'hi'\n"})
    private = world_dir / "private"
    private.mkdir(mode=0o700)
    hidden = private / "code"
    spec.code_dir.rename(hidden)

    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox")
        instance = await driver.create(replace(spec, code_dir=hidden))
        try:
            assert json.loads((await call(instance, {})).body) == "hi"
        finally:
            await instance.destroy()
            await driver.close()

    run(scenario())


def test_oom_kill_is_reported(launcher: str, make_spec: SpecFactory, world_dir: Path) -> None:
    code = textwrap.dedent("""
        def handler(event, context):
            chunks = []
            for _ in range(event["mb"]):
                chunks.append(bytearray(1 << 20))
            return len(chunks)
    """)

    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox", launcher)
        instance = await driver.create(make_spec({"handler.py": code}, memory_mb=128))
        try:
            assert (await call(instance, {"mb": 16})).ok
            with pytest.raises(OutOfMemory):
                await call(instance, {"mb": 256}, timeout=20)
            assert instance.oom_killed()
        finally:
            await instance.destroy()
            await driver.close()

    run(scenario())


def test_errors_are_named(launcher: str, make_spec: SpecFactory, world_dir: Path) -> None:
    code = textwrap.dedent("""
        import os, time
        def handler(event, context):
            if event.get("exit"):
                print("bye", flush=True)
                os._exit(7)
            time.sleep(event["sleep"])
    """)

    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox", launcher)
        with pytest.raises(InitFailed) as info:
            await driver.create(make_spec({"handler.py": "import nope_nope\n"}))
        assert info.value.error_type == "Runtime.ImportModuleError"
        instance = await driver.create(make_spec({"handler.py": code}))
        try:
            with pytest.raises(InvocationTimedOut):
                await call(instance, {"sleep": 30}, timeout=0.5)
        finally:
            await instance.destroy()
        assert instance.exited.done()
        instance = await driver.create(make_spec({"handler.py": code}))
        try:
            with pytest.raises(RuntimeExited) as exited:
                await call(instance, {"exit": True})
            assert type(exited.value) is RuntimeExited and "7" in exited.value.message
            assert "bye" in instance.output.take()[0]
        finally:
            await instance.destroy()
            await driver.close()

    run(scenario())


FORKER = """
import subprocess
def handler(event, context):
    for _ in range(5):
        subprocess.Popen(["sleep", event["marker"]], start_new_session=True)
    subprocess.Popen(["sh", "-c", "(sleep {0} &) ; sleep {0}".format(event["marker"])])
    return "spawned"
"""


def test_destroy_leaves_no_process_and_no_cgroup(launcher: str, make_spec: SpecFactory,
                                                  world_dir: Path) -> None:
    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox", launcher)
        instance = await driver.create(make_spec({"handler.py": FORKER}))
        marker = f"400.{uuid.uuid4().int % 10**9}"
        assert json.loads((await call(instance, {"marker": marker})).body) == "spawned"
        await asyncio.sleep(0.2)
        assert len(processes_with(marker)) >= 6
        cgroup_dirs = list(instance.cgroup.paths.values())  # type: ignore[attr-defined]
        run_dir = instance.run_dir  # type: ignore[attr-defined]
        assert all(os.path.isdir(d) for d in cgroup_dirs) and run_dir.exists()
        await instance.destroy()
        await instance.destroy()
        assert instance.exited.done()
        assert processes_with(marker) == []
        assert not any(os.path.exists(d) for d in cgroup_dirs)
        assert not run_dir.exists()
        await driver.close()

    run(scenario())


FORK_BOMB = """
import os, time
def handler(event, context):
    failures = 0
    for _ in range(400):
        try:
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
        except OSError:
            failures += 1
    return failures
"""


def test_fork_bomb_is_contained_and_retired(launcher: str, make_spec: SpecFactory,
                                            world_dir: Path) -> None:
    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox", launcher)
        instance = await driver.create(make_spec({"handler.py": FORK_BOMB}))
        try:
            reply = await call(instance, {}, timeout=20)
            assert reply.ok and json.loads(reply.body) > 0  # the pids limit stopped it
            assert instance.destroyed and instance.exited.done()  # and the instance was retired
            assert not instance.cgroup.pids()  # type: ignore[attr-defined]
        finally:
            await instance.destroy()
            await driver.close()

    run(scenario())


def test_template_death_is_survived(make_spec: SpecFactory, world_dir: Path) -> None:
    """Instances die with their template; the next create starts a new one."""
    spec = make_spec({"handler.py": "def handler(e, c):\n    return 1\n"})

    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox")
        first = await driver.create(spec)
        template = driver.launcher._template
        os.kill(template.proc.pid, signal.SIGKILL)
        await asyncio.wait_for(asyncio.shield(first.exited), 10)
        with pytest.raises(RuntimeExited):
            await call(first, {})
        await first.destroy()
        second = await driver.create(replace(spec, instance_id=uuid.uuid4().hex[:16]))
        try:
            assert (await call(second, {})).ok
            assert driver.launcher._template is not template
        finally:
            await second.destroy()
            await driver.close()

    run(scenario())


def test_without_a_pool_of_slots(make_spec: SpecFactory, world_dir: Path) -> None:
    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox", pool_size=0)
        instances = await asyncio.gather(*(
            driver.create(make_spec({"handler.py": "def handler(e, c):\n    return e\n"}))
            for _ in range(3)))
        try:
            for n, instance in enumerate(instances):
                assert json.loads((await call(instance, {"n": n})).body) == {"n": n}
        finally:
            await asyncio.gather(*(i.destroy() for i in instances))
            await driver.close()

    run(scenario())


def test_limits_follow_the_spec(make_spec: SpecFactory, world_dir: Path) -> None:
    from impuls.sandbox.namespace.launch import PIDS_MAX, cpu_weight

    assert cpu_weight(128) < cpu_weight(1769) == 100 < cpu_weight(10240)

    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox")
        await driver.reap_orphans()
        await driver.start()  # the template and its pool of slots
        instance = await driver.create(make_spec({"handler.py": PROBE}, memory_mb=512))
        try:
            paths = instance.cgroup.paths  # type: ignore[attr-defined]
            if "unified" in paths:
                memory = Path(paths["unified"], "memory.max").read_text()
                pids = Path(paths["unified"], "pids.max").read_text()
            else:
                memory = Path(paths["memory"], "memory.limit_in_bytes").read_text()
                pids = Path(paths["pids"], "pids.max").read_text()
            assert int(memory) == 512 << 20 and int(pids) == PIDS_MAX
            facts = driver.describe()
            assert facts["sandbox"] == "namespace" and facts["unsafe"] is False
            assert facts["cgroup"] == instance.cgroup.version  # type: ignore[attr-defined]
        finally:
            await instance.destroy()
            await driver.close()

    run(scenario())


CRASHER = """
import asyncio, json, sys
from pathlib import Path
from impuls.sandbox.base import InstanceSpec
from impuls.runtimes import default_registry
from tests.sandbox.test_namespace import make_namespace_driver

async def main():
    work, code = Path(sys.argv[1]), Path(sys.argv[2])
    driver = make_namespace_driver(work, sys.argv[3])
    spec = InstanceSpec(instance_id="crash" + sys.argv[3], function_name="c", revision=1,
                        runtime=default_registry().resolve("python3.11"), handler="handler.handler",
                        code_dir=code, memory_mb=128, ephemeral_storage_mb=64,
                        environment={})
    instance = await driver.create(spec)
    print(json.dumps({"cgroup": list(instance.cgroup.paths.values()),
                      "pids": sorted(instance.cgroup.pids())}), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_reap_orphans_after_a_server_crash(launcher: str, make_spec: SpecFactory,
                                           world_dir: Path) -> None:
    spec = make_spec({"handler.py": "def handler(e, c):\n    return 1\n"})
    work = world_dir / "sandbox"
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(work), str(spec.code_dir), launcher],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line, "the crashing server did not start its instance"
        state = json.loads(line)
    finally:
        proc.kill()  # SIGKILL: no clean-up of any kind
        proc.wait()
    assert state["pids"]
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in state["pids"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [pid for pid in state["pids"] if os.path.exists(f"/proc/{pid}")]

    async def scenario() -> int:
        driver = make_namespace_driver(work, launcher)
        try:
            return int(await driver.reap_orphans())
        finally:
            await driver.close()

    reaped = run(scenario())
    assert reaped >= 1
    assert not any(os.path.exists(d) for d in state["cgroup"])
    assert not any(os.path.exists(f"/proc/{pid}") for pid in alive)
    assert not any((work / "run").iterdir())


def test_make_driver_selection(world_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from impuls.sandbox.namespace.driver import NamespaceDriver
    from impuls.sandbox.process import ProcessDriver

    def make(kind: str, data_dir: Path) -> object:
        settings = config.load({"sandbox": kind, "data_dir": data_dir}, environ={})
        return make_driver(settings, default_registry())

    assert isinstance(make("namespace", world_dir / "a"), NamespaceDriver)
    assert isinstance(make("auto", world_dir / "b"), NamespaceDriver)
    monkeypatch.setattr(namespace, "available", lambda: "no bubblewrap here")
    with pytest.raises(ConfigError, match="no bubblewrap here"):
        make("namespace", world_dir / "c")
    assert isinstance(make("auto", world_dir / "d"), ProcessDriver)



def test_deep_data_directory(make_spec: SpecFactory, world_dir: Path) -> None:
    """Unix socket paths are limited to 107 bytes; the work directory is not."""
    deep = world_dir.joinpath(*["a-rather-long-directory-name"] * 6)

    async def scenario() -> None:
        driver = make_namespace_driver(deep / "sandbox")
        instance = await driver.create(make_spec({"handler.py": "def handler(e, c):\n    return 5\n"}))
        try:
            assert json.loads((await call(instance, {})).body) == 5
        finally:
            await instance.destroy()
            await driver.close()

    run(scenario())


# --- template rotation ------------------------------------------------------------------

LAYOUT = r"""
import ctypes
def handler(event, context):
    maps = open("/proc/self/maps").read().splitlines()
    return {
        "libc": next(l.split("-")[0] for l in maps if "/libc.so" in l),
        "heap": next((l.split("-")[0] for l in maps if l.endswith("[heap]")), None),
        "printf": ctypes.cast(ctypes.CDLL(None).printf, ctypes.c_void_p).value,
        "hash": hash("impuls"),
    }
"""


async def layout(instance: Any) -> dict[str, Any]:
    """What an instance forked from a template inherits from it: where libc is mapped,
    the address of a libc symbol, and the string-hash secret (as ``hash("impuls")``)."""
    reply = await call(instance, {})
    assert reply.ok, reply.body
    seen: dict[str, Any] = json.loads(reply.body)
    return seen


def same_template(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["libc"], a["printf"], a["hash"]) == (b["libc"], b["printf"], b["hash"])


def new_template(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Nothing of the layout nor the hash secret in common."""
    return a["libc"] != b["libc"] and a["printf"] != b["printf"] and a["hash"] != b["hash"]


async def until(ready: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait for ``ready()`` (a liveness bound, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"still waiting for {what} after {timeout:.0f} s"
        await asyncio.sleep(0.02)


def cgroup_dirs(driver: Any) -> set[str]:
    return {name for parent in driver.cgroups.parent_paths if os.path.isdir(parent)
            for name in os.listdir(parent) if os.path.isdir(os.path.join(parent, name))}


def kept(driver: Any) -> set[str]:
    """The cgroups a driver uses: its launcher's (templates, slots) and its instances'."""
    names: set[str] = driver.launcher.cgroup_names() | set(driver._live.values())
    return names


def test_template_rotates_after_max_forks(make_spec: SpecFactory, world_dir: Path) -> None:
    """After 3 instances the template is replaced: later instances get another address-space
    layout and hash secret, instances of one template share them, and the old template
    stays only as long as its instances (they live in its pid namespace)."""
    spec = make_spec({"handler.py": LAYOUT})

    def fresh() -> Any:
        return replace(spec, instance_id=uuid.uuid4().hex[:16])

    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox", template_max_forks=3)
        launcher = driver.launcher
        await driver.start()
        old = launcher._template
        old_pids = old.cgroup.pids()
        old_cgroup = list(old.cgroup.paths.values())
        first = [await driver.create(fresh()) for _ in range(3)]
        second: list[Any] = []
        try:
            before = [await layout(i) for i in first]
            await until(lambda: launcher.rotations == 1, "the rotation")
            assert launcher._template is not old and launcher.rotation_failures == 0
            assert all(s.origin is launcher._template for s in launcher._pools[""])  # old slots are gone
            second = [await driver.create(fresh()) for _ in range(2)]
            after = [await layout(i) for i in second]
            assert all(same_template(before[0], b) for b in before[1:]), before
            assert same_template(after[0], after[1]), after
            assert all(new_template(b, a) for b in before for a in after), (before, after)
            assert launcher.rotations == 1  # 2 instances of the new one: not due yet

            # the old template's instances keep running, and so does it (their pid namespace)
            assert same_template(await layout(first[0]), before[0])
            assert old.proc.poll() is None and old.retired
            await asyncio.gather(*(i.destroy() for i in first))
            await until(lambda: old.closed and old.proc.poll() is not None
                        and not any(os.path.exists(d) for d in old_cgroup), "the old template to stop")
            await until(lambda: not launcher._stopping, "the old template's clean-up")
            assert not set(live_pids(lambda _: True)) & old_pids  # (zombies wait for the host's init)
            await until(lambda: cgroup_dirs(driver) == kept(driver), "no cgroup but those in use")
            assert old.cgroup.name not in kept(driver)
        finally:
            await asyncio.gather(*(i.destroy() for i in [*first, *second]))
            await driver.close()
        assert not any(os.path.exists(d) for d in driver.cgroups.parent_paths)

    run(scenario())


def test_template_rotates_with_age(make_spec: SpecFactory, world_dir: Path) -> None:
    """A template older than its maximum age is replaced even on an idle server."""
    spec = make_spec({"handler.py": LAYOUT})

    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox", template_max_age=1.0)
        first = await driver.create(spec)
        second = None
        try:
            before = await layout(first)
            await until(lambda: driver.launcher.rotations >= 1, "the rotation by age")
            second = await driver.create(replace(spec, instance_id=uuid.uuid4().hex[:16]))
            assert new_template(before, await layout(second))
        finally:
            await first.destroy()
            if second is not None:
                await second.destroy()
            await driver.close()

    run(scenario())


def test_template_age_on_an_injected_clock(make_spec: SpecFactory, world_dir: Path) -> None:
    """The age is measured on the launcher's clock; the next start after it expired
    triggers the replacement (that start itself is still served by the old template)."""
    spec = make_spec({"handler.py": LAYOUT})
    now = [1000.0]

    def fresh() -> Any:
        return replace(spec, instance_id=uuid.uuid4().hex[:16])

    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox", template_max_age=600.0,
                                       clock=lambda: now[0])
        instances = [await driver.create(fresh())]
        try:
            now[0] += 599
            instances.append(await driver.create(fresh()))
            assert driver.launcher.rotations == 0 and driver.launcher._rotation is None
            now[0] += 2
            instances.append(await driver.create(fresh()))
            await until(lambda: driver.launcher.rotations == 1, "the rotation")
            instances.append(await driver.create(fresh()))
            seen = [await layout(i) for i in instances]
            assert same_template(seen[0], seen[1]) and same_template(seen[0], seen[2])
            assert new_template(seen[0], seen[3])
        finally:
            await asyncio.gather(*(i.destroy() for i in instances))
            await driver.close()

    run(scenario())


def test_cold_starts_during_a_rotation(make_spec: SpecFactory, world_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """While the new template starts (held back here), the old one keeps serving."""
    from impuls.sandbox.namespace.template import TemplateProcess

    spec = make_spec({"handler.py": LAYOUT})

    def fresh() -> Any:
        return replace(spec, instance_id=uuid.uuid4().hex[:16])

    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox", template_max_forks=1)
        launcher = driver.launcher
        await driver.start()
        gate, real_start = asyncio.Event(), TemplateProcess.start

        async def held_back(*args: Any, **kwargs: Any) -> TemplateProcess:
            await gate.wait()
            return await real_start(*args, **kwargs)

        monkeypatch.setattr(TemplateProcess, "start", staticmethod(held_back))
        instances = [await driver.create(fresh())]  # due after this one
        try:
            assert launcher._rotation is not None
            instances += await asyncio.gather(*(driver.create(fresh()) for _ in range(6)))
            seen = [await layout(i) for i in instances]
            assert all(same_template(seen[0], s) for s in seen[1:])  # all from the old template
            assert launcher.rotations == 0 and launcher._rotation is not None
            gate.set()
            await until(lambda: launcher.rotations == 1, "the rotation")
            instances.append(await driver.create(fresh()))
            assert new_template(seen[0], await layout(instances[-1]))
        finally:
            gate.set()
            await asyncio.gather(*(i.destroy() for i in instances))
            await driver.close()

    run(scenario())


def test_failed_rotation_keeps_the_old_template(make_spec: SpecFactory, world_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A replacement that cannot start is logged, the old template keeps serving (no
    fallback to one bwrap per instance) and the replacement is tried again later."""
    from impuls.sandbox.namespace import template as template_module
    from impuls.sandbox.namespace.template import TemplateProcess

    monkeypatch.setattr(template_module, "ROTATE_RETRY", 0.2)
    real_start, broken = TemplateProcess.start, [True]

    async def start(host: Any, runtimes: Any, interpreter: str, *args: Any) -> TemplateProcess:
        # while broken, a new template's bwrap cannot exec its interpreter
        return await real_start(host, runtimes, "/nonexistent/python3" if broken[0] else interpreter,
                                *args)
    spec = make_spec({"handler.py": LAYOUT})

    def fresh() -> Any:
        return replace(spec, instance_id=uuid.uuid4().hex[:16])

    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox", template_max_forks=1)
        launcher = driver.launcher
        await driver.start()
        old = launcher._template
        monkeypatch.setattr(TemplateProcess, "start", staticmethod(start))
        instances = [await driver.create(fresh())]
        try:
            await until(lambda: launcher.rotation_failures >= 2, "two failed attempts")
            instances += await asyncio.gather(*(driver.create(fresh()) for _ in range(3)))
            seen = [await layout(i) for i in instances]
            assert all(same_template(seen[0], s) for s in seen[1:]), seen
            assert driver.launcher is launcher and launcher._template is old and old.alive
            assert launcher.rotations == 0
            assert "cannot start a new template" in caplog.text
            # a failed attempt leaves nothing starting (the next one may begin at any time)
            await until(lambda: not launcher._starting, "no replacement being started")
            assert old.cgroup.name in cgroup_dirs(driver)
            await until(lambda: cgroup_dirs(driver) == kept(driver), "no cgroup but those in use")
            broken[0] = False  # the next attempt succeeds
            await until(lambda: launcher.rotations == 1, "the retried rotation")
            instances.append(await driver.create(fresh()))
            assert new_template(seen[0], await layout(instances[-1]))
        finally:
            await asyncio.gather(*(i.destroy() for i in instances))
            await driver.close()

    caplog.set_level("WARNING", logger="impuls.sandbox.namespace.template")
    run(scenario())


def test_rotation_limits_are_driver_parameters(world_dir: Path) -> None:
    from impuls.sandbox.namespace import template
    from impuls.sandbox.namespace.driver import NamespaceDriver

    driver = NamespaceDriver(world_dir / "a", default_registry())
    assert (driver.launcher.max_forks, driver.launcher.max_age) == (  # type: ignore[attr-defined]
        template.TEMPLATE_MAX_FORKS, template.TEMPLATE_MAX_AGE) == (1000, 600.0)
    driver = NamespaceDriver(world_dir / "b", default_registry(), template_max_forks=7,
                             template_max_age=30.0)
    assert (driver.launcher.max_forks, driver.launcher.max_age) == (7, 30.0)  # type: ignore[attr-defined]
    for bad in ({"template_max_forks": 0}, {"template_max_age": 0.0}):
        with pytest.raises(ConfigError):
            NamespaceDriver(world_dir / "c", default_registry(), **bad)  # type: ignore[arg-type]


# --- sandboxes killed from outside --------------------------------------------------------------


def cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def sigkill(pid: int, expect: bytes) -> bool:
    """SIGKILL ``pid`` if its command line still holds ``expect`` (a process that exited
    meanwhile, or a pid reused by another, is left alone); whether it was signalled."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if expect not in b"\0".join(cmdline(pid)):
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def gone(pid: int) -> bool:
    """``pid`` has exited (it may wait as a zombie for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def pid_depth(pid: int | str) -> int:
    """How many pid namespaces ``pid`` is seen in (ours and those below it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((len(line.split()) - 1 for line in status.splitlines() if line.startswith("NSpid:")), 0)


def template_processes(pids: Any) -> list[int]:
    """Among ``pids``, the template processes: Python running zygote.py as bwrap's child,
    in bwrap's pid namespace (a slot being built shows that command line a moment too: as
    the template's child, then in a pid namespace of its own below the template's)."""
    depth = pid_depth("self") + 1
    return [pid for pid in pids if cmdline(pid)[1:2] == [b"/var/runtime/zygote.py"]
            and pid_depth(pid) == depth and cmdline(parent_of(pid) or 0)[:1] == [b"/usr/bin/bwrap"]]


def cgroup_members(name: str) -> list[int]:
    """Live host pids in the cgroup ``name`` (an instance's: its id, or its slot's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            lines = (entry / "cgroup").read_text().splitlines()
        except OSError:
            continue
        if any(line.endswith(f"/{name}") for line in lines) and not gone(int(entry.name)):
            found.append(int(entry.name))
    return found


def starting_instance(driver: Any, instance_id: str) -> dict[str, int]:
    """The processes of an instance that is starting: ``runtime`` (the interpreter) and
    ``pid1`` (the template's pid 1 of the instance, or bwrap's), when they are there."""
    name = driver._live.get(instance_id)
    found: dict[str, int] = {}
    for pid in cgroup_members(name) if name else []:
        argv = cmdline(pid)
        bwrap = [b"/usr/bin/bwrap"]
        inner_bwrap = argv[:1] == bwrap and cmdline(parent_of(pid) or 0)[:1] == bwrap
        if argv[:1] == [b"impuls-init"] or inner_bwrap:
            found["pid1"] = pid
        elif argv[:1] != [b"/usr/bin/bwrap"] and b"/var/runtime/bootstrap.py" in argv:
            found["runtime"] = pid
    return found


#: a module that takes its time to load: long enough to be killed in the middle of it
SLOW_START = "import time\ntime.sleep(20)\n\ndef handler(event, context):\n    return 'ok'\n"


@pytest.mark.parametrize("victim", ["runtime", "pid1"])
def test_a_runtime_killed_while_it_starts_is_no_init_failure(launcher: str, victim: str,
                                                             make_spec: SpecFactory,
                                                             world_dir: Path) -> None:
    """SIGKILL from outside (no init error reported, not out of memory) is the sandbox's
    death, SandboxKilled: the engine starts the instance again, and never replays it."""
    from impuls.errors import SandboxKilled

    spec = make_spec({"handler.py": SLOW_START})

    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox", launcher)
        start = asyncio.create_task(driver.create(spec))
        try:
            await until(lambda: {"runtime", victim} <= starting_instance(driver, spec.instance_id).keys()
                        or start.done(), "the runtime to be loading the function")
            assert not start.done()
            pid1 = b"impuls-init" if launcher == "template" else b"/usr/bin/bwrap"
            expect = {"runtime": b"/var/runtime/bootstrap.py", "pid1": pid1}[victim]
            assert sigkill(starting_instance(driver, spec.instance_id)[victim], expect)
            with pytest.raises(SandboxKilled) as info:
                await start
            assert not isinstance(info.value, InitFailed)
            assert info.value.error_type == "Sandbox.StartFailed" and "SIGKILL" in info.value.message
            assert spec.instance_id not in driver._live  # nothing left behind
            instance = await driver.create(replace(spec, code_dir=make_spec(
                {"handler.py": "def handler(e, c):\n    return 'ok'\n"}).code_dir))
            try:
                assert json.loads((await call(instance, {})).body) == "ok"
            finally:
                await instance.destroy()
        finally:
            if not start.done():
                start.cancel()
            await asyncio.gather(start, return_exceptions=True)
            await driver.close()

    run(scenario())


OWN_FAILURES = {
    "raises": ("import nope_nope_nope\n", "Runtime.ImportModuleError"),
    "exits": ("import os\nos._exit(3)\n", "Runtime.ExitError"),
    # a fatal signal of its own (one that dumps no core)
    "signals-itself": ("import os, signal\nos.kill(os.getpid(), signal.SIGUSR1)\n", "Runtime.ExitError"),
    # the kernel's SIGKILL for the memory limit: still the function's own failure
    "out-of-memory": ("chunks = [bytearray(1 << 20) for _ in range(1024)]\n", "Runtime.OutOfMemory"),
}


@pytest.mark.parametrize("failure", list(OWN_FAILURES))
def test_a_function_that_fails_to_start_by_itself_is_an_init_failure(
        launcher: str, failure: str, make_spec: SpecFactory, world_dir: Path) -> None:
    from impuls.errors import SandboxKilled

    code, error_type = OWN_FAILURES[failure]

    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox", launcher)
        try:
            with pytest.raises(InitFailed) as info:
                await driver.create(make_spec({"handler.py": code + SLOW_START}, memory_mb=128))
            assert not isinstance(info.value, SandboxKilled)
            assert info.value.error_type == error_type, info.value.message
        finally:
            await driver.close()

    run(scenario())


@pytest.mark.parametrize("victim", ["template", "bwrap"])
def test_cold_starts_survive_the_template_being_killed(victim: str, make_spec: SpecFactory,
                                                       world_dir: Path) -> None:
    """Starts under way when the template dies either finish or lose their sandbox
    (SandboxKilled, which the engine starts again), never another failure; the starts
    after it get a new template, transparently (no fall-back to one bwrap per instance)."""
    from impuls.errors import SandboxKilled
    from impuls.sandbox.namespace.driver import NamespaceInstance

    spec = make_spec({"handler.py": "def handler(e, c):\n    return e\n"})

    def fresh() -> Any:
        return replace(spec, instance_id=uuid.uuid4().hex[:16])

    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox")
        launcher = driver.launcher
        await driver.start()
        instances: list[Any] = []
        try:
            for pause in (0.0, 0.002, 0.01):  # a few interleavings of the starts and the death
                template = launcher._template
                if template is None or not template.alive:
                    instances.append(await driver.create(fresh()))
                    template = launcher._template
                pid = (template_processes(template.cgroup.pids())[0] if victim == "template"
                       else template.proc.pid)
                racing = [asyncio.create_task(driver.create(fresh())) for _ in range(4)]
                await asyncio.sleep(pause)
                assert sigkill(pid, b"zygote.py")
                for outcome in await asyncio.gather(*racing, return_exceptions=True):
                    if isinstance(outcome, NamespaceInstance):
                        instances.append(outcome)  # (it may have died with its template since)
                    else:
                        assert isinstance(outcome, SandboxKilled), repr(outcome)
                await until(functools.partial(gone, pid), "the template to be gone")
                after = await asyncio.gather(*(driver.create(fresh()) for _ in range(4)))
                instances += after
                for n, instance in enumerate(after):
                    assert json.loads((await call(instance, {"n": n})).body) == {"n": n}
                assert launcher._template is not template and launcher._template.alive
            assert driver.launcher is launcher  # still forking from templates
        finally:
            await asyncio.gather(*(i.destroy() for i in instances))
            await driver.close()

    run(scenario())


def test_a_killed_template_is_replaced_before_the_next_start(make_spec: SpecFactory,
                                                            world_dir: Path) -> None:
    """The launcher notices its template's death at once and starts a new one with a pool
    of slots in the background, so that the next start need not."""
    spec = make_spec({"handler.py": "def handler(e, c):\n    return 2\n"})

    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox")
        launcher = driver.launcher
        await driver.start()
        old = launcher._template
        try:
            assert sigkill(template_processes(old.cgroup.pids())[0], b"zygote.py")
            await until(lambda: launcher._template is not old and launcher._template is not None
                        and launcher._template.alive and len(launcher._pools[""]) == launcher.pool_size,
                        "a new template with a full pool of slots")
            assert all(slot.origin is launcher._template for slot in launcher._pools[""])
            instance = await driver.create(spec)
            try:
                assert json.loads((await call(instance, {})).body) == 2
            finally:
                await instance.destroy()
            await until(lambda: old.closed and old.cgroup.name not in cgroup_dirs(driver),
                        "the dead template's clean-up")
        finally:
            await driver.close()

    run(scenario())


def test_killing_the_template_spares_the_instances_of_a_replaced_one(make_spec: SpecFactory,
                                                                     world_dir: Path) -> None:
    """A replaced template (kept for its instances) is another process: the current one's
    death does not touch its instances."""
    spec = make_spec({"handler.py": "def handler(e, c):\n    return e\n"})

    def fresh() -> Any:
        return replace(spec, instance_id=uuid.uuid4().hex[:16])

    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox", template_max_forks=1)
        launcher = driver.launcher
        await driver.start()
        first = await driver.create(fresh())  # the template is replaced after this one
        instances = [first]
        try:
            old = launcher._template
            await until(lambda: launcher.rotations == 1, "the rotation")
            current = launcher._template
            assert current is not old and old.alive and old.retired
            assert sigkill(template_processes(current.cgroup.pids())[0], b"zygote.py")
            await until(lambda: not current.alive, "the template's death")
            assert json.loads((await call(first, {"n": 1})).body) == {"n": 1}  # still warm
            assert not first.exited.done() and old.alive
            instances.append(await driver.create(fresh()))
            assert json.loads((await call(instances[-1], {"n": 2})).body) == {"n": 2}
        finally:
            await asyncio.gather(*(i.destroy() for i in instances))
            await driver.close()

    run(scenario())


def test_slots_whose_waiting_runtime_was_killed_are_not_assigned(make_spec: SpecFactory,
                                                                 world_dir: Path) -> None:
    """A slot's process waiting to become the runtime shows the template's command line, so
    whatever kills the template by its name kills those too: such a slot is never handed a
    function (it would fail as the sandbox), the next starts take good ones."""
    spec = make_spec({"handler.py": "def handler(e, c):\n    return e\n"})

    def fresh() -> Any:
        return replace(spec, instance_id=uuid.uuid4().hex[:16])

    async def scenario() -> None:
        driver = make_namespace_driver(world_dir / "sandbox")
        launcher = driver.launcher
        await driver.start()
        await until(lambda: len(launcher._pools[""]) == launcher.pool_size, "a full pool of slots")
        template = launcher._template
        waiting = [pid for slot in launcher._pools[""] for pid in cgroup_members(slot.cgroup.name)
                   if cmdline(pid)[1:2] == [b"/var/runtime/zygote.py"]]
        assert len(waiting) == launcher.pool_size
        for pid in waiting:
            assert sigkill(pid, b"zygote.py")
        await until(lambda: all(gone(pid) for pid in waiting), "the slots' runtimes to be gone")
        instances = []
        try:
            for n in range(launcher.pool_size + 1):
                instances.append(await driver.create(fresh()))
                assert json.loads((await call(instances[-1], {"n": n})).body) == {"n": n}
            assert launcher._template is template  # the template itself was not touched
        finally:
            await asyncio.gather(*(i.destroy() for i in instances))
            await driver.close()

    run(scenario())
