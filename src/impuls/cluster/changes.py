"""The change feed: every node hears the registry changes made on the others.

Each node keeps what it runs in memory (the engine's versions and alias routes, the URL
door's configurations, the dispatcher's policies) and reads no database on the warm path.
When several nodes share a PostgreSQL database, a change committed on one node must reach
the caches of all:

- :meth:`ChangeFeed.publish` (the registry's publisher) appends ``(function, qualifier)`` to
  the ``changes`` table after the change's commit and before the change is answered, and
  sends ``NOTIFY impuls_changes`` in the same transaction.  The table is locked for the
  insert, so row ids are assigned in commit order: the largest id is the cluster's revision.
- Every node's reader thread waits for a notification for at most ``poll_seconds`` (0.5 s),
  then reads the rows after the last id it has seen and hands those of other nodes to
  :meth:`~impuls.functions.base.RegistryBase.announce`, exactly as a local change.  A lost
  notification (a dropped LISTEN connection) therefore delays a change by one poll at most.

The promise: a change answered on one node is no longer served by any node after
``poll_seconds`` plus one catch-up query (well under a second), unless a node cannot reach
the database (then it serves what it has, and catches up when it can).  A change whose
commit succeeded but whose row could not be written right after (the database went away in
between) is kept and written by the reader thread as soon as it can, in order.  Rows older
than :data:`RETENTION` are pruned; a node whose reader has not caught up for that long
(it was frozen) forgets every function it knows, as a restart would.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
from sqlalchemy import Engine, delete, func, insert, select, text

from impuls.store.db import PG_CONNECT_ARGS
from impuls.store.schema import changes, functions

log = logging.getLogger("impuls.cluster")

CHANNEL = "impuls_changes"
POLL_SECONDS = 0.5
RETENTION = timedelta(hours=24)

#: ``(function name, qualifier)`` as in :data:`impuls.functions.base.ChangeListener`
Apply = Callable[[str, "str | None"], None]


class ChangeFeed:
    """Publishes this node's changes and applies the other nodes' (see the module doc).

    ``apply`` is called on the reader thread.  :meth:`start` is called once (it records the
    current revision: changes before it concern no cache of a node that has just started);
    :meth:`close` stops the reader and is idempotent.  ``listen=False`` reads by polling alone
    (what a node whose notifications are lost does).
    """

    def __init__(self, db: Engine, node: str, apply: Apply, poll_seconds: float = POLL_SECONDS,
                 listen: bool = True) -> None:
        self.db = db
        self.node = node
        self.apply = apply
        self.poll_seconds = poll_seconds
        self.seen = 0
        #: changes of other nodes applied here since start
        self.applied = 0
        self._caught_up_at = time.monotonic()
        self._unsent: list[tuple[str, str | None]] = []
        self._unsent_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._postgres = db.dialect.name == "postgresql"
        self._listen_for_notifications = listen and self._postgres

    # --- publishing ----------------------------------------------------------------------

    def publish(self, name: str, qualifier: str | None) -> None:
        """Record a change committed on this node; if the database cannot take it now, the
        reader thread writes it later (see the module doc).  Never raises."""
        with self._unsent_lock:
            self._unsent.append((name, qualifier))
        try:
            self.send_unsent()
        except Exception as exc:
            log.warning("the change of %s (%s) could not be published yet: %s", name, qualifier, exc)

    def send_unsent(self) -> None:
        """Write the changes not written yet, oldest first (raises what the database raises)."""
        with self._unsent_lock:
            while self._unsent:
                self._insert(*self._unsent[0])
                self._unsent.pop(0)

    def _insert(self, name: str, qualifier: str | None) -> None:
        with self.db.begin() as conn:
            if self._postgres:
                conn.execute(text(f"LOCK TABLE {changes.name} IN EXCLUSIVE MODE"))
            conn.execute(insert(changes).values(function_name=name, qualifier=qualifier, node=self.node,
                                                created_at=datetime.now(UTC)))
            if self._postgres:
                conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})

    # --- reading -------------------------------------------------------------------------

    def start(self) -> None:
        with self.db.connect() as conn:
            self.seen = conn.execute(select(func.coalesce(func.max(changes.c.id), 0))).scalar_one()
        self._caught_up_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="impuls-change-feed", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def catch_up(self) -> int:
        """Apply the other nodes' changes after the last one seen; how many were applied."""
        if time.monotonic() - self._caught_up_at > RETENTION.total_seconds() - 60:
            self._forget_everything()
        with self.db.connect() as conn:
            rows = conn.execute(select(changes.c.id, changes.c.function_name, changes.c.qualifier,
                                       changes.c.node).where(changes.c.id > self.seen)
                                .order_by(changes.c.id)).all()
        applied = 0
        for row in rows:
            self.seen = row.id
            if row.node != self.node:
                self.apply(row.function_name, row.qualifier)
                applied += 1
        self.applied += applied
        self._caught_up_at = time.monotonic()
        return applied

    def prune(self) -> int:
        """Remove the rows older than :data:`RETENTION`; how many."""
        with self.db.begin() as conn:
            return conn.execute(delete(changes).where(
                changes.c.created_at < datetime.now(UTC) - RETENTION)).rowcount

    def _forget_everything(self) -> None:
        log.error("the change feed was not read for %s: forgetting every function's cached state", RETENTION)
        with self.db.connect() as conn:
            names = list(conn.execute(select(functions.c.name)).scalars())
        for name in names:
            self.apply(name, None)

    def _run(self) -> None:
        listener: psycopg.Connection[tuple[object, ...]] | None = None
        while not self._stop.is_set():
            try:
                if listener is None and self._listen_for_notifications:
                    listener = self._listen()
                if listener is not None:
                    for _ in listener.notifies(timeout=self.poll_seconds, stop_after=1):
                        pass
                else:
                    self._stop.wait(self.poll_seconds)
                self.send_unsent()
                self.catch_up()
            except Exception as exc:  # the database away: serve what is cached, try again
                log.warning("the change feed cannot read the database (%s); retrying", exc)
                if listener is not None:
                    listener.close()
                    listener = None
                self._stop.wait(self.poll_seconds)
        if listener is not None:
            listener.close()

    def _listen(self) -> psycopg.Connection[tuple[object, ...]]:
        url = self.db.url.set(drivername="postgresql").render_as_string(hide_password=False)
        conn = psycopg.connect(url, autocommit=True, **PG_CONNECT_ARGS)  # type: ignore[arg-type]
        conn.execute(f"LISTEN {CHANNEL}")
        return conn
