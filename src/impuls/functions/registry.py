"""The function registry: validation and persistence of functions, their code, versions,
aliases and settings.

Every operation is one database transaction, and every change writes its audit entry in
it.  Code blobs are written (and fsync'd) *before* the row that references them is
committed, and removed only after no committed row references them (a function, its
pending update or one of its versions), so a crash at any point leaves every answered
change intact.  Listeners registered with :meth:`FunctionRegistry.on_change` hear about
every committed change (the engine uses this to retire warm instances).

Lifecycle (Lambda's): a function is ``Pending`` while its first package is built in the
background (``create(wait=False)``), then ``Active`` or ``Failed``; its
``last_update_status`` is ``InProgress`` while a change is being built, then
``Successful`` or ``Failed``.  Background builds run on the registry's own threads
(:mod:`impuls.functions.builds`); :meth:`FunctionRegistry.resume_builds` picks up those a
crash interrupted.

The parts live in one module per concern: :mod:`~impuls.functions.versions`,
:mod:`~impuls.functions.aliases`, :mod:`~impuls.functions.event_configs`,
:mod:`~impuls.functions.urls`, on the shared :mod:`~impuls.functions.base`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine, Row, and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql import ColumnElement

from impuls.auth import audit
from impuls.auth.audit import Actor
from impuls.errors import FunctionExists, ImpulsError, InvalidInput, UpdateInProgress
from impuls.functions.aliases import AliasesMixin
from impuls.functions.base import (
    ChangeListener,
    is_version_number,
    new_revision_id,
    now,
    row_to_function,
    version_to_function,
)
from impuls.functions.builds import BuildQueue
from impuls.functions.event_configs import EventConfigsMixin
from impuls.functions.models import (
    ACTIVE,
    FAILED,
    IN_PROGRESS,
    LATEST,
    PENDING,
    SUCCESSFUL,
    Code,
    Function,
    FunctionConfig,
    check_zip,
    split_request,
    validate_function,
    validate_tags,
)
from impuls.functions.packages import BuildFailed, Package, PackageBuilder
from impuls.functions.urls import UrlConfigsMixin
from impuls.functions.versions import VersionsMixin
from impuls.runtimes import Runtime, RuntimeRegistry
from impuls.store.blobs import BlobStore
from impuls.store.db import MAX_INT
from impuls.store.schema import (
    aliases,
    event_invoke_configs,
    function_urls,
    function_versions,
    functions,
    schedules,
)

__all__ = ["ChangeListener", "FunctionRegistry"]

log = logging.getLogger("impuls.registry")
MAX_PAGE = 1000
#: how much of a build failure ``state_reason`` / ``last_update_status_reason`` keep
MAX_REASON = 1000
_CLEARED_UPDATE = {"last_update_status_reason": None, "last_update_status_reason_code": None}
_NO_PENDING = {"pending": None, "pending_code_sha256": None, "pending_code_size": None,
               "pending_code_kind": None}


def _like(pattern: str) -> str:
    """A function-name glob as a LIKE pattern (escape character: backslash)."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _failure(exc: Exception) -> tuple[str, str]:
    """A failed build as (reason, Lambda's reason code)."""
    if isinstance(exc, BuildFailed):
        summary = exc.message.splitlines()[0]
        tail = [line for line in exc.log.splitlines() if line.strip()][-3:]
        reason = summary + (f" (last output: {' | '.join(tail)})" if tail else "")
        code = "InvalidConfiguration"
    elif isinstance(exc, InvalidInput) and exc.message.startswith("runtime:"):
        reason, code = exc.message, "InvalidRuntime"
    else:
        message = exc.message if isinstance(exc, ImpulsError) else f"{type(exc).__name__}: {exc}"
        reason, code = f"internal error: {message}", "InternalError"
    return (reason if len(reason) <= MAX_REASON else reason[:MAX_REASON - 3] + "..."), code


class FunctionRegistry(VersionsMixin, AliasesMixin, EventConfigsMixin, UrlConfigsMixin):
    """Functions, versions, aliases, tags, concurrency, event-invoke and URL configs;
    owns validation, code blobs and background builds.

    ``max_reserved_concurrency`` bounds :meth:`put_concurrency` (the server's cap on
    instances); ``build_workers`` is the number of background build threads;
    ``min_event_age`` is the smallest ``maximum_event_age_seconds`` an event config may set.
    """

    def __init__(self, db: Engine, blobs: BlobStore, runtimes: RuntimeRegistry,
                 packages: PackageBuilder, max_reserved_concurrency: int = 1000,
                 build_workers: int = 2, min_event_age: int = 60) -> None:
        super().__init__(db, blobs, runtimes, packages)
        self.max_reserved_concurrency = max_reserved_concurrency
        self.min_event_age = min_event_age
        self._builds = BuildQueue(self._build_job, build_workers)

    # --- reads ---------------------------------------------------------------

    def get(self, name: str, qualifier: str | None = None) -> Function:
        """$LATEST (``qualifier`` None, "" or "$LATEST"), a published version (digits:
        VersionNotFound) or the version an alias points at (anything else: AliasNotFound);
        FunctionNotFound first."""
        with self.db.connect() as conn:
            if qualifier is not None and qualifier != LATEST and is_version_number(qualifier):
                return self._get_version(conn, name, qualifier)
            fn_row = self._function_row(conn, name)
            if not qualifier or qualifier == LATEST:
                return row_to_function(fn_row)
            target = self._alias_row(conn, name, qualifier).function_version
            if target == LATEST:
                return row_to_function(fn_row)
            return version_to_function(fn_row, self._version_row(conn, name, target))

    def list(self, limit: int = 100, offset: int = 0, pattern: str = "*",
             search: str = "") -> tuple[list[Function], int]:
        """A page of the functions ($LATEST) whose names match ``pattern`` (``*`` and ``?``
        wildcards) and contain ``search`` (any case), in name order, and their total count."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit: must be between 1 and {MAX_PAGE}")
        if not 0 <= offset <= MAX_INT:
            raise InvalidInput(f"offset: must be between 0 and {MAX_INT}")
        matching: ColumnElement[bool] = functions.c.name.like(_like(pattern), escape="\\")
        if search:
            matching = and_(matching, func.lower(functions.c.name).contains(search.lower(), autoescape=True))
        with self.db.connect() as conn:
            rows = conn.execute(
                select(functions).where(matching).order_by(functions.c.name).limit(limit).offset(offset)
            ).all()
            total = conn.execute(select(func.count()).select_from(functions).where(matching)).scalar_one()
        return [row_to_function(r) for r in rows], int(total)

    def code(self, fn: Function) -> Code:
        return Code(fn.code_kind, self.blobs.get(fn.code_sha256))

    def runtime(self, fn: Function) -> Runtime:
        return self.runtimes.resolve(fn.runtime)

    def package(self, fn: Function) -> Package:
        """The built package of ``fn`` (any version; built now if missing)."""
        return self.packages.get(self.runtime(fn), fn.handler, fn.code_sha256, fn.code_kind,
                                 lambda: self.code(fn))

    def build_info(self, fn: Function) -> dict[str, object]:
        built = self.packages.info(self.runtime(fn), fn.handler, fn.code_sha256, fn.code_kind)
        if built is not None:
            return built.api()
        if fn.state == FAILED:
            return {"status": "failed", "log": fn.state_reason or "", "seconds": 0}
        return {"status": "pending", "log": "", "seconds": 0}

    # --- create, update, delete ----------------------------------------------

    def create(self, body: Any, actor: Actor = audit.SERVER, wait: bool = True) -> Function:
        """Create a function from a native body (config fields, ``code`` or ``code_zip``,
        ``role``, ``tags``).  Audited as ``function.create``.

        ``wait=True``: the package is built first (BuildFailed, a 400, leaves nothing
        behind) and the function is committed Active/Successful.  ``wait=False`` (Lambda's
        way): what is cheap is checked (fields, zip, the handler's file), the code stored and
        the function committed as Pending/InProgress at once; a background build then makes
        it Active/Successful, or Failed with ``state_reason`` (the build error, shortened) and
        ``state_reason_code`` InvalidConfiguration, and listeners hear ``$LATEST`` again.
        """
        config, code = split_request(body)
        if code is None:
            raise InvalidInput("code: one of 'code' or 'code_zip' is required")
        tags = validate_tags(config.pop("tags")) if "tags" in config else {}
        valid = validate_function(config, self.runtimes)
        cfg, runtime = valid.config, valid.runtime
        self._check_package(runtime, cfg.handler, code)
        if wait:
            self._build(runtime, cfg.handler, code)
        stamp = now()
        values: dict[str, Any] = {
            **cfg.model_dump(),
            "id": str(uuid.uuid4()),
            "environment": json.dumps(cfg.environment),
            "code_size": len(code.data),
            "code_kind": code.kind,
            "revision": 1,
            "created_at": stamp,
            "updated_at": stamp,
            "role": valid.role,
            "runtime_given": valid.runtime_given,
            "tags": json.dumps(tags),
            "revision_id": new_revision_id(),
        }
        if wait:
            values.update(state=ACTIVE, last_update_status=SUCCESSFUL)
        else:
            values.update(state=PENDING, state_reason="The function is being created.",
                          state_reason_code="Creating", last_update_status=IN_PROGRESS)
        with self._write_lock:
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
        created = self.get(cfg.name)  # read before the build can change it
        self._changed(cfg.name, LATEST)
        if not wait:
            self._builds.submit(values["id"])
        return created

    def update(self, name: str, body: Any, actor: Actor = audit.SERVER, wait: bool = True,
               revision_id: str | None = None) -> Function:
        """Partial update, merged onto $LATEST and validated like create; on any error the
        stored function stays as it was.  Audited as ``function.update``.

        Refused with UpdateInProgress while ``last_update_status`` is InProgress, and with
        PreconditionFailed when ``revision_id`` is given and not the current one.
        ``wait=True``: a change of code, runtime or handler is built first (BuildFailed),
        then everything is applied.  ``wait=False``: such a change is stored as the pending
        update (``last_update_status`` InProgress) and built in the background, which applies
        it (revision + 1, Successful) or drops it (Failed, with
        ``last_update_status_reason[_code]``; the served function unchanged); the answer is
        then :meth:`Function.as_pending`.  A change that needs no build applies at once.
        """
        config, code = split_request(body)
        if "name" in config and config["name"] != name:
            raise InvalidInput("name: cannot be changed by an update")
        if "tags" in config:
            raise InvalidInput("tags: change tags with tag and untag, not with an update")
        current = self.get(name)
        if current.last_update_status == IN_PROGRESS:
            raise UpdateInProgress(name)
        self._check_revision(current.revision_id, revision_id, f"function '{name}'")
        valid = validate_function({**current.config(), "role": current.role, **config}, self.runtimes,
                                  config.get("runtime") if "runtime" in config else current.runtime_given)
        cfg, runtime = valid.config, valid.runtime
        needs_build = code is not None or cfg.handler != current.handler or cfg.runtime != current.runtime
        if needs_build:
            new_code = code or self.code(current)
            self._check_package(runtime, cfg.handler, new_code)
            if wait:
                self._build(runtime, cfg.handler, new_code)
        pending = needs_build and not wait
        values: dict[str, Any] = {"revision_id": new_revision_id(), **_CLEARED_UPDATE}
        if pending:
            values.update(pending=json.dumps(valid.snapshot()), last_update_status=IN_PROGRESS,
                          pending_code_sha256=current.code_sha256, pending_code_size=current.code_size,
                          pending_code_kind=current.code_kind)
        else:
            values.update(cfg.model_dump())
            values.update(environment=json.dumps(cfg.environment), role=valid.role,
                          runtime_given=valid.runtime_given, updated_at=now(), revision=current.revision + 1,
                          last_update_status=SUCCESSFUL)
            if needs_build and current.state == FAILED:  # the new package built: it can run now
                values.update(state=ACTIVE, state_reason=None, state_reason_code=None)
        prefix = "pending_" if pending else ""
        with self._write_lock:
            if code is not None:
                values.update({f"{prefix}code_sha256": self.blobs.put(code.data),
                               f"{prefix}code_size": len(code.data), f"{prefix}code_kind": code.kind})
            new_sha = values.get(f"{prefix}code_sha256") if code is not None else None
            try:
                with self.db.begin() as conn:
                    result = conn.execute(
                        update(functions)
                        .where(functions.c.name == name, functions.c.revision_id == current.revision_id)
                        .values(**values)
                    )
                    if result.rowcount != 1:
                        raise InvalidInput(f"function '{name}' was changed concurrently; retry")
                    audit.record(conn, actor, "function.update", name,
                                 {"fields": sorted(config), "code": code is not None,
                                  "revision": values.get("revision", current.revision),
                                  **({"pending": True} if pending else {})})
            except Exception:
                self._collect(new_sha)
                raise
            if not pending and new_sha is not None and new_sha != current.code_sha256:
                self._collect(current.code_sha256)
        updated = self.get(name)  # read before the build can change it
        self._changed(name, LATEST)
        if pending:
            self._builds.submit(current.id)
            return updated.as_pending()
        return updated

    def delete(self, name: str, actor: Actor = audit.SERVER, qualifier: str | None = None) -> None:
        """Delete the function with its versions, aliases, event-invoke and URL configs
        (audited as ``function.delete``; listeners hear ``None``) or, with a version number
        as ``qualifier``, that version alone (``version.delete``; VersionInUse while an alias
        routes to it; listeners hear the number).  "$LATEST" or an alias is InvalidInput."""
        if qualifier is not None:
            if qualifier == LATEST:
                raise InvalidInput("qualifier: $LATEST cannot be deleted alone; delete the function")
            if not is_version_number(qualifier):
                raise InvalidInput("qualifier: must be a version number (delete an alias as an alias)")
            self._delete_version(name, str(int(qualifier)), actor)
            return
        with self._write_lock:
            with self.db.begin() as conn:
                row = self._function_row(conn, name, lock=True)
                shas = {row.code_sha256, row.pending_code_sha256, *conn.execute(
                    select(function_versions.c.code_sha256)
                    .where(function_versions.c.function_name == name)).scalars()}
                for table in (aliases, event_invoke_configs, function_urls, function_versions, schedules):
                    conn.execute(delete(table).where(table.c.function_name == name))
                conn.execute(delete(functions).where(functions.c.name == name))
                audit.record(conn, actor, "function.delete", name)
            self._collect(*shas)
        self._changed(name, None)

    # --- tags and reserved concurrency ---------------------------------------

    def tag(self, name: str, tags: dict[str, str], actor: Actor = audit.SERVER) -> Function:
        """Add or replace tags (at most 50 in all).  Audited as ``function.tag``."""
        given = validate_tags(tags)

        def change(row: Row[Any]) -> dict[str, Any]:
            return {"tags": json.dumps(validate_tags({**json.loads(row.tags), **given}))}

        return self._change_row(name, actor, "function.tag", {"keys": sorted(given)}, change)

    def untag(self, name: str, keys: Sequence[str], actor: Actor = audit.SERVER) -> Function:
        """Remove tags (names not set are ignored).  Audited as ``function.untag``."""
        if not isinstance(keys, list | tuple) or not all(isinstance(k, str) for k in keys):
            raise InvalidInput("keys: a list of tag names")

        def change(row: Row[Any]) -> dict[str, Any]:
            return {"tags": json.dumps({k: v for k, v in json.loads(row.tags).items() if k not in keys})}

        return self._change_row(name, actor, "function.untag", {"keys": sorted(keys)}, change)

    def put_concurrency(self, name: str, reserved: int, actor: Actor = audit.SERVER) -> Function:
        """Reserve ``reserved`` instances (0 to the server's maximum): the function's
        concurrency limit, for every version, instead of ``max_concurrency``; 0 throttles
        every call.  Audited as ``function.concurrency``."""
        top = self.max_reserved_concurrency
        if isinstance(reserved, bool) or not isinstance(reserved, int) or not 0 <= reserved <= top:
            raise InvalidInput(f"reserved_concurrency: a whole number from 0 to {top}")
        return self._change_row(name, actor, "function.concurrency", {"reserved_concurrency": reserved},
                                lambda _: {"reserved_concurrency": reserved})

    def delete_concurrency(self, name: str, actor: Actor = audit.SERVER) -> Function:
        """Back to ``max_concurrency``.  Audited as ``function.concurrency``."""
        return self._change_row(name, actor, "function.concurrency", {"reserved_concurrency": None},
                                lambda _: {"reserved_concurrency": None})

    def _change_row(self, name: str, actor: Actor, action: str, detail: dict[str, Any],
                    change: Callable[[Row[Any]], dict[str, Any]]) -> Function:
        """Apply ``change(row)`` to the function's row with a new revision id."""
        with self._write_lock, self.db.begin() as conn:
            row = self._function_row(conn, name, lock=True)
            conn.execute(update(functions).where(functions.c.id == row.id)
                         .values(**change(row), revision_id=new_revision_id()))
            audit.record(conn, actor, action, name, detail)
        self._changed(name, LATEST)
        return self.get(name)

    # --- background builds ---------------------------------------------------

    def resume_builds(self) -> int:
        """Submit the builds a crash left unfinished (functions still Pending, updates still
        InProgress); returns how many functions were waiting.  Called when the server starts."""
        with self.db.connect() as conn:
            ids = list(conn.execute(select(functions.c.id).where(
                or_(functions.c.state == PENDING, functions.c.last_update_status == IN_PROGRESS))).scalars())
        for fn_id in ids:
            self._builds.submit(fn_id)
        return len(ids)

    def wait_for_builds(self, timeout: float | None = None) -> bool:
        """Wait until no background build is queued or running; False on timeout."""
        return self._builds.wait_idle(timeout)

    def close(self) -> None:
        """Stop the background builds (an unfinished one is resumed at the next start)."""
        self._builds.close()

    def _build_job(self, fn_id: str) -> None:
        """Finish whatever build the function ``fn_id`` waits for (see the module doc)."""
        with self.db.connect() as conn:
            row = conn.execute(select(functions).where(functions.c.id == fn_id)).first()
        if row is None:
            return
        fn = row_to_function(row)
        if fn.state == PENDING:
            self._finish_create(fn)
        elif fn.last_update_status == IN_PROGRESS:
            self._finish_update(fn)

    def _finish_create(self, fn: Function) -> None:
        values: dict[str, Any] = {"revision_id": new_revision_id()}
        try:
            self.package(fn)
            values.update(state=ACTIVE, state_reason=None, state_reason_code=None,
                          last_update_status=SUCCESSFUL, **_CLEARED_UPDATE)
        except Exception as exc:
            reason, code = _failure(exc)
            log.info("the build of function %s failed: %s", fn.name, reason)
            values.update(state=FAILED, state_reason=reason, state_reason_code=code,
                          last_update_status=FAILED, last_update_status_reason=reason,
                          last_update_status_reason_code=code)
        with self._write_lock, self.db.begin() as conn:
            done = conn.execute(update(functions).where(functions.c.id == fn.id, functions.c.state == PENDING)
                                .values(**values)).rowcount
        if done:
            self._changed(fn.name, LATEST)

    def _finish_update(self, fn: Function) -> None:
        values: dict[str, Any] = {"revision_id": new_revision_id(), **_NO_PENDING}
        ok = True
        try:
            if fn.pending is not None and fn.pending_code_sha256 is not None:
                target = fn.as_pending()
                self.package(target)
                cfg = {k: fn.pending[k] for k in FunctionConfig.model_fields
                       if k != "name" and k in fn.pending}
                values.update(cfg)
                values.update(environment=json.dumps(cfg["environment"]), role=target.role,
                              runtime_given=target.runtime_given, code_sha256=target.code_sha256,
                              code_size=target.code_size, code_kind=target.code_kind,
                              revision=functions.c.revision + 1, updated_at=now(), state=ACTIVE,
                              state_reason=None, state_reason_code=None)
            values.update(last_update_status=SUCCESSFUL, **_CLEARED_UPDATE)
        except Exception as exc:
            ok = False
            reason, code = _failure(exc)
            log.info("the update of function %s failed to build: %s", fn.name, reason)
            values.update(last_update_status=FAILED, last_update_status_reason=reason,
                          last_update_status_reason_code=code)
        with self._write_lock:
            with self.db.begin() as conn:
                done = conn.execute(update(functions).where(
                    functions.c.id == fn.id, functions.c.last_update_status == IN_PROGRESS)
                    .values(**values)).rowcount
            if done:
                self._collect(fn.code_sha256 if ok else fn.pending_code_sha256)
        if done:
            self._changed(fn.name, LATEST)

    # --- code blobs ----------------------------------------------------------

    def _check_package(self, runtime: Runtime, handler: str, code: Code) -> None:
        """The handler's file must exist in a zip package (source files are named after it)."""
        if code.kind == "source" or runtime.handler_rule not in ("module", "ruby"):
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
