"""Group commit: the writes of many deliveries and accepts share one transaction.

A caller fills a :class:`Batch` with statements and their parameters and submits it.
Batches that arrive while a transaction commits go into the next one, and within a
transaction every statement runs once, as an executemany over all the batches' parameters:
a burst of callers pays for a few durable commits (an fsync each, on SQLite with
``synchronous=FULL``) and a few statement executions instead of one of each per caller.
When a shared transaction fails, each batch is tried again in a transaction of its own, so
one bad batch fails alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Engine, Executable, Table, insert

log = logging.getLogger("impuls.events")


class Batch:
    """Statements to run in one transaction, each with the parameter sets to run it with."""

    def __init__(self) -> None:
        self.steps: dict[Executable, list[dict[str, Any]]] = {}

    def execute(self, statement: Executable, params: dict[str, Any]) -> None:
        self.steps.setdefault(statement, []).append(params)

    def insert(self, table: Table, row: dict[str, Any]) -> None:
        self.execute(_insert_of(table), row)

    def merge(self, others: Iterable[Batch]) -> None:
        for other in others:
            for statement, params in other.steps.items():
                self.steps.setdefault(statement, []).extend(params)


_INSERTS: dict[Table, Executable] = {}


def _insert_of(table: Table) -> Executable:
    """One INSERT statement per table, so that rows of one table share an executemany."""
    statement = _INSERTS.get(table)
    if statement is None:
        statement = _INSERTS[table] = insert(table)
    return statement


class Writer:
    def __init__(self, db: Engine) -> None:
        self.db = db
        self._waiting: list[tuple[Batch, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Commit what is waiting, then stop."""
        while self._waiting:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def submit(self, batch: Batch) -> None:
        """Run ``batch``; returns once the transaction that holds it is committed."""
        if not batch.steps:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((batch, done))
        self._wake.set()
        await done

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            waiting, self._waiting = self._waiting, []
            if not waiting:
                continue
            errors = await asyncio.to_thread(self._commit, [batch for batch, _ in waiting])
            for (_, done), error in zip(waiting, errors, strict=True):
                if done.done():
                    continue
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

    def _commit(self, batches: list[Batch]) -> list[Exception | None]:
        shared = Batch()
        shared.merge(batches)
        try:
            self._run_batch(shared)
            return [None] * len(batches)
        except Exception as exc:
            if len(batches) == 1:
                return [exc]
        errors: list[Exception | None] = []
        for batch in batches:  # a transaction each: the one that fails, fails alone
            try:
                self._run_batch(batch)
                errors.append(None)
            except Exception as exc:
                errors.append(exc)
        return errors

    def _run_batch(self, batch: Batch) -> None:
        with self.db.begin() as conn:
            for statement, params in batch.steps.items():
                conn.execute(statement, params)
