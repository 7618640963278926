"""What every part of the registry shares: the store, the write lock, listeners, blob
collection and the look-ups of functions and qualifiers inside a transaction.

:class:`~impuls.functions.registry.FunctionRegistry` is this base plus one mixin per
concern (versions, aliases, event-invoke configs, URL configs).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Row, select, union_all

from impuls.errors import AliasNotFound, FunctionNotFound, InvalidInput, PreconditionFailed, VersionNotFound
from impuls.functions.models import LATEST, Function
from impuls.functions.packages import PackageBuilder
from impuls.runtimes import RuntimeRegistry
from impuls.store.blobs import BlobStore
from impuls.store.db import MAX_INT
from impuls.store.schema import aliases, function_versions, functions

log = logging.getLogger("impuls.registry")

#: ``(name, qualifier)``: qualifier "$LATEST" when $LATEST changed, a version number when
#: that version was deleted, "alias:<name>" when an alias changed, "url:<qualifier>" when a
#: URL configuration changed, "event-config:<qualifier>" when an event-invoke config changed,
#: None when the whole function was deleted
ChangeListener = Callable[[str, str | None], None]
ALIAS_PREFIX = "alias:"
URL_PREFIX = "url:"
EVENT_CONFIG_PREFIX = "event-config:"
#: changes of settings the engine does not keep (the doors and the event dispatcher do)
NOT_ENGINE = (URL_PREFIX, EVENT_CONFIG_PREFIX)


def new_revision_id() -> str:
    return str(uuid.uuid4())


def utc(ts: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything the registry returns is UTC-aware."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def now() -> datetime:
    return datetime.now(UTC)


def is_version_number(qualifier: str) -> bool:
    return qualifier.isascii() and qualifier.isdigit()


def existing_version_number(qualifier: str) -> bool:
    """A version number small enough to be stored (a larger one names no version)."""
    return is_version_number(qualifier) and int(qualifier) <= MAX_INT


def row_to_function(row: Row[Any]) -> Function:
    """$LATEST from its ``functions`` row."""
    m = row._mapping
    return Function(
        id=m["id"], name=m["name"], description=m["description"], runtime=m["runtime"],
        handler=m["handler"], code_sha256=m["code_sha256"], code_size=m["code_size"],
        code_kind=m["code_kind"], memory_mb=m["memory_mb"], timeout_sec=m["timeout_sec"],
        environment=json.loads(m["environment"]), status=m["status"],
        max_concurrency=m["max_concurrency"], ephemeral_storage_mb=m["ephemeral_storage_mb"],
        revision=m["revision"], created_at=utc(m["created_at"]), updated_at=utc(m["updated_at"]),
        version=LATEST, role=m["role"], runtime_given=m["runtime_given"] or m["runtime"],
        tags=json.loads(m["tags"]), reserved_concurrency=m["reserved_concurrency"],
        revision_id=m["revision_id"], init_once=m["init_once"], state=m["state"],
        state_reason=m["state_reason"],
        state_reason_code=m["state_reason_code"], last_update_status=m["last_update_status"],
        last_update_status_reason=m["last_update_status_reason"],
        last_update_status_reason_code=m["last_update_status_reason_code"],
        pending=json.loads(m["pending"]) if m["pending"] else None,
        pending_code_sha256=m["pending_code_sha256"], pending_code_size=m["pending_code_size"],
        pending_code_kind=m["pending_code_kind"],
    )


def version_to_function(fn_row: Row[Any], row: Row[Any]) -> Function:
    """A published version: its frozen configuration and code, its function's identity,
    tags and reserved concurrency (those belong to the function, not to a version)."""
    f, m = fn_row._mapping, row._mapping
    cfg = json.loads(m["config"])
    return Function(
        id=f["id"], name=f["name"], description=m["description"], runtime=cfg["runtime"],
        handler=cfg["handler"], code_sha256=m["code_sha256"], code_size=m["code_size"],
        code_kind=m["code_kind"], memory_mb=cfg["memory_mb"], timeout_sec=cfg["timeout_sec"],
        environment=cfg["environment"], status=cfg["status"], max_concurrency=cfg["max_concurrency"],
        ephemeral_storage_mb=cfg["ephemeral_storage_mb"], revision=cfg.get("revision", 0),
        created_at=utc(f["created_at"]), updated_at=utc(m["created_at"]), version=str(m["version"]),
        role=cfg.get("role", ""), runtime_given=cfg.get("runtime_given") or cfg["runtime"],
        tags=json.loads(f["tags"]), reserved_concurrency=f["reserved_concurrency"],
        revision_id=m["revision_id"], init_once=cfg.get("init_once", True),
    )


class RegistryBase:
    """The store and the plumbing every registry operation shares.

    Every change is one transaction, taken under ``_write_lock`` (which also orders blob
    writes against blob collection) and, on PostgreSQL, with the function's row locked.
    """

    #: the smallest maximum_event_age_seconds an event config may set (a server setting)
    min_event_age = 60

    def __init__(self, db: Engine, blobs: BlobStore, runtimes: RuntimeRegistry,
                 packages: PackageBuilder) -> None:
        self.db = db
        self.blobs = blobs
        self.runtimes = runtimes
        self.packages = packages
        self._write_lock = threading.RLock()
        self._listeners: list[ChangeListener] = []
        #: told of every change made here, after the listeners and before the change is
        #: answered; must not raise: the cluster's change feed (:mod:`impuls.cluster.changes`);
        #: None: one node
        self.publisher: ChangeListener | None = None

    # --- listeners -----------------------------------------------------------------

    def on_change(self, listener: ChangeListener) -> None:
        """Call ``listener(name, qualifier)`` after every committed change (see
        :data:`ChangeListener`); listeners run in the thread that made the change."""
        self._listeners.append(listener)

    def _changed(self, name: str, qualifier: str | None) -> None:
        """A change was committed here: tell the listeners, then the publisher."""
        self.announce(name, qualifier)
        if self.publisher is not None:
            self.publisher(name, qualifier)

    def announce(self, name: str, qualifier: str | None) -> None:
        """Tell the listeners of a change made here or, through the change feed, on another node."""
        for listener in self._listeners:
            try:
                listener(name, qualifier)
            except Exception:
                log.exception("a change listener failed for %s (%s)", name, qualifier)

    # --- look-ups inside a transaction ---------------------------------------------

    @staticmethod
    def _function_row(conn: Connection, name: str, lock: bool = False) -> Row[Any]:
        query = select(functions).where(functions.c.name == name)
        row = conn.execute(query.with_for_update() if lock else query).first()
        if row is None:
            raise FunctionNotFound(name)
        return row

    @staticmethod
    def _version_row(conn: Connection, name: str, version: str) -> Row[Any]:
        row = None
        if existing_version_number(version):
            row = conn.execute(select(function_versions).where(
                function_versions.c.function_name == name,
                function_versions.c.version == int(version))).first()
        if row is None:
            raise VersionNotFound(name, version)
        return row

    @staticmethod
    def _alias_row(conn: Connection, name: str, alias: str) -> Row[Any]:
        row = conn.execute(select(aliases).where(aliases.c.function_name == name,
                                                 aliases.c.name == alias)).first()
        if row is None:
            raise AliasNotFound(name, alias)
        return row

    def _check_qualifier(self, conn: Connection, name: str, qualifier: Any,
                         versions: bool = True) -> str:
        """``qualifier`` normalised ("$LATEST", "3", or an alias name) after checking that it
        exists; ``versions=False`` refuses version numbers (function URLs)."""
        if not isinstance(qualifier, str) or not qualifier:
            raise InvalidInput("qualifier: must be $LATEST, a version number or an alias name")
        if qualifier == LATEST:
            return qualifier
        if is_version_number(qualifier):
            if not versions:
                raise InvalidInput("qualifier: must be $LATEST or an alias name, not a version")
            version = str(int(qualifier))
            self._version_row(conn, name, version)
            return version
        self._alias_row(conn, name, qualifier)
        return qualifier

    @staticmethod
    def _check_revision(current: str, given: object, what: str) -> None:
        """PreconditionFailed unless ``given`` (when not None) is ``current``; InvalidInput
        unless it is a string."""
        if given is not None and not isinstance(given, str):
            raise InvalidInput("revision_id: must be a string")
        if given is not None and given != current:
            raise PreconditionFailed(f"revision_id: {given!r} is not the current revision of {what} "
                                     f"({current!r}); read it again and retry")

    # --- code blobs ----------------------------------------------------------------

    def _used_blobs(self, conn: Connection, shas: Iterable[str] | None = None) -> set[str]:
        """The blobs some function, pending update or version references (of ``shas``)."""
        wanted = None if shas is None else list(shas)
        parts = []
        for column in (functions.c.code_sha256, functions.c.pending_code_sha256,
                       function_versions.c.code_sha256):
            part = select(column.label("sha")).where(column.is_not(None))
            parts.append(part if wanted is None else part.where(column.in_(wanted)))
        return {sha for sha in conn.execute(union_all(*parts)).scalars() if sha}

    def _collect(self, *shas: str | None) -> None:
        """Remove the blobs of ``shas`` that nothing references any more (the caller holds
        the write lock, after its commit)."""
        candidates = {sha for sha in shas if sha}
        if not candidates:
            return
        with self.db.connect() as conn:
            used = self._used_blobs(conn, candidates)
        for sha in candidates - used:
            self.blobs.delete(sha)
        if self.packages.archives is not None:
            self.packages.archives.forget(candidates - used)

    def collect_garbage(self) -> int:
        """Remove every unreferenced blob (left by a crash) and the shared packages built from
        them; returns how many blobs."""
        with self._write_lock:
            with self.db.connect() as conn:
                used = self._used_blobs(conn)
            removed = 0
            for sha in list(self.blobs.all()):
                if sha not in used:
                    self.blobs.delete(sha)
                    removed += 1
            if self.packages.archives is not None:
                self.packages.archives.forget(self.packages.archives.code_shas() - used)
            return removed
