"""Content-addressed code storage: ``<root>/<sha[:2]>/<sha>``, written atomically and durably."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from impuls.errors import ImpulsError, StorageFull, disk_full


class BlobMissing(ImpulsError):
    """A function references code that is not on disk (store damaged)."""


class BlobStore:
    """Immutable blobs named by their sha256.  ``put`` is idempotent; identical
    content is stored once.  Callers serialise ``put``+commit against
    ``collect`` (see :class:`impuls.functions.registry.FunctionRegistry`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def put(self, data: bytes) -> str:
        """Store ``data`` durably (fsync'd file and directory); return its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if target.exists():
            return sha
        tmp = target.with_name(f".{sha}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if disk_full(exc):
                raise StorageFull(f"no space left on the disk of {self.root} to store the code "
                                  f"({len(data)} bytes): free some space and try again") from exc
            raise
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return sha

    def get(self, sha: str) -> bytes:
        try:
            return self.path(sha).read_bytes()
        except FileNotFoundError as exc:
            raise BlobMissing(f"code blob {sha} is missing from {self.root}") from exc

    def all(self) -> Iterable[str]:
        for sub in self.root.iterdir():
            if sub.is_dir():
                yield from (p.name for p in sub.iterdir() if not p.name.startswith("."))

    def delete(self, sha: str) -> None:
        self.path(sha).unlink(missing_ok=True)
