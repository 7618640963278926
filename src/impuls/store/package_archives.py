"""Built packages shared by the nodes of a cluster: one archive per package key in the database.

A package (:mod:`impuls.functions.packages`) is built once, on the node where its function was
created or updated, and stored here as a gzipped tar of its directory with its build record.
Another node that needs it unpacks the archive instead of building again (no second ``pip`` or
``go build``, and the very same files).  Rows are keyed by the package key, which hashes the
code's sha256, the runtime, the handler and the build recipe, so a row never changes; rows
whose code no function references any more are removed by :meth:`PackageArchives.forget`.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from impuls.errors import ImpulsError
from impuls.store.schema import package_archives


class ArchiveDamaged(ImpulsError):
    """A stored package archive holds something a package cannot: a path outside its
    directory, a device, a hard link.  The node builds the package itself instead."""


def pack(directory: Path) -> bytes:
    """``directory``'s tree (files, directories, symbolic links, their modes) as tar.gz."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
    return buf.getvalue()


def unpack(data: bytes, dest: Path) -> None:
    """Extract an archive made by :func:`pack` into the empty directory ``dest``; raises
    ArchiveDamaged (before writing anything) if a member could escape ``dest``."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            name = posixpath.normpath(m.name)
            if name.startswith(("/", "../")) or name == ".." or not (m.isreg() or m.isdir() or m.issym()):
                raise ArchiveDamaged(f"package archive member {m.name!r} is not allowed")
            if m.issym():
                target = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname))
                if m.linkname.startswith("/") or target == ".." or target.startswith("../"):
                    raise ArchiveDamaged(f"package archive link {m.name!r} points outside the package")
            m.mode &= 0o755
        tar.extractall(dest, members=members)


class PackageArchives:
    """The ``package_archives`` rows (see the module doc); safe to use from many threads."""

    def __init__(self, db: Engine) -> None:
        self.db = db

    def put(self, key: str, code_sha256: str, directory: Path, meta: dict[str, Any]) -> None:
        """Store the package in ``directory`` under ``key`` (a key stored already is kept)."""
        values = {"key": key, "code_sha256": code_sha256, "archive": pack(directory),
                  "meta": json.dumps(meta), "stored_at": datetime.now(UTC)}
        dialect = postgresql if self.db.dialect.name == "postgresql" else sqlite
        with self.db.begin() as conn:
            conn.execute(dialect.insert(package_archives).values(**values)
                         .on_conflict_do_nothing(index_elements=[package_archives.c.key]))

    def get(self, key: str, dest: Path) -> dict[str, Any] | None:
        """Unpack the package ``key`` into ``dest``; its build record, or None if none is stored."""
        with self.db.connect() as conn:
            row = conn.execute(select(package_archives.c.archive, package_archives.c.meta)
                               .where(package_archives.c.key == key)).first()
        if row is None:
            return None
        unpack(bytes(row.archive), dest)
        return dict(json.loads(row.meta))

    def forget(self, code_sha256s: Iterable[str]) -> None:
        """Remove the packages built from these code blobs (no function references them)."""
        shas = list(code_sha256s)
        if shas:
            with self.db.begin() as conn:
                conn.execute(delete(package_archives).where(package_archives.c.code_sha256.in_(shas)))

    def code_shas(self) -> set[str]:
        with self.db.connect() as conn:
            return set(conn.execute(select(package_archives.c.code_sha256).distinct()).scalars())
