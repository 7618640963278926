"""The nodes sharing a store: each writes a heartbeat row; a node that stops beating is down.

Every node upserts its row in ``nodes`` every :data:`HEARTBEAT_SECONDS` seconds with what
it is doing (instances, calls in flight, asynchronous events it holds).  A row whose last
beat is older than :data:`MISSED_BEATS` beats is reported ``down`` (killed, frozen, cut off
from the database); a node that stopped cleanly says ``stopped``.  Rows of nodes gone for
:data:`FORGET_AFTER` are removed.  The clocks of the nodes are assumed to agree within a
few seconds (NTP); the state is judged by the clock of the node that answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from impuls.store.schema import nodes

HEARTBEAT_SECONDS = 5.0
#: down after this many beats were missed (15 s without a beat)
MISSED_BEATS = 3
FORGET_AFTER = timedelta(days=1)
UP, DOWN, STOPPED = "up", "down", "stopped"


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


@dataclass(frozen=True)
class NodeBeat:
    """What one node says of itself in a heartbeat."""

    id: str
    address: str
    version: str
    sandbox: str
    started_at: datetime
    stats: dict[str, Any]


class NodeTable:
    """The ``nodes`` rows: :meth:`beat` and :meth:`stopped` for this node, :meth:`list` for all."""

    def __init__(self, db: Engine, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.db = db
        self.heartbeat_seconds = heartbeat_seconds

    @property
    def down_after(self) -> timedelta:
        return timedelta(seconds=self.heartbeat_seconds * MISSED_BEATS)

    def beat(self, node: NodeBeat, now: datetime | None = None) -> None:
        """Insert or refresh the node's row (a restart clears ``stopped_at``)."""
        now = now or datetime.now(UTC)
        values = {"id": node.id, "address": node.address, "version": node.version, "sandbox": node.sandbox,
                  "started_at": node.started_at, "heartbeat_at": now, "stopped_at": None,
                  "stats": json.dumps(node.stats)}
        dialect = postgresql if self.db.dialect.name == "postgresql" else sqlite
        upsert = dialect.insert(nodes).values(**values)
        with self.db.begin() as conn:
            conn.execute(upsert.on_conflict_do_update(
                index_elements=[nodes.c.id], set_={k: v for k, v in values.items() if k != "id"}))

    def stopped(self, node_id: str, now: datetime | None = None) -> None:
        with self.db.begin() as conn:
            conn.execute(update(nodes).where(nodes.c.id == node_id)
                         .values(stopped_at=now or datetime.now(UTC)))

    def prune(self, now: datetime | None = None) -> int:
        """Remove the rows of nodes silent for :data:`FORGET_AFTER`; how many."""
        cutoff = (now or datetime.now(UTC)) - FORGET_AFTER
        with self.db.begin() as conn:
            return conn.execute(delete(nodes).where(nodes.c.heartbeat_at < cutoff)).rowcount

    def list(self, now: datetime | None = None) -> list[dict[str, Any]]:
        """Every known node, by id, as the API shows it: ``state`` is up, down or stopped;
        ``seconds_since_heartbeat`` as this node's clock sees it."""
        now = now or datetime.now(UTC)
        with self.db.connect() as conn:
            rows = conn.execute(select(nodes).order_by(nodes.c.id)).all()
        found = []
        for row in rows:
            beat = _utc(row.heartbeat_at)
            state = STOPPED if row.stopped_at is not None else DOWN if now - beat > self.down_after else UP
            found.append({
                "id": row.id, "address": row.address, "state": state, "version": row.version,
                "sandbox": row.sandbox, "started_at": _utc(row.started_at).isoformat(),
                "heartbeat_at": beat.isoformat(),
                "seconds_since_heartbeat": round(max(0.0, (now - beat).total_seconds()), 3),
                **json.loads(row.stats)})
        return found
