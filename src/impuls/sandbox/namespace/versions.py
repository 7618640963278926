"""Init once, fork many: a Python function version's init runs once, in a *version
template*, and its instances are forked from it (docs/init-once.md).

A version template is an instance of the function like any other -- started from a
slot of the template launcher that ``hosts_versions``, with the function's code,
environment, cgroup and Runtime API socket, so that a failed, crashed or killed init
ends exactly as it does for an instance started today -- except that once its init
has succeeded it serves no call: it waits for fork requests on a channel of its own
(:mod:`.zygote`, ``_serve_forks``).  Each forked instance gets its own user, mount,
pid, network, ipc, uts and cgroup namespaces, cgroup, ``/tmp``, ``/dev/shm``, Runtime
API socket and output pipe, the instance seccomp filter, and re-seeds its randomness
before its first call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from impuls.sandbox.base import InstanceSpec
from impuls.sandbox.namespace import cgroups
from impuls.sandbox.namespace.launch import (
    PIDS_MAX,
    Launched,
    LaunchFailed,
    SandboxLost,
    close_fds,
    cpu_weight,
    sandbox_env,
)
from impuls.sandbox.namespace.slots import SlotControl, detached_mount
from impuls.sandbox.namespace.template import SHM_MB, SLOT_TIMEOUT, TemplateLauncher

if TYPE_CHECKING:
    from impuls.sandbox.namespace.driver import NamespaceInstance

log = logging.getLogger("impuls.sandbox.namespace.versions")

#: a version template's key: function name, version, revision, code directory
TemplateKey = tuple[str, str, int, str]
#: Empty slots kept ready for new version templates (each: two idle forked processes).
POOL_SIZE = 1


def template_key(spec: InstanceSpec) -> TemplateKey:
    return (spec.function_name, spec.version, spec.revision, str(spec.code_dir))


class VersionTemplate:
    """One function version's initialised runtime, and the server's end of its fork
    channel.  It stays until it is retired *and* the last instance forked from it is
    gone: they live in its pid namespace, which ends with it."""

    def __init__(self, key: TemplateKey, instance: NamespaceInstance, channel: socket.socket,
                 host: cgroups.CgroupHost, clock: Callable[[], float]) -> None:
        self.key = key
        self.instance = instance
        self.channel = channel
        self.host = host
        self.clock = clock
        self.last_used = clock()
        self.forks = 0
        self.retired = False
        instance.drain_output()
        #: what the init wrote, for the logs of the first call (of the start that ran it)
        self.init_output: bytes | None = instance.output.take()[0].encode()
        #: control sockets of the instances forked from it that still have a process
        self.users: set[SlotControl] = set()
        self.on_idle: Callable[[VersionTemplate], None] | None = None

    @property
    def usable(self) -> bool:
        return not self.retired and not self.instance.destroyed and not self.instance.exited.done()

    async def fork(self, spec: InstanceSpec, socket_path: Path) -> Launched:
        """Fork one instance of ``spec`` (every process of it in its own cgroup before it
        runs anything).  ``SandboxLost`` when the template is gone (the next start makes
        a new one), ``LaunchFailed`` when the instance could not be built."""
        cgroup = self.host.create(f"fork-{uuid.uuid4().hex[:12]}", spec.memory_mb, PIDS_MAX,
                                  cpu_weight(spec.memory_mb))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        control = SlotControl(ours, cgroup)
        self.users.add(control)
        control.exited.add_done_callback(lambda _: self._released(control))
        sock_fd = out_r = out_w = -1
        try:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock_fd = detached_mount(socket_path)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            request = json.dumps({"id": spec.instance_id, "env": sandbox_env(spec),
                                  "tmp_mb": spec.ephemeral_storage_mb, "shm_mb": SHM_MB}).encode()
            if not self.usable:
                raise SandboxLost("the version template is gone")
            try:
                self.channel.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                  struct.pack("3i", theirs.fileno(), sock_fd, out_w))])
            except OSError as exc:
                raise SandboxLost(f"the version template is gone: {exc}") from exc
            control.read_output(out_r)
            out_r = -1
            self.forks += 1
            theirs.close()
            try:
                await asyncio.wait_for(asyncio.shield(control.ready), SLOT_TIMEOUT)
            except TimeoutError as exc:
                raise LaunchFailed("the forked instance was not built in time") from exc
            except LaunchFailed as exc:
                if not self.usable:
                    raise SandboxLost(f"the version template died ({exc.message})") from exc
                raise
        except BaseException:
            theirs.close()
            close_fds(out_r)
            control.close()
            with contextlib.suppress(cgroups.CgroupError):
                await asyncio.to_thread(cgroup.remove)
            raise
        finally:
            close_fds(sock_fd, out_w)
        return Launched(control, cgroup)

    def _released(self, control: SlotControl) -> None:
        self.users.discard(control)
        self.last_used = self.clock()
        if not self.users and self.on_idle is not None:
            self.on_idle(self)

    async def close(self) -> None:
        """End the template (and whatever it forked that is still running); idempotent."""
        self.retired = True
        self.channel.close()
        await self.instance.destroy()


StartTemplate = Callable[[InstanceSpec, Callable[[Path], Awaitable[Launched]],
                          Callable[["NamespaceInstance"], None]], Awaitable["NamespaceInstance"]]


class VersionTemplates:
    """The version templates of one namespace driver, one per function version at most.

    ``template(spec)`` gives the version's template, starting it on first use (callers
    that come meanwhile wait for the same start; a failed start is raised to each and
    leaves nothing behind, so the next start tries again -- as every cold start does
    today).  A template is retired by ``retire`` (the function was updated or deleted)
    and by ``expire_idle`` (no instance forked from it for the idle timeout); a retired
    template forks no more and ends once its last instance is gone.  ``start`` is the
    driver's instance start (with its error handling), which the template goes through.
    """

    def __init__(self, launcher: TemplateLauncher, host: cgroups.CgroupHost, start: StartTemplate,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.launcher = launcher
        self.host = host
        self._start = start
        self.clock = clock
        self._templates: dict[TemplateKey, VersionTemplate] = {}
        self._starting: dict[TemplateKey, asyncio.Future[VersionTemplate]] = {}
        self._retired: set[VersionTemplate] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self.forked_once = False  # an instance was forked on this host (forking works here)

    def serves(self, spec: InstanceSpec) -> bool:
        return spec.init_once and self.launcher.preloads(spec.runtime)

    def cgroup_names(self) -> set[str]:
        return self.launcher.cgroup_names()

    @property
    def live(self) -> int:
        """Templates running (serving or retired with instances left)."""
        return len(self._templates) + len(self._retired)

    async def template(self, spec: InstanceSpec) -> VersionTemplate:
        key = template_key(spec)
        current = self._templates.get(key)
        if current is not None:
            if current.usable:
                current.last_used = self.clock()
                return current
            self._retire(current)
        starting = self._starting.get(key)
        if starting is not None:
            return await asyncio.shield(starting)
        future: asyncio.Future[VersionTemplate] = asyncio.get_running_loop().create_future()
        self._starting[key] = future
        try:
            template = await self._new(key, spec)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: there may be no other waiter
            raise
        finally:
            del self._starting[key]
        future.set_result(template)
        self._templates[key] = template
        return template

    async def _new(self, key: TemplateKey, spec: InstanceSpec) -> VersionTemplate:
        """Start the template of ``spec``'s version: an instance whose init, once done,
        reports ``ready`` on its channel instead of asking for a call."""
        tspec = dataclasses.replace(spec, instance_id=f"tmpl{uuid.uuid4().hex[:12]}")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        loop = asyncio.get_running_loop()

        def watch(instance: NamespaceInstance) -> None:
            def on_message() -> None:
                try:
                    message = ours.recv(64, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    message = b""
                if message == b"ready" and not instance.api.ready.done():
                    instance.api.ready.set_result(None)  # the init succeeded
                if message != b"ready":
                    loop.remove_reader(ours.fileno())

            loop.add_reader(ours.fileno(), on_message)

        try:
            instance = await self._start(
                tspec, lambda path: self.launcher.launch(tspec, path, channel=theirs.fileno()), watch)
        except BaseException:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(ours.fileno())
            ours.close()
            raise
        finally:
            theirs.close()
        loop.remove_reader(ours.fileno())
        ours.setblocking(True)
        ours.settimeout(SLOT_TIMEOUT)
        log.info("version template of %s:%s (revision %d) ready", *key[:3])
        template = VersionTemplate(key, instance, ours, self.host, self.clock)
        template.on_idle = self._maybe_close
        return template

    def retire(self, function_name: str, version: str | None = None) -> None:
        """Retire the templates of ``function_name``'s ``version`` (None: of every version)."""
        for key, template in list(self._templates.items()):
            if key[0] == function_name and version in (None, key[1]):
                self._retire(template)

    def expire_idle(self, idle_timeout: float) -> int:
        """Retire templates that forked nothing, and have had no instance, for ``idle_timeout``."""
        now = self.clock()
        idle = [t for t in self._templates.values() if not t.users and now - t.last_used >= idle_timeout]
        for template in idle:
            self._retire(template)
        return len(idle)

    def _retire(self, template: VersionTemplate) -> None:
        if self._templates.get(template.key) is template:
            del self._templates[template.key]
        template.retired = True
        self._retired.add(template)
        self._maybe_close(template)

    def _maybe_close(self, template: VersionTemplate) -> None:
        if template.retired and not template.users and template in self._retired:
            self._retired.discard(template)
            task = asyncio.get_running_loop().create_task(template.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for template in [*self._templates.values(), *self._retired]:
            await template.close()
        self._templates.clear()
        self._retired.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)
        await self.launcher.close()
