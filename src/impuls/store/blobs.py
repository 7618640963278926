"""Content-addressed code storage: ``<root>/<sha[:2]>/<sha>``, written atomically and durably.

One node keeps its blobs on its disk (:class:`BlobStore`).  Several nodes sharing a
PostgreSQL database keep them in the database's ``code_blobs`` table as well
(:class:`SharedBlobStore`): the local directory is then a cache, filled from the database
the first time a node needs a blob another node stored.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from impuls.errors import ImpulsError, StorageFull, disk_full
from impuls.store.schema import code_blobs


class BlobMissing(ImpulsError):
    """A function references code that is not on disk (nor in the database when it is shared):
    the store is damaged."""


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


#: a shared blob is removed from the database only when no put touched it for this long: a
#: put precedes the commit that references it by one transaction, and another node may be
#: about to reference content that a collection here just found unreferenced
SHARED_GRACE = timedelta(minutes=10)


class SharedBlobStore(BlobStore):
    """A :class:`BlobStore` whose blobs also live in the database (several nodes).

    ``put`` writes the local file and then the database row (an existing row only gets its
    ``stored_at`` refreshed), both before it returns, so a reference committed afterwards
    can be followed from every node.  ``get`` reads the local file, else the row (checked
    against its sha256), which it caches locally.  ``delete`` removes the local copy at once
    and the row only if no put touched it for :data:`SHARED_GRACE` (a later collection removes
    it otherwise).  ``all`` is the union of the local and the database's names.
    """

    def __init__(self, root: Path, db: Engine) -> None:
        super().__init__(root)
        self.db = db

    def put(self, data: bytes) -> str:
        sha = super().put(data)
        values = {"sha256": sha, "data": data, "size": len(data), "stored_at": datetime.now(UTC)}
        dialect = postgresql if self.db.dialect.name == "postgresql" else sqlite
        upsert = dialect.insert(code_blobs).values(**values)
        with self.db.begin() as conn:
            conn.execute(upsert.on_conflict_do_update(index_elements=[code_blobs.c.sha256],
                                                      set_={"stored_at": values["stored_at"]}))
        return sha

    def get(self, sha: str) -> bytes:
        if self.path(sha).exists():
            return super().get(sha)
        with self.db.connect() as conn:
            data = conn.execute(select(code_blobs.c.data).where(code_blobs.c.sha256 == sha)).scalar()
        if data is None or hashlib.sha256(data).hexdigest() != sha:
            raise BlobMissing(f"code blob {sha} is missing from {self.root} and from the database")
        super().put(bytes(data))
        return bytes(data)

    def all(self) -> Iterable[str]:
        with self.db.connect() as conn:
            shared = set(conn.execute(select(code_blobs.c.sha256)).scalars())
        return shared | set(super().all())

    def delete(self, sha: str) -> None:
        super().delete(sha)
        with self.db.begin() as conn:
            conn.execute(delete(code_blobs).where(code_blobs.c.sha256 == sha,
                                                  code_blobs.c.stored_at < datetime.now(UTC) - SHARED_GRACE))
