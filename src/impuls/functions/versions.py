"""Published versions: frozen copies of $LATEST's code and configuration.

Version numbers count up per function and are never reused, not even after the newest
version is deleted (``functions.last_version``).  A version references its code blob, so
the blob lives as long as the version does.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, Row, delete, insert, select, update

from impuls.auth import audit
from impuls.auth.audit import Actor
from impuls.errors import FunctionNotReady, InvalidInput, UpdateInProgress, VersionInUse
from impuls.functions.base import (
    RegistryBase,
    new_revision_id,
    now,
    row_to_function,
    version_to_function,
)
from impuls.functions.models import ACTIVE, IN_PROGRESS, Function
from impuls.store.schema import aliases, event_invoke_configs, function_urls, function_versions, functions

MAX_DESCRIPTION = 256


class VersionsMixin(RegistryBase):
    def versions(self, name: str) -> list[Function]:
        """$LATEST first, then the published versions in number order (FunctionNotFound)."""
        with self.db.connect() as conn:
            fn_row = self._function_row(conn, name)
            rows = conn.execute(select(function_versions)
                                .where(function_versions.c.function_name == name)
                                .order_by(function_versions.c.version)).all()
        return [row_to_function(fn_row), *(version_to_function(fn_row, row) for row in rows)]

    def _get_version(self, conn: Connection, name: str, version: str) -> Function:
        fn_row = self._function_row(conn, name)
        return version_to_function(fn_row, self._version_row(conn, name, version))

    def publish(self, name: str, actor: Actor = audit.SERVER, description: str = "",
                code_sha256: str | None = None, revision_id: str | None = None) -> Function:
        """Freeze $LATEST's code and configuration as version N+1 and return it.

        Refused while the function is Pending or Failed (FunctionNotReady) or an update is
        being built (UpdateInProgress).  ``code_sha256`` (hex) must be $LATEST's code
        (InvalidInput) and ``revision_id`` its revision id (PreconditionFailed), when given.
        If neither code nor configuration changed since the newest version, that version is
        returned and nothing is published (as Lambda does).  ``description`` is the
        version's (default: the function's).  Audited as ``function.publish``.
        """
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
            raise InvalidInput(f"description: a string of at most {MAX_DESCRIPTION} characters")
        if code_sha256 is not None and not isinstance(code_sha256, str):
            raise InvalidInput("code_sha256: must be a string")
        with self._write_lock, self.db.begin() as conn:
            fn_row = self._function_row(conn, name, lock=True)
            fn = row_to_function(fn_row)
            if fn.state != ACTIVE:
                raise FunctionNotReady(name, fn.state, fn.state_reason)
            if fn.last_update_status == IN_PROGRESS:
                raise UpdateInProgress(name)
            self._check_revision(fn.revision_id, revision_id, f"function '{name}'")
            if code_sha256 is not None and code_sha256 != fn.code_sha256:
                raise InvalidInput(f"code_sha256: {code_sha256} is not the code of $LATEST "
                                   f"({fn.code_sha256}); it changed, read it again")
            newest = conn.execute(select(function_versions)
                                  .where(function_versions.c.function_name == name)
                                  .order_by(function_versions.c.version.desc()).limit(1)).first()
            if newest is not None and _unchanged(newest, fn):
                return version_to_function(fn_row, newest)
            number = max(fn_row._mapping["last_version"], newest.version if newest else 0) + 1
            conn.execute(insert(function_versions).values(
                function_name=name, version=number, config=json.dumps(
                    {**fn.snapshot(), "revision": fn.revision}, sort_keys=True),
                code_sha256=fn.code_sha256, code_size=fn.code_size, code_kind=fn.code_kind,
                description=description or fn.description, revision_id=new_revision_id(),
                created_at=now()))
            conn.execute(update(functions).where(functions.c.id == fn.id).values(last_version=number))
            audit.record(conn, actor, "function.publish", name,
                         {"version": number, "code_sha256": fn.code_sha256})
            return self._get_version(conn, name, str(number))

    def _delete_version(self, name: str, version: str, actor: Actor) -> None:
        """Delete one published version; VersionInUse while an alias routes to it."""
        with self._write_lock:
            with self.db.begin() as conn:
                self._function_row(conn, name, lock=True)
                row = self._version_row(conn, name, version)
                number = str(row.version)
                users = [a.name for a in conn.execute(select(aliases).where(aliases.c.function_name == name))
                         if a.function_version == number or number in json.loads(a.routing)]
                if users:
                    raise VersionInUse(name, number, sorted(users))
                conn.execute(delete(function_versions).where(function_versions.c.function_name == name,
                                                             function_versions.c.version == row.version))
                for table in (event_invoke_configs, function_urls):
                    conn.execute(delete(table).where(table.c.function_name == name,
                                                     table.c.qualifier == number))
                audit.record(conn, actor, "version.delete", name, {"version": int(number)})
            self._collect(row.code_sha256)
        self._changed(name, number)


def _unchanged(newest: Row[Any], fn: Function) -> bool:
    frozen = json.loads(newest.config)
    frozen.pop("revision", None)
    frozen.setdefault("init_once", True)  # frozen before the setting existed
    same: bool = (newest.code_sha256 == fn.code_sha256 and newest.code_kind == fn.code_kind
                  and frozen == json.loads(json.dumps(fn.snapshot())))
    return same
