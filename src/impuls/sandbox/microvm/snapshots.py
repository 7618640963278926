"""Runtime snapshots: one saved template VM per (guest runtime, memory size), restored by cold starts."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from impuls.errors import SandboxStartFailed
from impuls.sandbox.microvm.codedisk import CODE_DISK_BYTES
from impuls.sandbox.microvm.images import ImageStore
from impuls.sandbox.microvm.jail import QEMU_GID, QEMU_UID
from impuls.sandbox.microvm.qemu import Memory, QmpError, cpu_model, host_cpu, kernel_cmdline
from impuls.sandbox.microvm.vm import BOOT_TIMEOUT, VM

log = logging.getLogger("impuls.sandbox.microvm.snapshots")

SNAPSHOT_RECIPE = "1"

#: Starts a snapshot template: (VM name, guest runtime, memory MB, its RAM) → a booting VM
#: with the blank code disk and no Runtime API behind its link.
StartTemplate = Callable[[str, str, int, Memory], Awaitable[VM]]


MFD_NOEXEC_SEAL = 0x0008  # Linux 6.3: the memfd can never be made executable


def _memfd(name: str) -> int:
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        return os.memfd_create(name, flags | MFD_NOEXEC_SEAL)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # an older kernel does not know the flag
            raise
        return os.memfd_create(name, flags)


def sealed_copy(path: Path) -> int:
    """A memfd holding ``path``'s content (its holes stay holes), sealed against every write,
    resize and further seal; the caller owns the descriptor."""
    size = os.stat(path).st_size
    fd = _memfd("impuls-snapshot-ram")
    try:
        os.ftruncate(fd, size)
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pos = 0
            while pos < size:
                try:
                    data = os.lseek(src, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                        break
                    raise
                hole = os.lseek(src, data, os.SEEK_HOLE)
                os.lseek(fd, data, os.SEEK_SET)
                while data < hole:
                    sent = os.sendfile(fd, src, data, hole - data)
                    if sent <= 0:
                        raise OSError(errno.EIO, f"{path} shrank while it was read")
                    data += sent
                pos = hole
        finally:
            os.close(src)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


class SealedRam:
    """The RAM file of each snapshot, copied once per process into a sealed memfd.

    A clone maps its template's RAM privately (copy-on-write), but QEMU 7.2 opens a
    ``memory-backend-file`` read-write whatever ``share`` says.  Given the file itself, a
    QEMU taken over by its guest could rewrite the template every later clone starts from;
    given this memfd (at ``/proc/self/fd/N``) it can open it read-write and map it
    privately, and every write, resize or hole punch is refused by the seals.  Clean pages
    are shared by all the clones of this process, as the page cache shared the file's.
    Process-wide, so that drivers made one after another (tests) hold one copy per snapshot.
    """

    _lock = threading.Lock()
    _fds: dict[str, tuple[tuple[int, int, int, int], int]] = {}

    @classmethod
    def open(cls, path: Path) -> int:
        """A new descriptor of ``path``'s sealed copy (made now if missing or stale)."""
        st = os.stat(path)
        stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        with cls._lock:
            for other in [p for p in cls._fds if not os.path.exists(p)]:  # snapshots removed since
                os.close(cls._fds.pop(other)[1])
            cached = cls._fds.get(str(path))
            if cached is None or cached[0] != stamp:
                fd = sealed_copy(path)
                if cached is not None:
                    os.close(cached[1])
                cached = cls._fds[str(path)] = (stamp, fd)
            return os.dup(cached[1])

    @classmethod
    def forget(cls, path: Path) -> None:
        with cls._lock:
            cached = cls._fds.pop(str(path), None)
        if cached is not None:
            os.close(cached[1])


@dataclass(frozen=True)
class Snapshot:
    path: Path
    key: str

    @property
    def state(self) -> Path:
        return self.path / "state"

    @property
    def ram(self) -> Path:
        return self.path / "ram"


class SnapshotStore:
    """``<images>/snapshots/<key>/{ram,state,meta.json}``: one template per runtime and memory size.

    ``accel`` and ``qemu_version`` are those of the VMs the snapshots are made and restored
    by; ``start_template`` starts a template VM (see :data:`StartTemplate`).
    """

    def __init__(self, images: ImageStore, accel: str, qemu_version: str,
                 start_template: StartTemplate) -> None:
        self.images = images
        self.accel = accel
        self.qemu_version = qemu_version
        self.start_template = start_template
        self.root = images.snapshots
        self._locks: dict[str, asyncio.Lock] = {}
        self.failures: dict[str, str] = {}

    def key(self, runtime: str, memory_mb: int) -> str:
        images, accel = self.images, self.accel
        cpu = cpu_model(accel) + (host_cpu() if accel == "kvm" else "")  # -cpu host: this CPU only
        parts = [SNAPSHOT_RECIPE, self.qemu_version, accel, cpu,
                 kernel_cmdline(accel), images.key("kernel"), images.key("initramfs"),
                 images.key(f"rootfs-{runtime}"), str(memory_mb), str(CODE_DISK_BYTES), runtime]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]

    def lookup(self, runtime: str, memory_mb: int) -> Snapshot | None:
        key = self.key(runtime, memory_mb)
        path = self.root / key
        if (path / "meta.json").exists():
            return Snapshot(path, key)
        return None

    async def for_start(self, runtime: str, memory_mb: int) -> tuple[Snapshot | None, str]:
        """The snapshot a cold start restores (made now if missing) and a note for the start;
        None and why when it cannot be made (not tried again by this process)."""
        existing = self.lookup(runtime, memory_mb)
        if existing is not None:
            return existing, ""
        key = self.key(runtime, memory_mb)
        if key in self.failures:
            return None, f"no snapshot: {self.failures[key]}"
        try:
            return await self.ensure(runtime, memory_mb), "snapshot made for this start"
        except (SandboxStartFailed, QmpError, OSError, TimeoutError) as exc:
            reason = exc.message if isinstance(exc, SandboxStartFailed) else str(exc) or type(exc).__name__
            log.warning("microvm: cannot make a snapshot for %s/%d MB: %s", runtime, memory_mb, reason)
            self.failures[key] = reason
            return None, f"no snapshot: {reason}"

    async def ensure(self, runtime: str, memory_mb: int) -> Snapshot:
        """The snapshot for (runtime, memory), made now if missing (one maker per key, across processes)."""
        key = self.key(runtime, memory_mb)
        found = self.lookup(runtime, memory_mb)
        if found is not None:
            return found
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            found = self.lookup(runtime, memory_mb)
            if found is not None:
                return found
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / f".{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:  # the lock file stays: unlinking it would let a third process lock a new one
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
                found = self.lookup(runtime, memory_mb)
                if found is not None:
                    return found
                return await self._make(runtime, memory_mb, key)
            finally:
                os.close(fd)

    def discard(self, snapshot: Snapshot) -> None:
        """Delete a snapshot that failed to restore (the next cold start makes it again)."""
        SealedRam.forget(snapshot.ram)
        shutil.rmtree(snapshot.path, ignore_errors=True)

    async def ram(self, snapshot: Snapshot) -> int:
        """A descriptor of the snapshot's RAM for a clone (see :class:`SealedRam`); the
        caller closes it once QEMU has inherited it."""
        return await asyncio.to_thread(SealedRam.open, snapshot.ram)

    def remove_partial(self) -> None:
        """Delete what this process left of snapshots it was making when it died (same pid)."""
        for leftover in self.root.glob(f".*.{os.getpid()}.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)

    async def _make(self, runtime: str, memory_mb: int, key: str) -> Snapshot:
        # The template boots until its agent says `hello` (kernel up, runtime client preloaded
        # and its process forked, unprivileged, waiting; no function code, no identity) and is
        # migrated with x-ignore-shared: its RAM is a memory-backend-file with share=on, so the
        # state file holds only device state (~70 KB) and the RAM stays in the `ram` file.
        # The template's QEMU may write one file, its RAM, made here for its uid; the state
        # goes to a descriptor (VM.save).  Once it is gone the RAM file is root's again.
        tmp = self.root / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, mode=0o700)
        ram = tmp / "ram"
        fd = os.open(ram, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if os.geteuid() == 0:
                os.fchown(fd, QEMU_UID, QEMU_GID)
        finally:
            os.close(fd)
        t0 = time.perf_counter()
        vm = await self.start_template(f"template-{key[:12]}-{secrets.token_hex(3)}", runtime, memory_mb,
                                       Memory(ram, shared=True))
        try:
            await vm.wait_for(vm.link.hello, BOOT_TIMEOUT, "boot the snapshot template")
            booted = time.perf_counter() - t0
            await vm.save(tmp / "state")
        finally:
            await vm.stop()
            with contextlib.suppress(OSError):
                if os.geteuid() == 0:
                    os.chown(ram, 0, 0)
        tmp.chmod(0o755)
        meta = {"runtime": runtime, "memory_mb": memory_mb, "accel": self.accel, "key": key,
                "qemu": self.qemu_version, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "boot_seconds": round(booted, 3), "total_seconds": round(time.perf_counter() - t0, 3),
                "state_bytes": (tmp / "state").stat().st_size,
                "images": {name: self.images.key(name)
                           for name in ("kernel", "initramfs", f"rootfs-{runtime}")}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        target = self.root / key
        try:
            os.rename(tmp, target)
        except OSError:  # made meanwhile by a process that ignored the lock: keep that one
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("microvm: snapshot %s made for %s/%d MB in %.1f s", key, runtime, memory_mb,
                 meta["total_seconds"])
        return Snapshot(target, key)
