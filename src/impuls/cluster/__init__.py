"""Several nodes on one store: this node's heartbeat and the change feed (no cluster protocol
of its own: PostgreSQL rows, ``LISTEN``/``NOTIFY`` and polling; see docs/scale-out.md).

:class:`Member` is what a server runs: a heartbeat every few seconds (:mod:`.nodes`), and on
a shared store (PostgreSQL) the change feed (:mod:`.changes`) and a periodic collection of
code blobs no node references any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from sqlalchemy import Engine

from impuls.cluster.changes import ChangeFeed
from impuls.cluster.nodes import NodeBeat, NodeTable
from impuls.functions.registry import FunctionRegistry

log = logging.getLogger("impuls.cluster")

#: how often a node of a cluster removes the code blobs nothing references (a crash between a
#: blob's put and its commit, or a blob kept by the shared store's grace period)
COLLECT_SECONDS = 3600.0


class Member:
    """This node: :meth:`start` writes a first heartbeat and starts the feed and the beat loop
    (``beat()`` says what the node is doing at each beat); :meth:`close` marks the node stopped.
    ``shared``: other nodes may use the store (PostgreSQL): changes are published and read."""

    def __init__(self, db: Engine, registry: FunctionRegistry, node: str, beat: Callable[[], NodeBeat],
                 shared: bool, heartbeat_seconds: float) -> None:
        self.node = node
        self.table = NodeTable(db, heartbeat_seconds)
        self.registry = registry
        self._beat = beat
        self.feed = ChangeFeed(db, node, registry.announce) if shared else None
        if self.feed is not None:
            registry.publisher = self.feed.publish
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self.table.beat, self._beat())
        if self.feed is not None:
            await asyncio.to_thread(self.feed.start)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.feed is not None:
            await asyncio.to_thread(self.feed.close)
        try:
            await asyncio.to_thread(self.table.stopped, self.node)
        except Exception as exc:  # the database away: the others will see the beats stop
            log.warning("could not mark this node stopped: %s", exc)

    def stats(self) -> dict[str, int]:
        return {"changes_applied": self.feed.applied if self.feed is not None else 0}

    async def _loop(self) -> None:
        collected = time.monotonic()
        while True:
            await asyncio.sleep(self.table.heartbeat_seconds)
            try:
                await asyncio.to_thread(self.table.beat, self._beat())
                if self.feed is not None and time.monotonic() - collected > COLLECT_SECONDS:
                    collected = time.monotonic()
                    await asyncio.to_thread(self._housekeeping)
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)

    def _housekeeping(self) -> None:
        assert self.feed is not None
        self.feed.prune()
        self.table.prune()
        removed = self.registry.collect_garbage()
        if removed:
            log.info("removed %d unreferenced code blobs", removed)
