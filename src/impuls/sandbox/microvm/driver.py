"""The ``microvm`` driver: every instance is a QEMU ``microvm`` virtual machine with its own kernel.

The driver starts each instance's VM — restored from a runtime snapshot, or booted — gives it
the function's code disk, loads the function into it and tracks how it ends.  The design is
described in docs/sandboxes.md (microvm).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from impuls.errors import ConfigError, RuntimeExited, SandboxKilled, SandboxStartFailed
from impuls.runtimes import Runtime
from impuls.runtimes.guest.protocol import (
    API_ADDRESS,
    API_SOCKET,
    NODE_CLIENT,
    PYTHON,
    PYTHON_CLIENT,
    RUBY_CLIENT,
    SANDBOX_GID,
    SANDBOX_UID,
    TASK_ROOT,
    TMP_DIR,
)
from impuls.sandbox.base import Instance, InstanceSpec, OutputCapture, SandboxDriver
from impuls.sandbox.microvm import jail
from impuls.sandbox.microvm.codedisk import CodeDisk, CodeDiskError, CodeDisks
from impuls.sandbox.microvm.images import ImageStore
from impuls.sandbox.microvm.qemu import AccelChoice, Memory, VMConfig, choose_accel, qemu_binary, qemu_version
from impuls.sandbox.microvm.snapshots import Snapshot, SnapshotStore
from impuls.sandbox.microvm.vm import BOOT_TIMEOUT, VM, remove_abandoned_short_dirs, short_dir
from impuls.sandbox.runtime_api import Invocation, RuntimeAPI, RuntimeReply
from impuls.sandbox.scratch import DEFAULT_TMP_MB, MAX_DEVICE_MB, ScratchImages
from impuls.sandbox.watch import PidFile

log = logging.getLogger("impuls.sandbox.microvm.driver")

RESTORE_TIMEOUT = 30.0
INIT_TIMEOUT = 60.0
#: how long a failed start waits to see whether its VM ended (killed from outside)
EXIT_NOTICE = 1.0
SELF_CONTAINED_RUNTIMES = ("provided", "go1.x")


def guest_command(runtime: Runtime) -> tuple[list[str], bool]:
    """The runtime's argv inside the guest, and whether the preloaded Python client may serve it."""
    if runtime.bootstrap is None:  # the package's own ./bootstrap (custom runtime, Go binary, C# on Mono)
        return [f"{TASK_ROOT}/bootstrap"], False
    if runtime.language == "python":
        return [PYTHON, PYTHON_CLIENT], True
    if runtime.language == "nodejs" and runtime.interpreter:  # the pinned build, at the same path
        return [runtime.interpreter, NODE_CLIENT], False
    if runtime.language == "ruby" and runtime.interpreter:  # Debian's, at the same path as the host's
        return [runtime.interpreter, RUBY_CLIENT], False
    raise SandboxStartFailed(f"the microvm sandbox has no guest command for {runtime.language}")


class MicroVMInstance(Instance):
    """One VM.  ``note`` says how its cold start was served ("restored from snapshot",
    "booted (no snapshot: ...)") for the invocation record; ``timings`` holds the seconds
    each start-up step took (host side, and the guest's own ``guest ...`` steps)."""

    def __init__(self, spec: InstanceSpec, api: RuntimeAPI, run_dir: Path) -> None:
        super().__init__(spec, api)
        self.run_dir = run_dir
        self.vm: VM | None = None
        self.timings: dict[str, float] = {}
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._oom = False
        self._failure = ""
        self._killer: signal.Signals | None = None

    def attach(self, vm: VM) -> None:
        self.vm = vm
        vm.link.on_exit = self._runtime_exited
        vm.exited.add_done_callback(self._vm_exited)

    async def discard_vm(self) -> None:
        """Stop the VM without ending the instance (a failed restore, before a boot)."""
        vm, self.vm = self.vm, None
        if vm is not None:
            vm.link.on_exit = None
            vm.exited.remove_done_callback(self._vm_exited)
            await vm.stop()

    @property
    def exited(self) -> asyncio.Future[int]:
        return self._exited

    def oom_killed(self) -> bool:
        return self._oom

    def killed_by(self) -> signal.Signals | None:
        """The signal the VM was killed with from outside, when its end ended the instance
        (``VM.killed_by``).  A runtime's own end inside the guest is never a kill from
        outside: nothing but the function itself can signal it there."""
        return self._killer

    async def vm_killed(self) -> signal.Signals | None:
        """After a failed start step: the signal the VM was killed with from outside, if it
        was (``VM.killed_by``).  QEMU's sockets may close before its end is noticed: a VM
        still running is given ``EXIT_NOTICE`` seconds to be seen gone."""
        vm = self.vm
        if vm is None:
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(vm.exited), EXIT_NOTICE)
        return vm.killed_by()

    def drain_output(self) -> None:
        """Nothing to do: output arrives on the serial link ahead of the response it preceded."""

    def _runtime_exited(self, msg: dict[str, Any]) -> None:
        self._oom = bool(msg.get("oom"))
        if not self._exited.done():
            self._exited.set_result(int(msg.get("status", -1)))
        if self.vm is not None:  # the instance is over: free the VM now, not at destroy
            self.vm.kill()

    def _vm_exited(self, fut: asyncio.Future[int]) -> None:
        # QEMU ended: it crashed, or the guest kernel panicked (panic=-1 and -no-reboot)
        if self._exited.done() or self.vm is None:
            return
        self._failure = self.vm.describe_exit()
        self._killer = self.vm.killed_by()
        vm = self.vm

        def settle(_: Any = None) -> None:
            if not self._exited.done():
                self._exited.set_result(fut.result())

        # the link may still hold output written just before the end: let it arrive first
        if vm.link.closed.done():
            settle()
        else:
            vm.link.closed.add_done_callback(settle)
            asyncio.get_running_loop().call_later(0.5, settle)

    async def invoke(self, invocation: Invocation, timeout: float) -> RuntimeReply:
        try:
            return await super().invoke(invocation, timeout)
        except RuntimeExited as exc:
            if self._failure and not self._oom:
                raise RuntimeExited(f"{self._failure} (during the invocation)", exc.logs) from exc
            raise

    async def _teardown(self) -> None:
        if self.vm is not None:
            await self.vm.stop()
        if not self._exited.done():
            self._exited.set_result(-signal.SIGKILL)
        shutil.rmtree(self.run_dir, ignore_errors=True)


class MicroVMDriver(SandboxDriver):
    """Each instance is a QEMU microvm VM (see docs/sandboxes.md, microvm)."""

    name = "microvm"
    unsafe = False

    def __init__(self, work_dir: Path, images_dir: Path, accel: str = "auto",
                 snapshots: bool = True) -> None:
        """``accel``: ``auto`` (probe), ``kvm`` or ``tcg``; ``snapshots``: restore cold starts
        from a per-runtime snapshot (else every instance boots)."""
        binary = qemu_binary()
        if binary is None:
            raise ConfigError("the microvm sandbox needs qemu-system-x86_64 (Debian package qemu-system-x86)")
        self.binary = binary
        why = jail.unavailable()
        if why:
            raise ConfigError(why)
        self.store = ImageStore(images_dir)
        missing = self.store.missing(["python"])
        if missing:
            raise ConfigError(
                f"the microvm sandbox needs guest images, and {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing in {self.store.root}: "
                "build them with `impuls images build`")
        images = [self.store.kernel, self.store.initramfs,
                  *(self.store.rootfs(g) for g in set(self.store.offered().values()))]
        unreadable = [str(path) for path in images if path.exists() and not jail.readable(path)]
        if unreadable:
            raise ConfigError(f"QEMU runs as uid {jail.QEMU_UID} and cannot read {', '.join(unreadable)}: "
                              "make the guest images readable (chmod 0644, or rebuild them)")
        try:
            jail.seccomp_filter()  # fails now, not at the first start, without libseccomp
        except SandboxStartFailed as exc:
            raise ConfigError(exc.message) from exc
        self.accel: AccelChoice = choose_accel(self.store, accel)
        self.use_snapshots = snapshots
        self.pid_dir = work_dir / "run"
        self.vm_dir = work_dir / "vms"
        for d in (work_dir, self.pid_dir, self.vm_dir):
            d.mkdir(parents=True, exist_ok=True)
        work_dir.chmod(0o700)  # QEMU is handed its files; nothing here is for other users
        self.codes = CodeDisks(work_dir / "code")
        self.scratch = ScratchImages(work_dir / "tmp-images")
        self.qemu_version = qemu_version(binary)
        self.snapshots = SnapshotStore(self.store, self.accel.accel, self.qemu_version, self._start_template)
        with contextlib.suppress(OSError):
            stale = self.store.collect_snapshots()
            if stale:
                log.info("microvm: removed %d snapshots of images rebuilt since", stale)
        log.info("microvm: %s (%s)", self.accel.note, self.accel.reason)

    # configuration

    def offered(self) -> dict[str, str]:
        """Runtime id → guest runtime (rootfs) for the images that are built.

        The rootfs manifests name their languages' ids (``python3.11``, ``nodejs20``,
        ``nodejs22``); packages that bring their own ``bootstrap`` (``provided``,
        ``go1.x``: static binaries) run on the Python rootfs, which every guest has.
        """
        offered = self.store.offered()
        if "python" in offered.values():
            for runtime_id in SELF_CONTAINED_RUNTIMES:
                offered.setdefault(runtime_id, "python")
        return offered

    def supports(self, runtime: Runtime) -> bool:
        return runtime.id in self.offered()

    def vm_config(self, guest_runtime: str, memory_mb: int, code_disk: Path, tmp_disk: Path,
                  memory: Memory | None = None, incoming: bool = False) -> VMConfig:
        return VMConfig(self.binary, self.accel.accel, memory_mb, self.store.kernel, self.store.initramfs,
                        self.store.rootfs(guest_runtime), code_disk, tmp_disk, memory or Memory(), incoming)

    def tmp_disk(self, path: Path, size_mb: int) -> Path:
        """An empty ``/tmp`` disk of ``size_mb`` at ``path``, for QEMU (its uid) to write."""
        self.scratch.copy(path, size_mb, (SANDBOX_UID, SANDBOX_GID), MAX_DEVICE_MB)
        os.chown(path, jail.QEMU_UID, jail.QEMU_GID)
        path.chmod(0o600)
        return path

    async def start_vm(self, name: str, config: VMConfig, api_socket: str, output: OutputCapture,
                       run_dir: Path | None = None, owned: bool = False) -> VM:
        """QEMU for ``config``, in ``run_dir`` (default: a new one); the VM removes its run
        directory when it ends if it made it or ``owned``."""
        owned = owned or run_dir is None
        run_dir = run_dir or short_dir(self.vm_dir / name)
        try:
            return await VM.start(name, config, run_dir, self.pid_dir, api_socket, output, owned)
        except (OSError, SandboxStartFailed) as exc:
            if owned:
                shutil.rmtree(run_dir, ignore_errors=True)
            if isinstance(exc, SandboxStartFailed):
                raise
            raise SandboxStartFailed(f"cannot start QEMU: {exc}") from exc

    async def _start_template(self, name: str, guest_runtime: str, memory_mb: int, memory: Memory) -> VM:
        """A snapshot template: the blank code disk, a blank /tmp disk in its run directory
        (gone with it), no Runtime API behind its link."""
        run_dir = short_dir(self.vm_dir / name)
        tmp = await asyncio.to_thread(self.tmp_disk, run_dir / "tmp.img", DEFAULT_TMP_MB)
        config = self.vm_config(guest_runtime, memory_mb, self.codes.blank(), tmp, memory)
        return await self.start_vm(name, config, "", OutputCapture(), run_dir, owned=True)

    # instances

    async def create(self, spec: InstanceSpec) -> Instance:
        guest = self.offered().get(spec.runtime.id)
        if guest is None:
            raise SandboxStartFailed(
                f"runtime {spec.runtime.id} is not offered by the microvm sandbox (guest images offer: "
                f"{', '.join(sorted(self.offered())) or 'none'})")
        guest_command(spec.runtime)  # fails now, not after a boot, for a runtime the guest cannot start
        t0 = time.perf_counter()
        api = RuntimeAPI()
        run_dir = short_dir(self.vm_dir / spec.instance_id)
        instance = MicroVMInstance(spec, api, run_dir)
        try:
            await api.listen_unix(str(run_dir / "runtime-api.sock"))
            code_disk = await self._code_disk(spec, guest)
            instance.timings["code_disk"] = time.perf_counter() - t0
            tmp_disk = await asyncio.to_thread(self.tmp_disk, run_dir / "tmp.img", spec.ephemeral_storage_mb)
            instance.timings["tmp_disk"] = time.perf_counter() - t0
            snapshot, why = await self._snapshot_for(guest, spec.memory_mb)
            if snapshot is not None:
                try:
                    await self._restore(instance, guest, snapshot, code_disk.path, tmp_disk)
                    instance.note = "restored from snapshot" + (f" ({why})" if why else "")
                except SandboxStartFailed as exc:
                    if await instance.vm_killed() is not None:
                        raise  # not the snapshot's fault (reported below)
                    log.warning("microvm: restoring snapshot %s failed (%s); booting instead", snapshot.key,
                                exc.message)
                    self.snapshots.discard(snapshot)
                    why = f"restore failed: {exc.message}"
                    snapshot = None
                    await instance.discard_vm()
            if snapshot is None:
                await self._boot(instance, guest, code_disk.path, tmp_disk)
                instance.note = f"booted ({why})"
            instance.timings["vm_ready"] = time.perf_counter() - t0
            self._load(instance, code_disk)
            assert instance.vm is not None
            loaded = await instance.vm.wait_for(instance.vm.link.loaded, RESTORE_TIMEOUT,
                                                "load the function into the VM")
            instance.timings["loaded"] = time.perf_counter() - t0
            for step, ms in loaded.get("steps", {}).items():
                instance.timings[f"guest {step}"] = ms / 1000
            instance.timings["clock error"] = await instance.vm.link.sync_clock() / 1e9
        except BaseException as exc:
            killer = await instance.vm_killed() if isinstance(exc, Exception) else None
            await instance.destroy()
            if killer is not None:
                raise SandboxKilled(f"the VM was killed by {killer.name} while it started (not the "
                                    f"function's doing): {exc}", instance.output.peek()) from exc
            if isinstance(exc, OSError):
                raise SandboxStartFailed(f"cannot start the microVM: {exc}") from exc
            raise
        await instance.ready_or_destroyed(INIT_TIMEOUT)
        instance.timings["ready"] = time.perf_counter() - t0
        if instance.vm is not None and instance.vm.link.first_request_ms:
            instance.timings["guest runtime init"] = instance.vm.link.first_request_ms / 1000
        return instance

    async def _snapshot_for(self, guest: str, memory_mb: int) -> tuple[Snapshot | None, str]:
        if not self.use_snapshots:
            return None, "snapshots disabled"
        return await self.snapshots.for_start(guest, memory_mb)

    async def _restore(self, instance: MicroVMInstance, guest: str, snapshot: Snapshot,
                       code_disk: Path, tmp_disk: Path) -> None:
        spec = instance.spec
        t0 = time.perf_counter()
        # The RAM maps the template's share=off (MAP_PRIVATE): copy-on-write, clean pages
        # shared by every clone, nothing copied per start -- from a sealed memfd copy of the
        # RAM file that QEMU cannot write (snapshots.SealedRam).  The code disk takes the
        # place of the template's blank one, behind the romfs the template already mounted.
        ram = await self.snapshots.ram(snapshot)
        try:
            config = self.vm_config(guest, spec.memory_mb, code_disk, tmp_disk, Memory(fd=ram), incoming=True)
            vm = await self.start_vm(spec.instance_id, config, instance.api.address, instance.output,
                                     instance.run_dir)
        finally:
            os.close(ram)  # QEMU has its own
        instance.attach(vm)
        await vm.restore(snapshot.state, RESTORE_TIMEOUT)
        instance.timings["restore"] = time.perf_counter() - t0

    async def _boot(self, instance: MicroVMInstance, guest: str, code_disk: Path, tmp_disk: Path) -> None:
        spec = instance.spec
        t0 = time.perf_counter()
        config = self.vm_config(guest, spec.memory_mb, code_disk, tmp_disk)
        vm = await self.start_vm(spec.instance_id, config, instance.api.address, instance.output,
                                 instance.run_dir)
        instance.attach(vm)
        await vm.wait_for(vm.link.hello, BOOT_TIMEOUT, "boot the VM")
        instance.timings["boot"] = time.perf_counter() - t0

    async def _code_disk(self, spec: InstanceSpec, guest: str) -> CodeDisk:
        python = ""
        if spec.runtime.language == "python":
            art = self.store.artifact(f"rootfs-{guest}")
            python = str(art.info.get("versions", {}).get("python", "")) if art else ""
        try:
            return await asyncio.to_thread(self.codes.disk_for, spec.code_dir, python)
        except (CodeDiskError, OSError) as exc:
            raise SandboxStartFailed(f"cannot make the code disk: {exc}") from exc

    def _load(self, instance: MicroVMInstance, code_disk: CodeDisk) -> None:
        spec = instance.spec
        env = spec.runtime_environment(API_ADDRESS, TASK_ROOT, TMP_DIR)
        if getattr(spec.runtime, "unix_socket_client", True):
            env["IMPULS_RUNTIME_API_SOCKET"] = API_SOCKET
        argv, zygote = guest_command(spec.runtime)
        assert instance.vm is not None
        # What makes a clone unique comes now: the agent sets the clock and reseeds the guest
        # kernel's CRNG with `seed` before the runtime runs (request ids come from the host).
        instance.vm.link.control({
            "op": "load", "env": env, "argv": argv, "zygote": zygote, "time_ns": time.time_ns(),
            "seed": secrets.token_hex(64), "code_fs": code_disk.fstype,
        })

    # housekeeping

    async def reap_orphans(self) -> int:
        count = PidFile.reap_all(self.pid_dir)
        for leftover in self.vm_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        remove_abandoned_short_dirs()
        self.snapshots.remove_partial()
        await asyncio.to_thread(self.codes.collect)
        return count

    def describe(self) -> dict[str, Any]:
        return {
            "sandbox": self.name, "unsafe": False,
            "isolation": f"a QEMU microvm VM per instance (own guest kernel), {self.accel.accel}",
            "accel": self.accel.accel, "accel_note": self.accel.note, "accel_reason": self.accel.reason,
            "vmm": f"qemu {self.qemu_version} (microvm machine)",
            "images": str(self.store.root),
            "guest_runtimes": sorted(self.offered()),
            "snapshots": self.use_snapshots,
            "qemu_confinement": f"uid {jail.QEMU_UID}, no capabilities, seccomp (-sandbox and a second "
                                "filter), its own pid/mount/net/ipc/uts namespaces, only its files",
        }


__all__ = ["MicroVMDriver", "MicroVMInstance"]
