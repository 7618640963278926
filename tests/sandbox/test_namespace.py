"""The namespace driver through its real launchers (template and one bwrap per instance).

Needs root, bubblewrap, libseccomp and cgroups; skipped with the reason from
``impuls.sandbox.namespace.available()`` otherwise.  The shared behaviour is in
``test_conformance.py``; this file covers what is particular to the driver:
isolation as seen from inside, limits, destroy, crash recovery and template rotation.
"""

from __future__ import annotations

import asyncio
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
        return NamespaceDriver(work, default_registry(), launcher=lambda host, _: BwrapLauncher(host))
    return NamespaceDriver(work, default_registry(), launcher=lambda host, runtimes: TemplateLauncher(
        host, runtimes.available(), **template))


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
            assert all(s.origin is launcher._template for s in launcher._pool)  # old slots are gone
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
            assert not launcher._starting and old.cgroup.name in cgroup_dirs(driver)
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
