"""Init once, fork many: a Python function version's init runs once, in a *version
template*, and its instances are forked from it (docs/init-once.md).

A version template is started, in the background, by a version's first cold start
(which runs its own init as it always has).  It is an instance of the function like any
other -- a slot of the template launcher that ``hosts_versions``, with the function's
code, environment, cgroup and Runtime API socket -- except that once its init has
succeeded it serves no call: it forks instance slots on requests that come on a channel
of its own (:mod:`.zygote`, ``_serve_forks``), a few ahead of time.  Each forked
instance gets its own user, mount, pid, network, ipc, uts and cgroup namespaces,
cgroup, ``/tmp``, ``/dev/shm``, Runtime API socket and output pipe, the instance seccomp
filter, and re-seeds its randomness before its first call.
"""

from __future__ import annotations

import asyncio
import collections
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

from impuls.errors import SandboxError, SandboxStartFailed
from impuls.sandbox.base import InstanceSpec
from impuls.sandbox.namespace import cgroups
from impuls.sandbox.namespace.launch import (
    PIDS_MAX,
    Launched,
    LauncherUnavailable,
    LaunchFailed,
    SandboxLost,
    close_fds,
    cpu_weight,
    sandbox_env,
)
from impuls.sandbox.namespace.slots import Slot, SlotControl, SlotGone, detached_mount
from impuls.sandbox.namespace.template import BUILD_ATTEMPTS, SHM_MB, SLOT_TIMEOUT, TemplateLauncher
from impuls.sandbox.namespace.tmpdisk import TmpDisks

if TYPE_CHECKING:
    from impuls.sandbox.namespace.driver import NamespaceInstance

log = logging.getLogger("impuls.sandbox.namespace.versions")

#: a version template's key: function name, version, revision, code directory
TemplateKey = tuple[str, str, int, str]
#: Empty slots kept ready for new version templates (each: two idle forked processes).
POOL_SIZE = 1
#: Instances each version template keeps forked ahead of time (each: two idle processes,
#: their pages shared with the template until written)
SLOTS = 2
#: After a version template could not be started, the next attempt waits this long (s).
RETRY_AFTER = 30.0


def template_key(spec: InstanceSpec) -> TemplateKey:
    return (spec.function_name, spec.version, spec.revision, str(spec.code_dir))


class VersionTemplate:
    """One function version's initialised runtime, and the server's end of its fork
    channel.  It keeps ``SLOTS`` instances forked ahead of time (namespaces, cgroup,
    ``/proc``, ``/tmp`` made; waiting for their Runtime API socket, output pipe and
    environment), so that a cold start only hands one its own.  It stays until it is
    retired *and* the last instance forked from it is gone: they live in its pid
    namespace, which ends with it."""

    def __init__(self, key: TemplateKey, spec: InstanceSpec, instance: NamespaceInstance,
                 channel: socket.socket, host: cgroups.CgroupHost, tmp_disks: TmpDisks,
                 clock: Callable[[], float]) -> None:
        self.key = key
        self.memory_mb, self.tmp_mb = spec.memory_mb, spec.ephemeral_storage_mb
        self.instance = instance
        self.channel = channel
        self.host = host
        self.tmp_disks = tmp_disks
        self.clock = clock
        self.last_used = clock()
        self.retired = False
        #: control sockets of the slots and instances forked from it that still have a process
        self.users: set[SlotControl] = set()
        self.on_idle: Callable[[VersionTemplate], None] | None = None
        self._slots: collections.deque[Slot] = collections.deque()
        self._filling: set[asyncio.Task[None]] = set()

    @property
    def usable(self) -> bool:
        return not self.retired and not self.instance.destroyed and not self.instance.exited.done()

    async def fork(self, spec: InstanceSpec, socket_path: Path) -> Launched:
        """An instance of ``spec``: a slot forked ahead of time (or now, when none is
        ready) handed its Runtime API socket, output pipe and environment.  Every process
        of it is in its own cgroup before it runs anything.  ``SandboxLost`` when the
        template is gone (the next start makes a new one), ``LaunchFailed`` when the
        instance could not be built."""
        request = json.dumps({"id": spec.instance_id, "env": sandbox_env(spec)}).encode()
        for attempt in range(1, BUILD_ATTEMPTS + 1):
            slot = await self._take()
            sock_fd = out_r = out_w = -1
            try:
                sock_fd = detached_mount(socket_path)
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                slot.control.send_assignment(request, [sock_fd, out_w], out_r)
                out_r = -1
            except SlotGone as exc:  # killed since it was forked: another one
                await slot.discard()
                if not self.usable:
                    raise SandboxLost(f"the version template is gone ({exc.message})") from exc
                if attempt == BUILD_ATTEMPTS:
                    raise
                continue
            except BaseException as exc:
                await slot.discard()
                if isinstance(exc, OSError):
                    raise LaunchFailed(f"cannot hand the instance its socket: {exc}") from exc
                raise
            finally:
                close_fds(sock_fd, out_r, out_w)
            self.last_used = self.clock()
            return Launched(slot.control, slot.cgroup)
        raise AssertionError("unreachable")

    async def _take(self) -> Slot:
        while self._slots:
            slot = self._slots.popleft()
            if slot.usable:
                self._refill()
                return slot
            await slot.discard()
        self._refill()
        return await self._fork_slot()

    def _refill(self) -> None:
        missing = SLOTS - len(self._slots) - len(self._filling)
        for _ in range(max(0, missing) if self.usable else 0):
            task = asyncio.get_running_loop().create_task(self._fill_one())
            self._filling.add(task)
            task.add_done_callback(self._filling.discard)

    async def _fill_one(self) -> None:
        try:
            slot = await self._fork_slot()
        except SandboxStartFailed as exc:
            if self.usable:
                log.warning("version template of %s:%s: cannot fork a slot: %s", *self.key[:2], exc)
            return
        if self.usable:
            self._slots.append(slot)
        else:
            await slot.discard()

    async def _fork_slot(self) -> Slot:
        """A new slot forked from the template; it counts as the template's user until
        every process of it is gone.  ``SandboxLost`` when the template is gone."""
        if not self.usable:
            raise SandboxLost("the version template is gone")
        cgroup = self.host.create(f"fork-{uuid.uuid4().hex[:12]}", self.memory_mb, PIDS_MAX,
                                  cpu_weight(self.memory_mb))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        control = SlotControl(ours, cgroup)
        slot = Slot(cgroup, control, self)
        self.users.add(control)
        control.exited.add_done_callback(lambda _: self._released(control))
        try:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            request = json.dumps({"shm_mb": SHM_MB}).encode()
            tmp_fd = await self.tmp_disks.take(self.tmp_mb)
            try:
                self.channel.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                  struct.pack("2i", theirs.fileno(), tmp_fd))])
            except OSError as exc:
                raise SandboxLost(f"the version template is gone: {exc}") from exc
            finally:
                os.close(tmp_fd)
            theirs.close()
            try:
                await asyncio.wait_for(asyncio.shield(control.ready), SLOT_TIMEOUT)
            except TimeoutError as exc:
                raise LaunchFailed("the forked instance was not built in time") from exc
            except LaunchFailed as exc:
                if not self.usable:
                    raise SandboxLost(f"the version template died ({exc.message})") from exc
                raise
            return slot
        except BaseException:
            theirs.close()
            await slot.discard()
            raise

    def _released(self, control: SlotControl) -> None:
        self.users.discard(control)
        self.last_used = self.clock()
        if self.on_idle is not None and self.idle_since() is not None:
            self.on_idle(self)

    def idle_since(self) -> float | None:
        """Since when no instance of it has run (None: one does); its ready slots do not count."""
        return None if len(self.users) > len(self._slots) + len(self._filling) else self.last_used

    async def close(self) -> None:
        """End the template (and whatever it forked that is still running); idempotent."""
        self.retired = True
        for task in list(self._filling):
            task.cancel()
        await asyncio.gather(*self._filling, return_exceptions=True)
        while self._slots:
            await self._slots.popleft().discard()
        self.channel.close()
        await self.instance.destroy()


StartTemplate = Callable[[InstanceSpec, Callable[[Path], Awaitable[Launched]],
                          Callable[["NamespaceInstance"], None]], Awaitable["NamespaceInstance"]]


class VersionTemplates:
    """The version templates of one namespace driver, one per function version at most.

    The first cold start of a version starts as it always has (its own init, its own
    errors) and, meanwhile, ``prepare`` starts the version's template in the background;
    ``find`` gives later starts the template once it is ready (or waits for the one being
    started: its init began earlier than theirs would).  A template whose start failed
    (the init raised, crashed, was killed...) is never used: it is logged and dropped,
    and the next cold start after ``RETRY_AFTER`` seconds tries again.  A template is
    retired by ``retire`` (the function was updated or deleted) and by ``expire_idle``
    (no instance of it for the idle timeout); a retired template forks no more and ends
    once its last instance is gone.  ``start`` is the driver's instance start (with its
    error handling), which the template goes through.
    """

    def __init__(self, launcher: TemplateLauncher, host: cgroups.CgroupHost, start: StartTemplate,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.launcher = launcher
        self.host = host
        self._start = start
        self.clock = clock
        self._templates: dict[TemplateKey, VersionTemplate] = {}
        self._starting: dict[TemplateKey, asyncio.Task[VersionTemplate | None]] = {}
        self._failed: dict[TemplateKey, float] = {}  # when a start failed
        self._retired: set[VersionTemplate] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self.forked_once = False  # an instance was forked on this host (forking works here)
        #: why templates cannot be started on this host (the driver then gives them up)
        self.unavailable: LauncherUnavailable | None = None

    def serves(self, spec: InstanceSpec) -> bool:
        return spec.init_once and self.launcher.preloads(spec.runtime)

    def cgroup_names(self) -> set[str]:
        return self.launcher.cgroup_names()

    async def find(self, spec: InstanceSpec) -> VersionTemplate | None:
        """The ready template of ``spec``'s version; the one being started, once it is;
        None when there is none (or its start failed)."""
        key = template_key(spec)
        current = self._templates.get(key)
        if current is not None:
            if current.usable:
                return current
            self._retire(current)
        starting = self._starting.get(key)
        return None if starting is None else await asyncio.shield(starting)

    def prepare(self, spec: InstanceSpec) -> None:
        """Start the template of ``spec``'s version in the background, unless one runs,
        is being started, or failed less than ``RETRY_AFTER`` seconds ago."""
        key = template_key(spec)
        current = self._templates.get(key)
        if (current is not None and current.usable) or key in self._starting or \
                self.clock() < self._failed.get(key, -RETRY_AFTER) + RETRY_AFTER:
            return
        task = asyncio.get_running_loop().create_task(self._background(key, spec))
        self._starting[key] = task
        task.add_done_callback(lambda _: self._starting.pop(key, None))

    async def _background(self, key: TemplateKey, spec: InstanceSpec) -> VersionTemplate | None:
        try:
            template = await self._new(key, spec)
        except LauncherUnavailable as exc:
            self.unavailable = exc
            return None
        except asyncio.CancelledError:  # retired, or closing: waiting starts run their own init
            return None
        except Exception as exc:  # the init failed (its own start reports it), or the sandbox did
            self._failed[key] = self.clock()
            log.log(logging.INFO if isinstance(exc, SandboxError) else logging.WARNING,
                    "version template of %s:%s not started (its instances run their own init): %s",
                    *key[:2], exc, exc_info=not isinstance(exc, SandboxError))
            return None
        self._failed.pop(key, None)
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
        template = VersionTemplate(key, spec, instance, ours, self.host, self.launcher.tmp_disks, self.clock)
        template.on_idle = self._maybe_close
        return template

    def retire(self, function_name: str, version: str | None = None) -> None:
        """Retire the templates of ``function_name``'s ``version`` (None: of every version);
        one being started is given up."""
        for key, template in list(self._templates.items()):
            if key[0] == function_name and version in (None, key[1]):
                self._retire(template)
        for key, task in list(self._starting.items()):
            if key[0] == function_name and version in (None, key[1]):
                task.cancel()

    def expire_idle(self, idle_timeout: float) -> int:
        """Retire templates that forked nothing, and have had no instance, for ``idle_timeout``."""
        now = self.clock()
        for key in [k for k, failed in self._failed.items() if now - failed >= RETRY_AFTER]:
            del self._failed[key]
        idle = [t for t in self._templates.values()
                if (since := t.idle_since()) is not None and now - since >= idle_timeout]
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
        if template.retired and template.idle_since() is not None and template in self._retired:
            self._retired.discard(template)
            task = asyncio.get_running_loop().create_task(template.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        starting = list(self._starting.values())
        for task in starting:
            task.cancel()
        await asyncio.gather(*starting, return_exceptions=True)
        for template in [*self._templates.values(), *self._retired]:
            await template.close()
        self._templates.clear()
        self._retired.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)
        await self.launcher.close()
