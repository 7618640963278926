"""The namespace sandbox's ``/tmp``: an ext4 file system of the function's
``ephemeral_storage_mb`` (:mod:`impuls.sandbox.scratch`) on a loop device, handed to the
instance as a detached mount (``fsmount``) that it attaches at ``/tmp``.

Nothing of it needs cleaning up: the image file is unlinked as soon as the loop device
holds it, the loop device clears itself (``LO_FLAGS_AUTOCLEAR``) when the file system is
unmounted, and that happens when the last mount of it goes: the instance's mount
namespace, whatever ends it (a server killed included).  Made ahead of time
(:class:`TmpDisks` keeps a few ready per size), so a cold start only takes one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import struct
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from fcntl import ioctl
from pathlib import Path

from impuls.errors import SandboxStartFailed
from impuls.sandbox.scratch import ScratchImages

log = logging.getLogger("impuls.sandbox.namespace.tmpdisk")

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 430, 431, 432
_FSOPEN_CLOEXEC = _FSMOUNT_CLOEXEC = 1
_FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 1, 6
_MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV, _MOUNT_ATTR_NOATIME = 0x2, 0x4, 0x10
_LOOP_CONFIGURE, _LOOP_CTL_GET_FREE = 0x4C0A, 0x4C82
_LO_FLAGS_AUTOCLEAR, _LO_FLAGS_DIRECT_IO = 4, 16
#: struct loop_config: fd, block_size, struct loop_info64 (lo_flags at byte 52), reserved
_LOOP_CONFIG = struct.Struct("=II5Q4I64s64s32s2Q8Q")
#: ready disks kept per size, sizes kept, and threads making them
READY_PER_SIZE = 2
SIZES_KEPT = 4
MAKERS = 3


def mount_fd(image: Path) -> int:
    """A detached, read-write ext4 mount (nosuid, nodev, noatime) of ``image``, which is
    unlinked.  Raises SandboxStartFailed."""
    try:
        with open(image, "r+b") as backing:
            loop, number = _attach(backing.fileno())
        image.unlink()
        try:
            return _mount_ext4(f"/dev/loop{number}")
        finally:
            os.close(loop)  # the file system holds the device; its end clears the device
    except OSError as exc:
        image.unlink(missing_ok=True)
        raise SandboxStartFailed(f"cannot mount the /tmp disk: {exc}") from exc


def _attach(backing: int) -> tuple[int, int]:
    """A loop device of ``backing`` that clears itself when no longer used (direct I/O where
    the backing file system allows it: no second copy in the host's page cache): an open
    descriptor of it and its number."""
    control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(20):
            number = ioctl(control, _LOOP_CTL_GET_FREE)
            device = os.open(f"/dev/loop{number}", os.O_RDWR | os.O_CLOEXEC)
            for flags in (_LO_FLAGS_AUTOCLEAR | _LO_FLAGS_DIRECT_IO, _LO_FLAGS_AUTOCLEAR):
                try:
                    ioctl(device, _LOOP_CONFIGURE, _loop_config(backing, flags))
                    return device, number
                except OSError as exc:
                    if exc.errno == errno.EBUSY:  # taken by someone else meanwhile
                        break
                    if exc.errno != errno.EINVAL or not flags & _LO_FLAGS_DIRECT_IO:
                        os.close(device)
                        raise
            os.close(device)
        raise OSError(errno.EBUSY, "no free loop device")
    finally:
        os.close(control)


def _loop_config(backing: int, flags: int) -> bytes:
    return _LOOP_CONFIG.pack(backing, 0, 0, 0, 0, 0, 0, 0, 0, 0, flags, b"", b"", b"", 0, 0, *([0] * 8))


def _mount_ext4(device: str) -> int:
    fs = _check(_libc.syscall(_SYS_FSOPEN, b"ext4", _FSOPEN_CLOEXEC), "fsopen ext4")
    try:
        _check(_libc.syscall(_SYS_FSCONFIG, fs, _FSCONFIG_SET_STRING, b"source", device.encode(), 0),
               "fsconfig")
        _check(_libc.syscall(_SYS_FSCONFIG, fs, _FSCONFIG_CMD_CREATE, None, None, 0), "mount ext4")
        attrs = _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV | _MOUNT_ATTR_NOATIME
        return _check(_libc.syscall(_SYS_FSMOUNT, fs, _FSMOUNT_CLOEXEC, attrs), "fsmount")
    finally:
        os.close(fs)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return int(result)


class TmpDisks:
    """Detached ``/tmp`` mounts made ahead of time, :data:`READY_PER_SIZE` per size for the
    :data:`SIZES_KEPT` sizes asked for last, by threads of their own (so that making them
    never holds up the event loop's worker threads)."""

    def __init__(self, work_dir: Path, owner: tuple[int, int]) -> None:
        self.work_dir = work_dir
        self.owner = owner
        self.images = ScratchImages(work_dir / "empty")
        self._ready: OrderedDict[int, list[int]] = OrderedDict()
        self._lock = threading.Lock()
        self._refilling = False
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=MAKERS, thread_name_prefix="impuls-tmp-disks")
        self._sweep()  # what a server killed while making a disk left behind

    async def take(self, size_mb: int) -> int:
        """A detached mount of an empty file system of ``size_mb`` (the caller closes it once
        handed over); made now if none is ready.  Raises SandboxStartFailed."""
        with self._lock:
            ready, dropped = self._keep(size_mb)
            fd = ready.pop() if ready else -1
        _close(dropped)
        self.refill_soon()
        if fd >= 0:
            return fd
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.make, size_mb)

    def want(self, size_mb: int) -> None:
        """Keep disks of ``size_mb`` ready."""
        with self._lock:
            _, dropped = self._keep(size_mb)
        _close(dropped)
        self.refill_soon()

    def refill_soon(self) -> None:
        """Make what is missing, in the background (one refill at a time)."""
        with self._lock:
            if self._refilling or self._closed:
                return
            self._refilling = True
        self._executor.submit(self._refill)

    def make(self, size_mb: int) -> int:
        image = self.images.copy(self.work_dir / f"tmp-{uuid.uuid4().hex}.img", size_mb, self.owner)
        return mount_fd(image)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fds = [fd for ready in self._ready.values() for fd in ready]
            self._ready.clear()
        _close(fds)
        # a disk being made is a file until its loop device holds it: let it get there, then
        # remove whatever file is left
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._sweep()

    def _sweep(self) -> None:
        """Remove the image files of disks never attached (a disk in use has none)."""
        for image in self.work_dir.glob("tmp-*.img"):
            image.unlink(missing_ok=True)

    def _refill(self) -> None:
        try:
            while True:
                with self._lock:
                    wanted = next((size for size, fds in reversed(self._ready.items())
                                   if len(fds) < READY_PER_SIZE), None)
                    if wanted is None or self._closed:
                        return
                try:
                    fd = self.make(wanted)
                except SandboxStartFailed as exc:
                    log.warning("namespace sandbox: cannot make a /tmp disk ahead of time: %s", exc.message)
                    return
                with self._lock:
                    keep = not self._closed and wanted in self._ready
                    if keep:
                        self._ready[wanted].append(fd)
                if not keep:
                    os.close(fd)
        finally:
            with self._lock:
                self._refilling = False

    def _keep(self, size_mb: int) -> tuple[list[int], list[int]]:
        """(Under the lock.) The ready disks of ``size_mb``, now the size asked for last, and
        those of the sizes beyond :data:`SIZES_KEPT` that this drops (for the caller to close)."""
        ready = self._ready.setdefault(size_mb, [])
        self._ready.move_to_end(size_mb)
        dropped: list[int] = []
        while len(self._ready) > SIZES_KEPT:
            _, fds = self._ready.popitem(last=False)
            dropped += fds
        return ready, dropped


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
