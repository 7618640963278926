"""The ``namespace`` driver: each instance in its own Linux namespaces and cgroup.

What an instance gets, and how it is started, is described in docs/sandboxes.md
("namespace"); starting one is a launcher's business (:mod:`.launch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from impuls.errors import ConfigError, InitFailed, SandboxKilled, SandboxStartFailed
from impuls.runtimes import RuntimeRegistry
from impuls.sandbox.base import Instance, InstanceSpec, SandboxDriver, WatchedInstance, kill_signal
from impuls.sandbox.namespace import cgroups, seccomp
from impuls.sandbox.namespace.bwrap_launch import BwrapLauncher, BwrapRuntime
from impuls.sandbox.namespace.launch import (
    SANDBOX_GID,
    SANDBOX_UID,
    Launched,
    LaunchedRuntime,
    Launcher,
    LauncherUnavailable,
    LaunchFailed,
    SandboxLost,
)
from impuls.sandbox.namespace.template import TEMPLATE_MAX_AGE, TEMPLATE_MAX_FORKS, TemplateLauncher
from impuls.sandbox.namespace.tmpdisk import TmpDisks
from impuls.sandbox.namespace.versions import POOL_SIZE as VERSION_POOL_SIZE
from impuls.sandbox.namespace.versions import VersionTemplates
from impuls.sandbox.runtime_api import Invocation, RuntimeAPI, RuntimeReply

log = logging.getLogger("impuls.sandbox.namespace.driver")

INIT_TIMEOUT = 30.0
KILL_GRACE = 0.2
#: seconds between two looks at an instance's process limit (``pids.events``, a read of the
#: cgroup file system that every warm call paid for): a call that ran this long is always
#: looked at after; a shorter one may be left to the next call's look
PIDS_CHECK_INTERVAL = 0.1
MAX_SOCKET_PATH = 100


def default_launcher(host: cgroups.CgroupHost, runtimes: RuntimeRegistry, tmp_disks: TmpDisks,
                     template_max_forks: int = TEMPLATE_MAX_FORKS,
                     template_max_age: float = TEMPLATE_MAX_AGE) -> Launcher:
    """The template launcher when a Python interpreter can host it (replaced after
    ``template_max_forks`` instances or ``template_max_age`` seconds), else one bwrap
    per instance."""
    from impuls.sandbox.namespace.template import TemplateLauncher, template_interpreter

    available = runtimes.available()
    if template_interpreter(available) is not None:
        return TemplateLauncher(host, available, tmp_disks, template_max_forks=template_max_forks,
                                template_max_age=template_max_age)
    return BwrapLauncher(host)


# --- instances and the driver --------------------------------------------------------


class NamespaceInstance(WatchedInstance):
    watch: LaunchedRuntime

    def __init__(self, spec: InstanceSpec, api: RuntimeAPI, cgroup: cgroups.Cgroup,
                 runtime: LaunchedRuntime, run_dir: Path, live: dict[str, str]) -> None:
        super().__init__(spec, api, runtime)
        self.cgroup = cgroup
        self.run_dir = run_dir
        self._live = live
        live[spec.instance_id] = cgroup.name
        self._pids_checked = float("-inf")  # when the process limit was last looked at

    def oom_killed(self) -> bool:
        try:
            return self.cgroup.oom_killed()
        except cgroups.CgroupError:
            return False

    async def invoke(self, invocation: Invocation, timeout: float) -> RuntimeReply:
        """As ``Instance.invoke``; an instance that ran into its process limit
        (a fork bomb) is destroyed once the reply is in: it would not serve well.  The
        limit is looked at after a call at most every ``PIDS_CHECK_INTERVAL`` seconds."""
        try:
            return await super().invoke(invocation, timeout)
        finally:
            now = time.monotonic()
            if now - self._pids_checked >= PIDS_CHECK_INTERVAL and not self.destroyed:
                self._pids_checked = now
                if self._fork_limit_hit():
                    log.info("instance %s hit its process limit; retiring it", self.spec.instance_id)
                    await self.destroy()

    def _fork_limit_hit(self) -> bool:
        try:
            return self.cgroup.pids_limit_hits() > 0
        except cgroups.CgroupError:
            return False

    async def wait_ready(self, timeout: float) -> None:
        """As ``Instance.wait_ready``; but a sandbox that died before it took the function
        is ``SandboxLost`` and one that could not be set up ``LaunchFailed``: neither is an
        init failure of the function (nor is a runtime killed from outside, ``SandboxKilled``)."""
        try:
            await super().wait_ready(timeout)
        except (InitFailed, SandboxKilled) as exc:
            if self.exited.done() and self.watch.lost:
                raise SandboxLost(f"the sandbox died before it took the function "
                                  f"({self.watch.error or 'no reason given'})", exc.logs) from exc
            if self.exited.done() and self.watch.error:  # the sandbox, not the code, failed
                raise LaunchFailed(f"the sandbox could not be set up: {self.watch.error}",
                                   exc.logs) from exc
            raise

    def killed_by(self) -> signal.Signals | None:
        """As ``Instance.killed_by``.  The template's pid 1 reports the runtime's status as a
        negative signal number, and -9 when the instance's pid namespace itself was killed;
        bwrap exits with 128 + the signal that killed the runtime, or dies of it itself."""
        if not self.exited.done() or self.exited.cancelled():
            return None
        return kill_signal(self.exited.result(), wrapper=isinstance(self.watch, BwrapRuntime))

    async def _teardown(self) -> None:
        """Kill the instance's pid 1, sweep and remove its cgroup and its socket
        directory; a cgroup that cannot be removed is logged and left to ``reap_orphans``."""
        # Killing pid 1 ends the pid namespace at once; the cgroup sweep after
        # it then finds (almost) nothing and needs no freezing.
        if self.watch.kill():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), KILL_GRACE)
        try:
            await asyncio.to_thread(_sweep, self.cgroup)
        except cgroups.CgroupError as exc:
            log.warning("instance %s: %s (left for reap_orphans)", self.spec.instance_id, exc)
        await self.watch.wait_closed()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self._live.pop(self.spec.instance_id, None)


@contextlib.contextmanager
def _bindable(path: Path) -> Iterator[str]:
    """A name ``bind`` accepts for ``path``: a unix socket path has at most 107
    bytes, so a long one goes through ``/proc/self/fd/<dir fd>/<name>``."""
    if len(os.fsencode(path)) < MAX_SOCKET_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _sweep(cgroup: cgroups.Cgroup) -> None:
    """Let processes already dying leave (briefly), then kill the rest and remove the cgroup."""
    deadline = time.monotonic() + KILL_GRACE
    with contextlib.suppress(cgroups.CgroupError):
        while cgroup.pids() and time.monotonic() < deadline:
            time.sleep(0.001)
    cgroup.remove()


def _remove_all(host: cgroups.CgroupHost) -> None:
    """Kill and remove every cgroup under this driver's parent, then the parent."""
    with contextlib.suppress(cgroups.CgroupError):
        host.reap_stale()
    for path in host.parent_paths:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def cgroup_parent(work_dir: Path) -> str:
    """This server's cgroup parent: ``impuls/<hash of the work dir>``."""
    digest = hashlib.sha256(str(work_dir.resolve()).encode()).hexdigest()[:12]
    return f"{cgroups.PARENT_NAME}/{digest}"


class NamespaceDriver(SandboxDriver):
    """Instances in Linux namespaces (bubblewrap) with cgroup limits (see docs/sandboxes.md)."""

    name = "namespace"
    unsafe = False

    def __init__(self, work_dir: Path, runtimes: RuntimeRegistry,
                 launcher: Callable[[cgroups.CgroupHost, RuntimeRegistry, TmpDisks], Launcher] | None = None,
                 cgroup_host: cgroups.CgroupHost | None = None,
                 template_max_forks: int = TEMPLATE_MAX_FORKS,
                 template_max_age: float = TEMPLATE_MAX_AGE) -> None:
        """``launcher`` makes the launcher from the cgroup host (default:
        :func:`default_launcher`; ``BwrapLauncher`` for one bwrap per instance).
        The default launcher replaces its template after ``template_max_forks``
        instances or ``template_max_age`` seconds, whichever comes first (see
        ``template.TEMPLATE_MAX_FORKS``)."""
        if template_max_forks < 1:
            raise ConfigError(f"namespace sandbox: template_max_forks must be at least 1, "
                              f"not {template_max_forks}")
        if not template_max_age > 0:
            raise ConfigError(f"namespace sandbox: template_max_age must be positive, "
                              f"not {template_max_age}")
        self.work_dir = work_dir
        self.run_root = work_dir / "run"
        try:
            self.run_root.mkdir(parents=True, exist_ok=True)
            host = cgroup_host or cgroups.detect(parent=cgroup_parent(work_dir))
        except OSError as exc:
            raise ConfigError(f"namespace sandbox: cannot prepare {self.run_root}: {exc}") from exc
        except cgroups.CgroupError as exc:
            raise ConfigError(f"namespace sandbox: {exc.message}") from exc
        if host is None:
            raise ConfigError("namespace sandbox: this host has no usable cgroups "
                              "(v2 with memory, pids and cpu, or v1 memory, pids and cpu hierarchies)")
        self.cgroups = host
        try:
            seccomp.build_filter_bpf()
        except seccomp.SeccompError as exc:
            raise ConfigError(f"namespace sandbox: {exc.message}") from exc
        self.tmp_disks = TmpDisks(work_dir / "tmp", (SANDBOX_UID, SANDBOX_GID))
        if launcher is None:
            self.launcher: Launcher = default_launcher(host, runtimes, self.tmp_disks, template_max_forks,
                                                       template_max_age)
        else:
            self.launcher = launcher(host, runtimes, self.tmp_disks)
        self._live: dict[str, str] = {}  # instance id -> cgroup name
        #: init once, fork many (docs/init-once.md): with the template launcher only
        self.versions: VersionTemplates | None = None
        if isinstance(self.launcher, TemplateLauncher) and self.launcher.python is not None:
            self.versions = VersionTemplates(
                TemplateLauncher(host, runtimes.available(), self.tmp_disks, pool_size=VERSION_POOL_SIZE,
                                 template_max_forks=template_max_forks,
                                 template_max_age=template_max_age, hosts_versions=True),
                host, self._create)
        # A driver dropped without close() (tests) takes its sandboxes with it.
        self._finalizer = weakref.finalize(self, _remove_all, host)

    async def create(self, spec: InstanceSpec) -> Instance:
        """Start an instance (see ``SandboxDriver.create``).  A pre-built sandbox that died
        before it took the function is replaced once at once; a second loss in a row is
        ``SandboxKilled`` (the engine may then start the instance again), as is a runtime
        killed from outside while it initialised.  An ``init_once`` Python function's
        instance is forked from its version's template (docs/init-once.md) once there is
        one; the first start of a version runs its own init while the template starts."""
        try:
            return await self._start(spec)
        except SandboxLost as exc:  # a pre-built sandbox died under us: once more, on a new one
            log.info("instance %s: %s; retrying", spec.instance_id, exc)
        try:
            return await self._start(spec)
        except SandboxLost as exc:
            raise SandboxKilled(f"{exc.message}, twice in a row", exc.logs) from exc

    async def _start(self, spec: InstanceSpec) -> Instance:
        versions = self.versions
        if versions is None or not versions.serves(spec):
            return await self._create(spec)
        template = await versions.find(spec)
        if versions.unavailable is not None:
            await self._no_versions(versions, versions.unavailable)
            return await self._create(spec)
        if template is None:  # this start inits; the version's template starts meanwhile
            versions.prepare(spec)
            return await self._create(spec)
        try:
            instance = await self._create(spec, lambda path: template.fork(spec, path))
        except SandboxLost:
            raise
        except SandboxStartFailed as exc:
            if versions.forked_once:
                raise
            # The very first fork failed: this host cannot fork instances from a version
            # template (no nested user namespaces, say).  Start them as before.
            await self._no_versions(versions, exc)
            return await self._create(spec)
        versions.forked_once = True
        return instance

    async def _no_versions(self, versions: VersionTemplates, exc: SandboxStartFailed) -> None:
        """Give up version templates on this host: every instance runs its own init."""
        if self.versions is versions:
            log.warning("namespace sandbox: cannot fork instances from version templates here (%s); "
                        "every instance runs its own init instead", exc)
            self.versions = None
            await versions.close()

    async def _create(self, spec: InstanceSpec,
                      launch: Callable[[Path], Awaitable[Launched]] | None = None,
                      prepare: Callable[[NamespaceInstance], None] | None = None) -> NamespaceInstance:
        """Start one instance with ``launch`` (default: the launcher's) and wait until it
        is ready; ``prepare`` sees it before the wait."""
        api = RuntimeAPI()
        run_dir = self.run_root / spec.instance_id
        try:
            run_dir.mkdir(mode=0o711)
            socket_path = run_dir / "runtime.sock"
            with _bindable(socket_path) as bind_path:
                await api.listen_unix(bind_path)
            if launch is not None:
                launched = await launch(socket_path)
            else:
                try:
                    launched = await self.launcher.launch(spec, socket_path)
                except LauncherUnavailable as exc:
                    if not self._fall_back(exc):
                        raise
                    launched = await self.launcher.launch(spec, socket_path)
        except (OSError, SandboxStartFailed, ValueError) as exc:
            api.close()
            shutil.rmtree(run_dir, ignore_errors=True)
            if isinstance(exc, SandboxStartFailed):
                raise
            raise SandboxStartFailed(f"cannot start a {spec.runtime.id} sandbox: {exc}") from exc
        instance = NamespaceInstance(spec, api, launched.cgroup, launched.runtime, run_dir, self._live)
        instance.note = launched.note
        if prepare is not None:
            prepare(instance)
        await instance.ready_or_destroyed(INIT_TIMEOUT)
        return instance

    async def reap_orphans(self) -> int:
        """Kill and remove every cgroup and socket directory this data directory's
        previous server left behind; only this server's own cgroup parent,
        ``impuls/<hash of the work dir>``, is touched."""
        keep = frozenset({*self._live.values(), *self.launcher.cgroup_names(),
                          *(self.versions.cgroup_names() if self.versions is not None else ())})
        try:
            removed = await asyncio.to_thread(self.cgroups.reap_stale, keep)
        except cgroups.CgroupError as exc:
            log.warning("reaping leftover sandboxes: %s", exc)
            removed = []
        for leftover in self.run_root.iterdir():
            if leftover.name not in self._live:
                shutil.rmtree(leftover, ignore_errors=True)
        return len(removed)

    async def start(self) -> None:
        """Start the launcher (the template and its pool of empty sandboxes)."""
        try:
            await self.launcher.start()
        except LauncherUnavailable as exc:
            self._fall_back(exc)
        except SandboxStartFailed as exc:
            log.warning("namespace sandbox: %s (retried at the first start)", exc)

    def _fall_back(self, exc: LauncherUnavailable) -> bool:
        """Switch to one bwrap per instance when the template cannot run here."""
        if isinstance(self.launcher, BwrapLauncher):
            return False
        log.warning("namespace sandbox: %s; starting one bwrap per instance instead "
                    "(slower cold starts)", exc)
        self.launcher = BwrapLauncher(self.cgroups)
        return True

    def retire_templates(self, function_name: str, version: str | None = None) -> None:
        if self.versions is not None:
            self.versions.retire(function_name, version)

    def expire_templates(self, idle_timeout: float) -> int:
        return self.versions.expire_idle(idle_timeout) if self.versions is not None else 0

    async def close(self) -> None:
        """Stop the launchers; the cgroup parent goes too once no instance is left in it."""
        if self.versions is not None:
            await self.versions.close()
        await self.launcher.close()
        self.tmp_disks.close()
        if not self._live:
            await asyncio.to_thread(self._finalizer)

    def describe(self) -> dict[str, Any]:
        return {
            "sandbox": self.name, "unsafe": False, "cgroup": self.cgroups.version,
            "isolation": (f"user/pid/mount/net/ipc/uts/cgroup namespaces, uid {SANDBOX_UID}, "
                          f"seccomp, read-only root, cgroup {self.cgroups.version} limits; "
                          f"launcher {self.launcher.name}"),
        }
