"""Function packages: code unpacked and built once per version, then reused.

``<root>/<key>/`` is the read-only directory an instance runs from, where
``key`` hashes the code's sha256, the runtime, the handler and the build
recipe version.  Building means unpacking the code and running the runtime's
build step (Go compile, pip/npm dependencies, ...); its log is kept in
``<root>/<key>.json``.  A package appears atomically (built in a temporary
directory, then renamed), so a crash never leaves a half-built one in use.

With :class:`~impuls.store.package_archives.PackageArchives` (several nodes on one database)
a package built here is stored there before it is used, and a package this node lacks is
unpacked from there rather than built again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import stat
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from impuls.errors import InvalidInput, StorageFull, disk_full
from impuls.functions.models import MAX_UNZIPPED_BYTES, Code, check_zip
from impuls.runtimes import Runtime
from impuls.runtimes.build_steps import BuildStepFailed
from impuls.store.package_archives import ArchiveDamaged, PackageArchives

log = logging.getLogger("impuls.packages")
BUILD_RECIPE = "1"
LOG_LIMIT = 64 * 1024


class BuildFailed(InvalidInput):
    """The package could not be built; the message carries the build log (400)."""

    def __init__(self, summary: str, log: str) -> None:
        tail = log[-8000:]
        super().__init__(f"code: build failed: {summary}" + (f"\n{tail}" if tail else ""))
        self.log = log


@dataclass(frozen=True)
class Package:
    key: str
    directory: Path
    status: str  # "none": nothing to build; "success": a build step ran
    log: str
    seconds: float

    def api(self) -> dict[str, object]:
        return {"status": self.status, "log": self.log, "seconds": round(self.seconds, 3)}


class PackageBuilder:
    """Builds and caches packages (see module doc); safe to call from many threads.
    ``archives``: the packages shared by the nodes of a cluster (None: one node)."""

    def __init__(self, root: Path, cache: Path, archives: PackageArchives | None = None) -> None:
        self.root = root
        self.cache = cache
        self.archives = archives
        root.mkdir(parents=True, exist_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @staticmethod
    def key(runtime: Runtime, handler: str, sha: str, kind: str) -> str:
        recipe = f"{BUILD_RECIPE}|{runtime.id}|{handler}|{kind}|{sha}"
        return hashlib.sha256(recipe.encode()).hexdigest()[:32]

    def info(self, runtime: Runtime, handler: str, sha: str, kind: str) -> Package | None:
        """The built package (unpacked from the shared archives if another node built it), or
        None if it is not built (yet).  Never waits for a build running here."""
        key = self.key(runtime, handler, sha, kind)
        built = self._local(key)
        if built is not None or self.archives is None:
            return built
        lock = self._lock(key)
        if not lock.acquire(blocking=False):
            return None  # being built or unpacked here right now
        try:
            return self._local(key) or self._unpack(key)
        finally:
            lock.release()

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _local(self, key: str) -> Package | None:
        directory, meta = self.root / key, self.root / f"{key}.json"
        if not directory.is_dir() or not meta.is_file():
            return None
        doc = json.loads(meta.read_text())
        return Package(key, directory, doc["status"], doc["log"], doc["seconds"])

    def _unpack(self, key: str) -> Package | None:
        """The shared package ``key`` unpacked here (None: none is stored, or it is unusable)."""
        if self.archives is None:
            return None
        tmp = self.root / f".fetch-{key}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            meta = self.archives.get(key, tmp)
            if meta is None:
                return None
            _make_read_only(tmp)
            os.rename(tmp, self.root / key)
        except (ArchiveDamaged, OSError) as exc:  # build it here instead
            log.warning("the shared package %s cannot be used here (%s); building it", key, exc)
            return None
        finally:
            if tmp.exists():
                _remove(tmp)
        (self.root / f"{key}.json").write_text(json.dumps(meta))
        return self._local(key)

    def get(self, runtime: Runtime, handler: str, sha: str, kind: str,
            load: Callable[[], Code]) -> Package:
        """The package for this code version, built now if needed (raises BuildFailed)."""
        key = self.key(runtime, handler, sha, kind)
        with self._lock(key):
            built = self._local(key) or self._unpack(key)
            if built is not None:
                return built
            package = self._build(key, runtime, handler, load())
            if self.archives is not None:  # before anyone can use it: the other nodes need it too
                self.archives.put(key, sha, package.directory, package.api())
            return package

    def _build(self, key: str, runtime: Runtime, handler: str, code: Code) -> Package:
        started = time.monotonic()
        tmp = self.root / f".build-{key}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            if code.kind == "source":
                dest = tmp / runtime.code_filename(handler)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(code.data)
            else:
                _unzip(code.data, tmp)
            log = runtime.build(tmp, handler, self.cache) if runtime.build is not None else ""
            _make_read_only(tmp)
            os.rename(tmp, self.root / key)
        except BuildStepFailed as exc:
            raise BuildFailed(exc.summary, exc.log[-LOG_LIMIT:]) from exc
        except OSError as exc:
            if disk_full(exc):
                raise StorageFull(f"no space left on the disk of {self.root} to unpack the code: "
                                  "free some space and try again") from exc
            raise
        finally:
            if tmp.exists():
                _remove(tmp)
        package = Package(key, self.root / key, "success" if log else "none", log[-LOG_LIMIT:],
                          time.monotonic() - started)
        meta = {"status": package.status, "log": package.log, "seconds": package.seconds}
        (self.root / f"{key}.json").write_text(json.dumps(meta))
        return package


def _unzip(data: bytes, dest: Path) -> None:
    """Extract a checked archive, counting real bytes (the header sizes may lie)."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    written = 0
    for info in check_zip(data):
        path = dest / info.filename
        if info.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as src, open(path, "wb") as out:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > MAX_UNZIPPED_BYTES:
                    raise BuildStepFailed("the archive expands beyond the unzipped size limit", "")
                out.write(chunk)
        if (info.external_attr >> 16) & stat.S_IXUSR:
            path.chmod(0o755)


def _make_read_only(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath, name)
            if not p.is_symlink():
                p.chmod(0o555 if p.stat().st_mode & stat.S_IXUSR else 0o444)
        for name in dirnames:
            Path(dirpath, name).chmod(0o555)
    root.chmod(0o555)


def _remove(path: Path) -> None:
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
    path.chmod(0o755)
    shutil.rmtree(path, ignore_errors=True)
