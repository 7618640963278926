"""Invocation records (written in batches, off the hot path) and live log fan-out."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select

from impuls.store.schema import invocations

log = logging.getLogger("impuls.records")
#: sees each record as it is added (on the event loop, on the invocation's path: keep it cheap)
RecordListener = Callable[["InvocationRecord"], None]
FLUSH_INTERVAL = 0.25
PRUNE_INTERVAL = 600.0


@dataclass(frozen=True)
class InvocationRecord:
    request_id: str
    function_name: str
    function_id: str
    started_at: datetime
    duration_ms: float
    outcome: str
    error_type: str | None
    cold_start: bool
    sandbox: str
    logs: str
    logs_truncated: bool
    note: str = ""

    def to_api(self) -> dict[str, Any]:
        out = asdict(self)
        out["started_at"] = self.started_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return out


class InvocationRecorder:
    """Queues records in memory and inserts them in batches from a worker thread.

    ``add`` never blocks the event loop; ``flush`` writes what is queued (the
    read endpoints call it so a record is visible right after its call).
    Records older than ``retention`` are pruned periodically.  ``listen`` adds a callback
    that sees each record as it is added (the metrics count invocations so).
    """

    def __init__(self, db: Engine, retention: timedelta) -> None:
        self.db = db
        self.retention = retention
        self._pending: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._listeners: list[RecordListener] = []

    def listen(self, listener: RecordListener) -> None:
        self._listeners.append(listener)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def add(self, record: InvocationRecord) -> None:
        self._pending.append(dict(vars(record)))  # a shallow copy: asdict deep-copies
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:  # a listener's fault never fails the call that was recorded
                log.exception("an invocation record listener failed")

    async def flush(self) -> None:
        async with self._lock:
            batch, self._pending = self._pending, []
            if batch:
                await asyncio.to_thread(self._insert, batch)

    def _insert(self, batch: list[dict[str, Any]]) -> None:
        with self.db.begin() as conn:
            conn.execute(insert(invocations), batch)

    def prune(self) -> int:
        cutoff = datetime.now(UTC) - self.retention
        with self.db.begin() as conn:
            return conn.execute(delete(invocations).where(invocations.c.started_at < cutoff)).rowcount

    async def _run(self) -> None:
        prune_every = min(PRUNE_INTERVAL, self.retention.total_seconds() / 4)
        since_prune = prune_every
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush()
                since_prune += FLUSH_INTERVAL
                if since_prune >= prune_every:
                    since_prune = 0
                    await asyncio.to_thread(self.prune)
            except Exception:
                log.exception("writing invocation records failed; will retry")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self.flush()

    def query(self, name: str, limit: int, offset: int) -> tuple[list[InvocationRecord], int]:
        """Records of ``name``, newest first, and their total count."""
        with self.db.connect() as conn:
            rows = conn.execute(
                select(invocations).where(invocations.c.function_name == name)
                .order_by(invocations.c.started_at.desc()).limit(limit).offset(offset)
            ).all()
            total = conn.execute(
                select(func.count()).select_from(invocations)
                .where(invocations.c.function_name == name)
            ).scalar_one()
        records = []
        for row in rows:
            m = dict(row._mapping)
            del m["id"]
            ts = m["started_at"]
            m["started_at"] = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
            records.append(InvocationRecord(**m))
        return records, int(total)


class LogHub:
    """Fans function output out to live followers (``logs?follow=true``)."""

    QUEUE_LIMIT = 1000

    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)

    def wants(self, name: str) -> bool:
        return bool(self._subscribers.get(name))

    def publish(self, name: str, event: dict[str, Any]) -> None:
        for queue in self._subscribers.get(name, ()):
            if queue.qsize() < self.QUEUE_LIMIT:  # a slow follower loses lines, not memory
                queue.put_nowait(event)

    def subscribe(self, name: str) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers[name].add(queue)
        return queue

    def unsubscribe(self, name: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        subs = self._subscribers.get(name)
        if subs is not None:
            subs.discard(queue)
            if not subs:
                del self._subscribers[name]
