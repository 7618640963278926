"""The audit log: who changed what, when, from where.

An entry is written in the same transaction as the change it describes, so a
committed change always has its entry and a failed one never does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select

from impuls.store.schema import audit_log


@dataclass(frozen=True)
class Actor:
    """Who makes a change: the key's name and the client's address."""

    key_name: str
    source: str


#: changes made by the server itself (the first admin key, say)
SERVER = Actor("impuls", "server")


def record(conn: Connection, actor: Actor, action: str, target: str,
           detail: dict[str, Any] | None = None) -> None:
    """Add one entry inside the caller's transaction (``action`` like ``function.update``)."""
    conn.execute(insert(audit_log).values(
        at=datetime.now(UTC), key_name=actor.key_name, source=actor.source, action=action,
        target=target, detail=json.dumps(detail or {}, sort_keys=True)))


def query(db: Engine, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Entries newest first, and their total count."""
    with db.connect() as conn:
        rows = conn.execute(select(audit_log).order_by(audit_log.c.id.desc())
                            .limit(limit).offset(offset)).all()
        total = conn.execute(select(func.count()).select_from(audit_log)).scalar_one()
    entries = []
    for row in rows:
        m = dict(row._mapping)
        at = m["at"] if m["at"].tzinfo else m["at"].replace(tzinfo=UTC)
        m["at"] = at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        m["detail"] = json.loads(m["detail"])
        entries.append(m)
    return entries, int(total)
