"""The images directory: what is built, where, and what each rootfs offers (see :class:`ImageStore`)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class GuestRuntime:
    """A root filesystem flavour: the Debian packages it installs."""

    name: str
    packages: tuple[str, ...]


#: The agent is Python, so every rootfs has python3; ``nodejs`` adds the pinned Node.js builds,
#: ``java`` Debian's OpenJDK 17 runtime and Jackson (the host's javac builds the packages), the
#: others their language.
GUEST_RUNTIMES: dict[str, GuestRuntime] = {
    "python": GuestRuntime("python", ("python3",)),
    # Node.js itself is not Debian's: the pinned builds (impuls.runtimes.node_dist) are copied in
    "nodejs": GuestRuntime("nodejs", ("python3", "libstdc++6")),
    "java": GuestRuntime("java", ("python3", "openjdk-17-jre-headless", "libjackson2-databind-java")),
    # Debian's Ruby 3.1 (the host's too); a rootfs of its own keeps the Python one (which also
    # serves go1.x and provided) small and its snapshots valid
    "ruby": GuestRuntime("ruby", ("python3", "ruby")),
    # Debian's Mono 6.8 and the class libraries dotnet-mono builds reference (build_steps.py);
    # the function's package brings the compiled client and its ./bootstrap
    "dotnet": GuestRuntime("dotnet", ("python3", "mono-runtime", "libnewtonsoft-json5.0-cil",
                                      "libmono-microsoft-csharp4.0-cil")),
}


@dataclass(frozen=True)
class Artifact:
    name: str
    path: Path
    key: str
    size: int
    built_at: str
    info: dict[str, Any]


def disk_usage(path: Path) -> int:
    """Bytes a file or tree really occupies (sparse files count their allocated blocks)."""
    if path.is_symlink():
        return 0
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                total += st.st_blocks * 512
    return total


class ImageStore:
    """The images directory (``Settings.images_path``: ``IMPULS_IMAGES_DIR``, else
    ``<data dir>/images``)::

        manifest.json             what is built, from which inputs (keys), sizes
        vmlinux                   uncompressed guest kernel (boots directly via PVH)
        initramfs.cpio            busybox + virtio modules + init.sh (uncompressed:
                                  nothing to inflate under emulation)
        rootfs-<runtime>.ext4     read-only root filesystem per guest runtime
        accel/<host>.json         cached KVM probe verdict per host
        snapshots/<key>/          runtime snapshots made by the microvm driver
        cache/                    downloaded .debs, debootstrap trees (speed up rebuilds)
        build.log                 output of the last build's tools

    The directory may be shared by several servers and hosts (a CI cache): every
    artifact appears atomically (written aside, then renamed) and writers take
    ``.build.lock``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cached: tuple[tuple[int, int], dict[str, Any]] | None = None

    # paths
    @property
    def kernel(self) -> Path:
        return self.root / "vmlinux"

    @property
    def initramfs(self) -> Path:
        return self.root / "initramfs.cpio"

    def rootfs(self, runtime: str) -> Path:
        return self.root / f"rootfs-{runtime}.ext4"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def accel_dir(self) -> Path:
        return self.root / "accel"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    # manifest
    def manifest(self) -> dict[str, Any]:
        """The manifest (re-read only when the file changed: the driver asks on every start)."""
        empty: dict[str, Any] = {"version": MANIFEST_VERSION, "artifacts": {}}
        try:
            st = self.manifest_path.stat()
            stamp = (st.st_mtime_ns, st.st_ino)
            if self._cached is not None and self._cached[0] == stamp:
                return self._cached[1]
            doc = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return empty
        if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION:
            return empty
        self._cached = (stamp, doc)
        return doc

    def artifact(self, name: str) -> Artifact | None:
        entry = self.manifest()["artifacts"].get(name)
        if not entry:
            return None
        path = self.root / entry["file"]
        if not path.exists():
            return None
        return Artifact(name, path, entry["key"], path.stat().st_size, entry.get("built_at", ""),
                        entry.get("info", {}))

    def record(self, name: str, path: Path, key: str, built_at: str, info: dict[str, Any]) -> None:
        doc = json.loads(json.dumps(self.manifest()))  # a copy: the cached one stays as read
        doc["artifacts"][name] = {"file": path.name, "key": key, "built_at": built_at, "info": info}
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.manifest_path)

    # queries
    def missing(self, runtimes: list[str] | None = None) -> list[str]:
        """Names of the artifacts the driver needs that are not built."""
        names = ["kernel", "initramfs"] + [f"rootfs-{r}" for r in (runtimes or list(GUEST_RUNTIMES))]
        return [name for name in names if self.artifact(name) is None]

    def offered(self) -> dict[str, str]:
        """Runtime id → guest runtime (rootfs) for every built rootfs, e.g. ``{"python3.11": "python"}``."""
        out: dict[str, str] = {}
        artifacts = self.manifest()["artifacts"]  # cheap: the engine asks on every invocation
        for runtime in GUEST_RUNTIMES:
            entry = artifacts.get(f"rootfs-{runtime}")
            if entry:
                for runtime_id in entry.get("info", {}).get("runtime_ids", []):
                    out[str(runtime_id)] = runtime
        return out

    def key(self, name: str) -> str:
        art = self.artifact(name)
        return art.key if art else ""

    def listing(self) -> list[tuple[str, Path, int, str]]:
        """(name, path, bytes on disk, description) for each artifact, snapshot and cache."""
        rows: list[tuple[str, Path, int, str]] = []
        for name in ("kernel", "initramfs", *(f"rootfs-{r}" for r in GUEST_RUNTIMES)):
            art = self.artifact(name)
            if art is None:
                rows.append((name, self.root, 0, "not built"))
                continue
            rows.append((name, art.path, art.size, _describe(art)))
        for snap, meta in self.snapshot_dirs():
            desc = (f"{meta.get('runtime', '?')} {meta.get('memory_mb', '?')} MB, "
                    f"accel {meta.get('accel', '?')}") if meta else "incomplete"
            if self.snapshot_is_stale(meta):
                desc += " (stale: its images were rebuilt)"
            rows.append((f"snapshot {snap.name[:12]}", snap, disk_usage(snap), desc))
        if self.cache.is_dir():
            rows.append(("cache", self.cache, disk_usage(self.cache), "downloaded .debs, debootstrap trees"))
        return rows

    # snapshots (made by the microvm driver, kept next to the images they were made from)

    def snapshot_dirs(self) -> list[tuple[Path, dict[str, Any]]]:
        """Finished snapshot directories and their meta.json ({} when unreadable)."""
        out: list[tuple[Path, dict[str, Any]]] = []
        if not self.snapshots.is_dir():
            return out
        for path in sorted(self.snapshots.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue  # being made (.<key>.<pid>.tmp) or a lock file
            meta: dict[str, Any] = {}
            with contextlib.suppress(OSError, ValueError):
                meta = json.loads((path / "meta.json").read_text())
            out.append((path, meta if isinstance(meta, dict) else {}))
        return out

    def snapshot_is_stale(self, meta: dict[str, Any]) -> bool:
        """True when an image the snapshot was made from was rebuilt since (it can never be restored)."""
        images = meta.get("images")
        if not isinstance(images, dict) or not images:
            return True
        return any(self.key(name) != key for name, key in images.items())

    def collect_snapshots(self) -> int:
        """Delete stale snapshots, and lock files of snapshots gone for an hour; returns a count."""
        removed = 0
        for path, meta in self.snapshot_dirs():
            if self.snapshot_is_stale(meta):
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        if self.snapshots.is_dir():
            for lock in self.snapshots.glob(".*.lock"):
                with contextlib.suppress(OSError):
                    if (not (self.snapshots / lock.name[1:-5]).exists()
                            and time.time() - lock.stat().st_mtime > 3600):
                        lock.unlink()
        return removed

    @contextlib.contextmanager
    def lock(self, name: str = ".build.lock") -> Iterator[None]:
        """An exclusive lock shared by every process using this directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _describe(art: Artifact) -> str:
    info = art.info
    if art.name == "kernel":
        return f"{info.get('package', '')} {info.get('version', '')}".strip()
    if art.name == "initramfs":
        return f"busybox {info.get('busybox', '')}, modules: {', '.join(info.get('modules', []))}"
    versions = ", ".join(f"{k} {v}" for k, v in sorted(info.get("versions", {}).items()))
    return f"runtimes {', '.join(info.get('runtime_ids', []))} ({versions})"
