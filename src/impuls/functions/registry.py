"""The function registry: validation and persistence of functions and their code.

Every operation is one database transaction.  Code blobs are written (and
fsync'd) *before* the row that references them is committed, and removed
only after no committed row references them, so a crash at any point leaves
every answered create or update intact.  Listeners registered with
:meth:`FunctionRegistry.on_change` hear about every committed change (the
engine uses this to retire warm instances).
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from impuls.auth import audit
from impuls.auth.audit import Actor
from impuls.errors import FunctionExists, FunctionNotFound, InvalidInput
from impuls.functions.models import Code, Function, check_zip, split_request, validate_config
from impuls.functions.packages import Package, PackageBuilder
from impuls.runtimes import Runtime, RuntimeRegistry
from impuls.store.blobs import BlobStore
from impuls.store.schema import functions

ChangeListener = Callable[[str], None]
MAX_PAGE = 1000


def _row_to_function(row: Any) -> Function:
    m = row._mapping
    return Function(
        id=m["id"],
        name=m["name"],
        description=m["description"],
        runtime=m["runtime"],
        handler=m["handler"],
        code_sha256=m["code_sha256"],
        code_size=m["code_size"],
        code_kind=m["code_kind"],
        memory_mb=m["memory_mb"],
        timeout_sec=m["timeout_sec"],
        environment=json.loads(m["environment"]),
        status=m["status"],
        max_concurrency=m["max_concurrency"],
        ephemeral_storage_mb=m["ephemeral_storage_mb"],
        revision=m["revision"],
        created_at=_utc(m["created_at"]),
        updated_at=_utc(m["updated_at"]),
    )


def _like(pattern: str) -> str:
    """A function-name glob as a LIKE pattern (escape character: backslash)."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


class FunctionRegistry:
    """Create, read, update and delete functions; owns validation and code blobs."""

    def __init__(self, db: Engine, blobs: BlobStore, runtimes: RuntimeRegistry,
                 packages: PackageBuilder) -> None:
        self.db = db
        self.blobs = blobs
        self.runtimes = runtimes
        self.packages = packages
        self._blob_lock = threading.Lock()  # put+commit vs. collect
        self._listeners: list[ChangeListener] = []

    def on_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def _changed(self, name: str) -> None:
        for listener in self._listeners:
            listener(name)

    # --- reads ---------------------------------------------------------------

    def get(self, name: str) -> Function:
        with self.db.connect() as conn:
            row = conn.execute(select(functions).where(functions.c.name == name)).first()
        if row is None:
            raise FunctionNotFound(name)
        return _row_to_function(row)

    def list(self, limit: int = 100, offset: int = 0, pattern: str = "*") -> tuple[list[Function], int]:
        """A page of the functions whose names match ``pattern`` (``*`` and ``?`` wildcards),
        in name order, and their total count."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit: must be between 1 and {MAX_PAGE}")
        if offset < 0:
            raise InvalidInput("offset: must be 0 or more")
        matching = functions.c.name.like(_like(pattern), escape="\\")
        with self.db.connect() as conn:
            rows = conn.execute(
                select(functions).where(matching).order_by(functions.c.name).limit(limit).offset(offset)
            ).all()
            total = conn.execute(select(func.count()).select_from(functions).where(matching)).scalar_one()
        return [_row_to_function(r) for r in rows], int(total)

    def code(self, fn: Function) -> Code:
        return Code(fn.code_kind, self.blobs.get(fn.code_sha256))

    def runtime(self, fn: Function) -> Runtime:
        return self.runtimes.resolve(fn.runtime)

    def package(self, fn: Function) -> Package:
        """The built package of ``fn``'s current version (built now if missing)."""
        return self.packages.get(self.runtime(fn), fn.handler, fn.code_sha256, fn.code_kind,
                                 lambda: self.code(fn))

    def build_info(self, fn: Function) -> dict[str, object]:
        built = self.packages.info(self.runtime(fn), fn.handler, fn.code_sha256, fn.code_kind)
        return built.api() if built is not None else {"status": "pending", "log": "", "seconds": 0}

    # --- writes --------------------------------------------------------------

    def create(self, body: Any, actor: Actor = audit.SERVER) -> Function:
        config, code = split_request(body)
        if code is None:
            raise InvalidInput("code: one of 'code' or 'code_zip' is required")
        cfg, runtime = validate_config(config, self.runtimes)
        self._check_package(runtime, cfg.handler, code)
        self._build(runtime, cfg.handler, code)
        now = datetime.now(UTC)
        values = {
            **cfg.model_dump(),
            "id": str(uuid.uuid4()),
            "environment": json.dumps(cfg.environment),
            "code_size": len(code.data),
            "code_kind": code.kind,
            "revision": 1,
            "created_at": now,
            "updated_at": now,
        }
        with self._blob_lock:
            values["code_sha256"] = self.blobs.put(code.data)
            try:
                with self.db.begin() as conn:
                    conn.execute(insert(functions).values(**values))
                    audit.record(conn, actor, "function.create", cfg.name,
                                 {"code_sha256": values["code_sha256"], "runtime": cfg.runtime})
            except IntegrityError as exc:
                self._collect(values["code_sha256"])
                raise FunctionExists(cfg.name) from exc
            except Exception:
                self._collect(values["code_sha256"])
                raise
        self._changed(cfg.name)
        return self.get(cfg.name)

    def update(self, name: str, body: Any, actor: Actor = audit.SERVER) -> Function:
        """Partial update, validated like create; the stored version stays on any error."""
        config, code = split_request(body)
        if "name" in config and config["name"] != name:
            raise InvalidInput("name: cannot be changed by an update")
        current = self.get(name)
        cfg, runtime = validate_config({**current.config(), **config}, self.runtimes)
        if code is not None or cfg.handler != current.handler or cfg.runtime != current.runtime:
            self._check_package(runtime, cfg.handler, code or self.code(current))
            self._build(runtime, cfg.handler, code or self.code(current))
        values: dict[str, Any] = {
            **cfg.model_dump(),
            "environment": json.dumps(cfg.environment),
            "updated_at": datetime.now(UTC),
            "revision": current.revision + 1,
        }
        with self._blob_lock:
            if code is not None:
                values.update(
                    code_sha256=self.blobs.put(code.data),
                    code_size=len(code.data),
                    code_kind=code.kind,
                )
            try:
                with self.db.begin() as conn:
                    result = conn.execute(
                        update(functions)
                        .where(functions.c.name == name, functions.c.revision == current.revision)
                        .values(**values)
                    )
                    if result.rowcount != 1:
                        raise InvalidInput(f"function '{name}' was changed concurrently; retry")
                    audit.record(conn, actor, "function.update", name,
                                 {"fields": sorted(config), "code": code is not None,
                                  "revision": values["revision"]})
            except Exception:
                if "code_sha256" in values:
                    self._collect(values["code_sha256"])
                raise
            if values.get("code_sha256", current.code_sha256) != current.code_sha256:
                self._collect(current.code_sha256)
        self._changed(name)
        return self.get(name)

    def delete(self, name: str, actor: Actor = audit.SERVER) -> None:
        with self._blob_lock:
            with self.db.begin() as conn:
                row = conn.execute(
                    select(functions.c.code_sha256).where(functions.c.name == name)
                ).first()
                if row is None:
                    raise FunctionNotFound(name)
                conn.execute(delete(functions).where(functions.c.name == name))
                audit.record(conn, actor, "function.delete", name)
            self._collect(row[0])
        self._changed(name)

    # --- code blobs ----------------------------------------------------------

    def _check_package(self, runtime: Runtime, handler: str, code: Code) -> None:
        """The handler's file must exist in a zip package (source files are named after it)."""
        if code.kind == "source" or runtime.handler_rule != "module":
            return
        names = {i.filename for i in check_zip(code.data)}
        module = runtime.check_handler(handler)
        candidates = [module + ext for ext in runtime.module_extensions]
        if candidates and not names.intersection(candidates):
            raise InvalidInput(
                f"code_zip: the handler's module file is missing (looked for {', '.join(candidates)})"
            )

    def _build(self, runtime: Runtime, handler: str, code: Code) -> None:
        """Build (or find built) the package before anything is committed: a failing
        build is a 400 and the stored version stays in service."""
        self.packages.get(runtime, handler, hashlib.sha256(code.data).hexdigest(), code.kind,
                          lambda: code)

    def _collect(self, sha: str) -> None:
        """Remove blob ``sha`` if no function references it (caller holds the blob lock)."""
        with self.db.connect() as conn:
            used = conn.execute(
                select(func.count()).select_from(functions).where(functions.c.code_sha256 == sha)
            ).scalar_one()
        if not used:
            self.blobs.delete(sha)

    def collect_garbage(self) -> int:
        """Remove every unreferenced blob (left by a crash); returns how many."""
        with self._blob_lock:
            with self.db.connect() as conn:
                used = set(conn.execute(select(functions.c.code_sha256)).scalars())
            removed = 0
            for sha in list(self.blobs.all()):
                if sha not in used:
                    self.blobs.delete(sha)
                    removed += 1
            return removed
