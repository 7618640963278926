"""``/tmp`` on disk, as on Lambda: an ext4 file system of the function's
``ephemeral_storage_mb`` per instance, in a sparse file under the server's work directory.

Writing to it fills the disk, not the function's memory (its page cache is reclaimable:
a 128 MB function writes 400 MB and reads it back), and writing past its size fails
inside the function with ``ENOSPC``.  An empty file system of each size is made once
(``mkfs.ext4``, then ``debugfs`` removes ``lost+found`` and gives the root directory to
the function's user); an instance gets a sparse copy of it (its data segments only: the few
hundred kilobytes of metadata are copied, nothing else).  ``mkfs`` marks the inode tables
zeroed, leaving them holes (``discard`` on a file punches holes, which read as zeros): with
the default lazy initialisation every mount of every copy would have the kernel write them
with zeros in the background, 8 MB for 512 MB of ``/tmp`` and 160 MB for 10 GiB, on each
instance's start.  The file can be larger than the file system (``device_mb``): a microVM's
disk has one size for every function, so that a VM restored from a snapshot sees the device
its template had.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

from impuls.errors import SandboxStartFailed

#: Lambda's default ephemeral storage
DEFAULT_TMP_MB = 512
#: the largest ``ephemeral_storage_mb`` (Lambda's 10 GiB), plus room for the file system's own
MAX_DEVICE_MB = 10240 + 64


class ScratchImages:
    """Empty ext4 images per (size, owner), cached in ``root``, and per-instance copies."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()

    def copy(self, dest: Path, size_mb: int, owner: tuple[int, int], device_mb: int | None = None) -> Path:
        """A new empty file system of ``size_mb`` at ``dest`` (in a file of ``device_mb``,
        default ``size_mb``), its root directory owned by ``owner`` (uid, gid).
        Raises SandboxStartFailed."""
        source = self._empty(size_mb, owner, device_mb or size_mb)
        try:
            _sparse_copy(source, dest)
        except OSError as exc:
            dest.unlink(missing_ok=True)
            raise SandboxStartFailed(f"cannot make the /tmp disk: {exc}") from exc
        return dest

    def _empty(self, size_mb: int, owner: tuple[int, int], device_mb: int) -> Path:
        path = self.root / f"empty-{size_mb}m-{device_mb}m-{owner[0]}-{owner[1]}.zeroed.ext4"
        with self._lock:
            if path.exists():
                return path
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_suffix(".tmp")
            try:
                with open(tmp, "wb") as fh:
                    fh.truncate(device_mb * 2**20)
                _run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-m", "0", "-L", "impuls-tmp",
                      "-E", f"root_owner={owner[0]}:{owner[1]},lazy_itable_init=0,discard",
                      str(tmp), f"{size_mb}M"])
                _run(["debugfs", "-w", "-R", "rmdir lost+found", str(tmp)])
                os.replace(tmp, path)
            except (OSError, subprocess.SubprocessError) as exc:
                tmp.unlink(missing_ok=True)
                raise SandboxStartFailed(f"cannot make an empty /tmp file system: {_why(exc)}") from exc
        return path


def _sparse_copy(source: Path, dest: Path) -> None:
    """Copy ``source``'s data, leaving its holes holes (``SEEK_DATA``/``SEEK_HOLE``)."""
    with open(source, "rb") as src, open(dest, "wb") as out:
        size = os.fstat(src.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            while start < end:
                chunk = os.pread(src.fileno(), min(end - start, 1 << 20), start)
                os.pwrite(out.fileno(), chunk, start)
                start += len(chunk)
            offset = end
        out.truncate(size)


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def _why(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        return (exc.stderr or b"").decode(errors="replace").strip() or str(exc)
    return str(exc)
