"""Unpacking function code into read-only, content-addressed package directories."""

from __future__ import annotations

import io
import os
import shutil
import stat
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

from impuls.models import MAX_UNZIPPED_BYTES, Code, check_zip


class PackageCache:
    """``<root>/<sha256>[-<file>]/``: each code version unpacked once, then reused.

    Directories are made read-only (0555/0444) and appear atomically (unpacked
    in a temporary directory, then renamed).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def directory(self, sha: str, kind: str, filename: str, load: Callable[[], Code]) -> Path:
        """The package directory for code ``sha``; ``load`` is called only on a miss.

        ``filename`` names a single-file (``source``) package's only file.
        """
        key = sha if kind == "zip" else f"{sha}-{filename.replace('/', '_')}"
        target = self.root / key
        if target.is_dir():
            return target
        with self._lock:
            if target.is_dir():
                return target
            code = load()
            tmp = self.root / f".{key}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            if code.kind == "source":
                dest = tmp / filename
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(code.data)
            else:
                _unzip(code.data, tmp)
            _make_read_only(tmp)
            os.rename(tmp, target)
        return target



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
                    raise ValueError("archive expands beyond the unzipped size limit")
                out.write(chunk)
        if (info.external_attr >> 16) & stat.S_IXUSR:
            path.chmod(0o755)


def _make_read_only(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath, name)
            p.chmod(0o555 if p.stat().st_mode & stat.S_IXUSR else 0o444)
        for name in dirnames:
            Path(dirpath, name).chmod(0o555)
    root.chmod(0o555)
