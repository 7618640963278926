"""Aliases: names for a version ("live" → 3), optionally splitting traffic with a second
published version by weight.

An alias points at ``$LATEST`` or at a published version (its *primary*); with routing
weights, a share of the calls (0.0-1.0) goes to one *additional* published version
instead.  Listeners hear ``alias:<name>`` for every alias change.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from impuls.auth import audit
from impuls.auth.audit import Actor
from impuls.errors import AliasExists, InvalidInput
from impuls.functions.base import ALIAS_PREFIX, RegistryBase, is_version_number, new_revision_id, now, utc
from impuls.functions.models import LATEST, rfc3339
from impuls.store.schema import aliases, event_invoke_configs, function_urls

#: Lambda's rule: letters, digits, '-' and '_', and not all digits (that is a version)
ALIAS_RE = re.compile(r"^(?!^[0-9]+$)([a-zA-Z0-9-_]+)$")
MAX_ALIAS = 128
MAX_DESCRIPTION = 256


@dataclass(frozen=True)
class Alias:
    function_name: str
    name: str
    #: the primary version: a version number or "$LATEST"
    function_version: str
    description: str
    #: at most one additional version and the share of calls it gets (0.0-1.0)
    weights: dict[str, float]
    revision_id: str
    created_at: datetime
    updated_at: datetime

    def route(self) -> Route:
        for version, weight in self.weights.items():
            return Route(self.function_version, version, weight)
        return Route(self.function_version)

    def to_api(self) -> dict[str, Any]:
        return {"name": self.name, "function_name": self.function_name,
                "function_version": self.function_version, "description": self.description,
                "routing": dict(self.weights), "revision_id": self.revision_id,
                "created_at": rfc3339(self.created_at), "updated_at": rfc3339(self.updated_at)}


@dataclass(frozen=True)
class Route:
    """Where a call of a qualifier goes: ``additional`` with probability ``weight``, else
    ``primary`` (version numbers or "$LATEST")."""

    primary: str
    additional: str | None = None
    weight: float = 0.0

    def pick(self, draw: float) -> str:
        """The version for one call; ``draw`` is uniform in [0, 1)."""
        if self.additional is not None and draw < self.weight:
            return self.additional
        return self.primary


def _row_to_alias(row: Row[Any]) -> Alias:
    m = row._mapping
    return Alias(function_name=m["function_name"], name=m["name"], function_version=m["function_version"],
                 description=m["description"], weights=json.loads(m["routing"]),
                 revision_id=m["revision_id"], created_at=utc(m["created_at"]),
                 updated_at=utc(m["updated_at"]))


def check_alias_name(alias: Any) -> str:
    if not isinstance(alias, str) or not 1 <= len(alias) <= MAX_ALIAS or not ALIAS_RE.match(alias):
        raise InvalidInput(f"name: an alias name is 1-{MAX_ALIAS} letters, digits, '-' or '_', "
                           f"and not only digits (got {alias!r})")
    return alias


def _check_description(description: Any) -> str:
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise InvalidInput(f"description: a string of at most {MAX_DESCRIPTION} characters")
    return description


class AliasesMixin(RegistryBase):
    def _check_target(self, conn: Connection, name: str, version: Any, field: str) -> str:
        """``version`` as stored: "$LATEST" or an existing version's number."""
        if not isinstance(version, str) or not (version == LATEST or is_version_number(version)):
            raise InvalidInput(f"{field}: must be a version number or $LATEST (a string), got {version!r}")
        if version == LATEST:
            return version
        return str(self._version_row(conn, name, version).version)

    def _check_weights(self, conn: Connection, name: str, primary: str, weights: Any) -> dict[str, float]:
        if not isinstance(weights, dict):
            raise InvalidInput("routing: must be an object of {version: weight}")
        if len(weights) > 1:
            raise InvalidInput("routing: at most one additional version")
        out: dict[str, float] = {}
        for version, weight in weights.items():
            number = self._check_target(conn, name, version, "routing")
            if number == LATEST:
                raise InvalidInput("routing: the additional version must be a published version, "
                                   "not $LATEST")
            if primary == LATEST:
                raise InvalidInput("routing: an alias that routes between versions must point at a "
                                   "published version, not $LATEST")
            if number == primary:
                raise InvalidInput(f"routing: version {number} is already the alias's version")
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0.0 <= weight <= 1.0:
                raise InvalidInput(f"routing: the weight of version {number} must be a number "
                                   "from 0.0 to 1.0")
            out[number] = float(weight)
        return out

    def create_alias(self, name: str, alias: str, version: str, actor: Actor = audit.SERVER,
                     description: str = "", weights: dict[str, float] | None = None) -> Alias:
        """Create alias ``alias`` of function ``name`` pointing at ``version`` ("$LATEST" or a
        published version), optionally sending ``weights``' share of calls to one other
        published version.  AliasExists, VersionNotFound, FunctionNotFound, InvalidInput.
        Audited as ``alias.create``; listeners hear ``alias:<alias>``."""
        check_alias_name(alias)
        _check_description(description)
        stamp = now()
        with self._write_lock:
            try:
                with self.db.begin() as conn:
                    self._function_row(conn, name, lock=True)
                    primary = self._check_target(conn, name, version, "function_version")
                    routing = self._check_weights(conn, name, primary, {} if weights is None else weights)
                    conn.execute(insert(aliases).values(
                        function_name=name, name=alias, function_version=primary, description=description,
                        routing=json.dumps(routing), revision_id=new_revision_id(), created_at=stamp,
                        updated_at=stamp))
                    audit.record(conn, actor, "alias.create", f"{name}:{alias}",
                                 {"function_version": primary, "routing": routing})
            except IntegrityError as exc:
                raise AliasExists(name, alias) from exc
        self._changed(name, ALIAS_PREFIX + alias)
        return self.get_alias(name, alias)

    def get_alias(self, name: str, alias: str) -> Alias:
        """FunctionNotFound, AliasNotFound."""
        with self.db.connect() as conn:
            self._function_row(conn, name)
            return _row_to_alias(self._alias_row(conn, name, alias))

    def list_aliases(self, name: str, version: str | None = None) -> list[Alias]:
        """The function's aliases in name order; only those whose primary version is
        ``version``, when given."""
        with self.db.connect() as conn:
            self._function_row(conn, name)
            query = select(aliases).where(aliases.c.function_name == name)
            if version is not None:
                query = query.where(aliases.c.function_version == version)
            return [_row_to_alias(r) for r in conn.execute(query.order_by(aliases.c.name))]

    def update_alias(self, name: str, alias: str, actor: Actor = audit.SERVER, version: str | None = None,
                     description: str | None = None, weights: dict[str, float] | None = None,
                     revision_id: str | None = None) -> Alias:
        """Change what is given (None keeps it; ``weights={}`` removes the routing); the
        existing routing is checked again against a new primary version.  PreconditionFailed
        when ``revision_id`` is not the alias's.  Audited as ``alias.update``."""
        if description is not None:
            _check_description(description)
        with self._write_lock, self.db.begin() as conn:
            self._function_row(conn, name, lock=True)
            current = _row_to_alias(self._alias_row(conn, name, alias))
            self._check_revision(current.revision_id, revision_id, f"alias '{name}:{alias}'")
            primary = current.function_version if version is None else self._check_target(
                conn, name, version, "function_version")
            routing = self._check_weights(conn, name, primary,
                                          current.weights if weights is None else weights)
            values: dict[str, Any] = {"function_version": primary, "routing": json.dumps(routing),
                                      "revision_id": new_revision_id(), "updated_at": now()}
            if description is not None:
                values["description"] = description
            conn.execute(update(aliases).where(aliases.c.function_name == name, aliases.c.name == alias)
                         .values(**values))
            audit.record(conn, actor, "alias.update", f"{name}:{alias}",
                         {"function_version": primary, "routing": routing})
        self._changed(name, ALIAS_PREFIX + alias)
        return self.get_alias(name, alias)

    def delete_alias(self, name: str, alias: str, actor: Actor = audit.SERVER) -> None:
        """Delete the alias and its event-invoke and URL configs.  Audited as ``alias.delete``."""
        with self._write_lock, self.db.begin() as conn:
            self._function_row(conn, name, lock=True)
            self._alias_row(conn, name, alias)
            conn.execute(delete(aliases).where(aliases.c.function_name == name, aliases.c.name == alias))
            for table in (event_invoke_configs, function_urls):
                conn.execute(delete(table).where(table.c.function_name == name, table.c.qualifier == alias))
            audit.record(conn, actor, "alias.delete", f"{name}:{alias}")
        self._changed(name, ALIAS_PREFIX + alias)

    def route(self, name: str, qualifier: str | None) -> Route:
        """Where calls of ``name:qualifier`` go.  Version numbers and $LATEST route to
        themselves unchecked (the engine reads them next); an alias must exist."""
        if not qualifier or qualifier == LATEST:
            return Route(LATEST)
        if is_version_number(qualifier):
            return Route(str(int(qualifier)))
        return self.get_alias(name, qualifier).route()
