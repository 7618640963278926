"""Invocation records (written in batches, off the hot path) and live log fan-out."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, delete, func, insert, select
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError, StatementError

from impuls.store.schema import invocations

log = logging.getLogger("impuls.records")
#: a record as it is queued and sent to the writer: the fields in ``ROW_FIELDS`` order,
#: ``started_at`` as seconds since the epoch (cheap to copy and to pickle)
Row = tuple[Any, ...]
#: what the database refused of a batch: (request id, function name, why)
Refused = list[tuple[str, str, str]]
#: sees each record as it is added (on the event loop, on the invocation's path: keep it cheap)
RecordListener = Callable[["InvocationRecord"], None]
#: seconds between two writes of the queue: short, so that the record writer's bursts of
#: work are short too (a burst competes with the calls for this host's cores: at
#: concurrency 1, 0.25 s between writes made the p99 latency 2.2-3.1 ms, 0.05 s 1.6-1.8 ms)
FLUSH_INTERVAL = 0.05
#: after a failed write the writer waits RETRY_FIRST seconds, doubling up to RETRY_MAX
RETRY_FIRST = 0.25
RETRY_MAX = 5.0
PRUNE_INTERVAL = 600.0
#: a failed prune is tried again after this long (or the prune interval, if shorter)
PRUNE_RETRY = 60.0
#: records kept in memory while the database cannot take them; beyond, the oldest are dropped
MAX_PENDING = 100_000
#: records per INSERT transaction
BATCH_SIZE = 1000
#: seconds between two warnings about the same trouble (failing writes, dropped records)
REPORT_EVERY = 60.0


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


ROW_FIELDS = tuple(field.name for field in fields(InvocationRecord))
REQUEST_ID, FUNCTION_NAME, STARTED_AT = (ROW_FIELDS.index(name) for name in
                                        ("request_id", "function_name", "started_at"))


def new_request_id() -> str:
    """A new request id: a UUID of RFC 9562's version 7 (the time in milliseconds, then 74
    random bits).  Ids made later sort later, so each record's entry in the request-id index
    goes at the index's end.  With random (version 4) ids every record landed on a page
    anywhere in the index: the record writer's CPU per record and the bytes SQLite wrote per
    record grew with the table (12.6 → 18.1 µs and 3.2 → 6.9 KB within 20 s of concurrency 32)."""
    n = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    n = n & ~(0xF << 76) | 0x7 << 76  # the version
    n = n & ~(0x3 << 62) | 0x2 << 62  # the variant (RFC 9562)
    return str(uuid.UUID(int=n))


def _row(record: InvocationRecord) -> Row:
    values = list(vars(record).values())  # in field order
    values[STARTED_AT] = record.started_at.timestamp()
    return tuple(values)


class Writer(Protocol):
    """Writes a batch in one transaction (``insert_rows``' contract), one batch at a time."""

    async def __call__(self, batch: list[Row], unsure: bool) -> Refused: ...

    async def close(self) -> None: ...


class ThreadWriter:
    """Writes batches in a worker thread of this process, on ``db``."""

    def __init__(self, db: Engine) -> None:
        self.db = db

    async def __call__(self, batch: list[Row], unsure: bool) -> Refused:
        return await asyncio.to_thread(insert_rows, self.db, batch, unsure)

    async def close(self) -> None:
        pass


class InvocationRecorder:
    """Queues records in memory and inserts them in batches through a writer.

    The writer (``writer``) runs ``insert_rows`` for a batch: in the server that is the
    record writer process (:mod:`impuls.engine.record_writer`), so that the database
    driver's work never holds the event loop's GIL; without one, a worker thread
    (``ThreadWriter``) on ``db``.  ``close`` closes the writer.

    The contract:

    - ``add`` is cheap and never blocks, fails or waits for the database: it appends the
      record to an in-memory queue and calls the listeners (``listen``: each sees every
      record as it is added, on the event loop; the metrics count invocations so).
    - A background task (``start``) writes the queue every ``FLUSH_INTERVAL`` seconds, in
      the order the records were added, at most ``batch_size`` records per transaction.
      A transaction either commits its whole batch or nothing (a failed executemany is
      rolled back), and a record leaves the queue only once its transaction committed.
    - While the database cannot take them (SQLite locked beyond its busy timeout,
      PostgreSQL stopped or unreachable, a full disk), the records stay queued and the
      writer tries again after ``RETRY_FIRST`` seconds, doubling up to ``RETRY_MAX``; once
      the database is back they are written in order, each exactly once: a failed batch
      goes back to the head of the queue as it was, and the next write first looks up
      which of its records are in the table already (a commit can fail after the server
      applied it).  A write whose caller (``flush``) is cancelled runs on in the writer
      and is settled when it ends; no other write starts before.
    - The queue is bounded: at most ``max_pending`` records (``MAX_PENDING``, 100,000, by
      default) wait for the database.  Beyond, ``add`` drops the oldest (those of a batch
      being written are kept until its outcome is known), counts them in ``dropped`` and
      the writer logs how many it dropped (a warning at most every ``REPORT_EVERY`` s).
    - A record the database refuses (an IntegrityError or DataError: a value too long for
      PostgreSQL, a NUL in a text) fails alone: its batch is written a record per
      transaction, the refused one is logged, counted in ``rejected`` and not retried.
    - ``flush`` writes what was queued when it was called, so that the read endpoints see a
      record right after its call.  It tries once: if the database fails (or failed while
      ``flush`` waited for the writer's attempt) it returns False at once and the records
      stay queued for the writer; it never raises for a database failure.  On SQLite one
      try waits at most the busy timeout.  True: everything queued before is in the table.
    - Records older than ``retention`` are pruned every ``PRUNE_INTERVAL`` seconds (or a
      quarter of the retention) while writes succeed; a failed prune is logged and tried
      again after ``PRUNE_RETRY`` seconds.
    - ``close`` stops the writer and flushes once; records it cannot write are logged as
      lost.  ``pending`` counts the records not yet written, ``failed_attempts`` the writes
      that failed since the start.
    """

    def __init__(self, db: Engine, retention: timedelta, *, writer: Writer | None = None,
                 max_pending: int = MAX_PENDING, batch_size: int = BATCH_SIZE) -> None:
        if max_pending < 1 or batch_size < 1:
            raise ValueError("max_pending and batch_size must be positive")
        self.db = db
        self._writer = writer or ThreadWriter(db)
        self.retention = retention
        self.max_pending = max_pending
        #: no larger than the bound, so that ``add`` can always drop a record not being written
        self.batch_size = min(batch_size, max_pending)
        #: records dropped because more than ``max_pending`` were waiting
        self.dropped = 0
        #: records the database refused (not retried)
        self.rejected = 0
        #: writes that failed and were (or will be) tried again
        self.failed_attempts = 0
        #: records not yet taken by a write, oldest first
        self._pending: deque[Row] = deque()
        #: the records of the write in progress (they leave ``_pending`` while it runs)
        self._inflight = 0
        #: the write in progress: its future (a task awaiting the writer) and its batch
        self._writing: tuple[asyncio.Future[Refused], list[Row]] | None = None
        #: the head of the queue may already be in the table (its last write failed)
        self._unsure = False
        self._failures = 0  # consecutive failed writes
        self._failing_since: float | None = None
        self._last_failure_report = 0.0
        self._reported_dropped = 0
        self._last_drop_report = -REPORT_EVERY
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._listeners: list[RecordListener] = []

    @property
    def pending(self) -> int:
        """Records added and not yet written (nor dropped or refused)."""
        return len(self._pending) + self._inflight

    def listen(self, listener: RecordListener) -> None:
        self._listeners.append(listener)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def add(self, record: InvocationRecord) -> None:
        pending = self._pending
        pending.append(_row(record))
        if len(pending) + self._inflight > self.max_pending:
            pending.popleft()  # never empty: a batch is at most max_pending and one was just added
            self.dropped += 1
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:  # a listener's fault never fails the call that was recorded
                log.exception("an invocation record listener failed")

    async def flush(self) -> bool:
        """Write the records queued so far: True once they are in the table, False when the
        database failed (they stay queued).  One try, never a wait for the database's return."""
        failed_before = self.failed_attempts
        async with self._lock:
            await self._finish_write()
            if self.failed_attempts != failed_before:
                return False  # the database failed while this call waited: no second wait
            return await self._write(len(self._pending))

    async def _finish_write(self) -> None:
        """Wait for a write whose caller was cancelled (its thread runs on) and settle it."""
        while self._writing is not None:
            future = self._writing[0]
            if not future.done():
                await asyncio.wait([future])
            self._settle(future)

    async def _write(self, count: int) -> bool:
        """With the lock held: write ``count`` records from the head of the queue, a batch per
        transaction; False at the first failure (the batch is back at the head)."""
        written = 0
        while written < count and self._pending:
            size = min(self.batch_size, len(self._pending))
            batch = list(islice(self._pending, size))
            future = asyncio.ensure_future(self._writer(batch, self._unsure))
            for _ in range(size):  # out of the queue once the write is under way (no await between)
                self._pending.popleft()
            self._inflight = size
            self._writing = (future, batch)
            # settles the write even if this caller is cancelled while the thread runs
            future.add_done_callback(self._settle)
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                raise
            except Exception:
                pass
            if not self._settle(future):
                return False
            written += size
        return True

    def _settle(self, future: asyncio.Future[Refused]) -> bool:
        """Account for a finished write (once, whoever sees it first); True if it committed."""
        if self._writing is None or self._writing[0] is not future:
            return not future.cancelled() and future.exception() is None
        batch = self._writing[1]
        self._writing = None
        self._inflight = 0
        error = (asyncio.CancelledError() if future.cancelled() else future.exception())
        if error is None:
            self._unsure = False
            for request_id, function_name, why in future.result():
                self.rejected += 1
                log.error("the database refused invocation record %s of %s (%s); it is dropped",
                          request_id, function_name, why)
            self._succeeded()
            return True
        self._pending.extendleft(reversed(batch))  # exactly this batch, again first
        self._unsure = True  # a failed commit may have reached the server after all
        self._failed(error)
        return False

    def _succeeded(self) -> None:
        if self._failing_since is not None:
            log.warning("invocation records are written again, after %d failed attempts in %.0f s",
                        self._failures, time.monotonic() - self._failing_since)
            self._failing_since = None
        self._failures = 0
        self._report_drops()

    def _failed(self, error: BaseException) -> None:
        self.failed_attempts += 1
        self._failures += 1
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = self._last_failure_report = now
            log.warning("cannot write invocation records (%s); %d kept in memory (at most %d), "
                        "trying again", describe_error(error), self.pending, self.max_pending,
                        exc_info=None if isinstance(error, SQLAlchemyError | RecordWriteFailed) else error)
        elif now - self._last_failure_report >= REPORT_EVERY:
            self._last_failure_report = now
            log.warning("still cannot write invocation records after %d attempts (%s); %d kept "
                        "in memory, %d dropped since the start", self._failures, describe_error(error),
                        self.pending, self.dropped)
        self._report_drops()

    def _report_drops(self) -> None:
        now = time.monotonic()
        if self.dropped > self._reported_dropped and now - self._last_drop_report >= REPORT_EVERY:
            log.warning("dropped the %d oldest invocation records not yet written: more than %d "
                        "were waiting for the database (%d dropped since the start)",
                        self.dropped - self._reported_dropped, self.max_pending, self.dropped)
            self._reported_dropped = self.dropped
            self._last_drop_report = now

    def prune(self) -> int:
        cutoff = datetime.now(UTC) - self.retention
        with self.db.begin() as conn:
            return conn.execute(delete(invocations).where(invocations.c.started_at < cutoff)).rowcount

    async def _run(self) -> None:
        prune_every = min(PRUNE_INTERVAL, self.retention.total_seconds() / 4)
        next_prune = time.monotonic()
        delay = FLUSH_INTERVAL
        while True:
            await asyncio.sleep(delay)
            try:
                async with self._lock:
                    await self._finish_write()
                    ok = await self._write(len(self._pending))
            except Exception:  # a bug, not the database (that is settled above): never stop writing
                log.exception("the invocation record writer failed; trying again")
                ok = False
            if not ok:
                delay = min(RETRY_FIRST * 2 ** max(self._failures - 1, 0), RETRY_MAX)
                continue
            delay = FLUSH_INTERVAL
            if time.monotonic() >= next_prune:
                try:
                    await asyncio.to_thread(self.prune)
                except Exception as exc:
                    retry = min(prune_every, PRUNE_RETRY)
                    log.warning("pruning invocation records failed (%s); trying again in %.0f s",
                                describe_error(exc), retry)
                    next_prune = time.monotonic() + retry
                else:
                    next_prune = time.monotonic() + prune_every

    async def close(self) -> None:
        """Stop the writer and write what is queued (once); what cannot be written is lost."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if not await self.flush():
            log.error("%d invocation records could not be written before the shutdown and are lost",
                      self.pending)
        await self._writer.close()

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


class RecordWriteFailed(Exception):
    """The record writer process could not write a batch: the database failed (the message
    says how) or the process ended.  Nothing of the batch is committed, or it is unsure."""


def insert_rows(db: Engine, batch: list[Row], unsure: bool) -> Refused:
    """Insert ``batch`` in one transaction (blocking); the records the database refused (then
    written a record per transaction, so that a refused one fails alone).  ``unsure``: some
    may be in the table already (an earlier try failed at its commit); those are left out.
    Raises when the database cannot take them (nothing of the failed transaction is committed)."""
    try:
        with db.begin() as conn:
            todo = _not_in_table(conn, batch) if unsure else batch
            if todo:
                _insert(conn, todo)
        return []
    except Exception as exc:
        if not _refused(exc):
            raise
    refused: Refused = []
    for row in batch:  # one record at a time
        try:
            with db.begin() as conn:
                if not unsure or _not_in_table(conn, [row]):
                    _insert(conn, [row])
        except Exception as exc:
            if not _refused(exc):
                raise  # the database went away: the whole batch again (checked, so no duplicate)
            refused.append((row[REQUEST_ID], row[FUNCTION_NAME], describe_error(exc)))
    return refused


#: on SQLite the rows go to the driver's executemany as they are (SQLAlchemy's processing of
#: each value was half the writer's CPU); ``started_at`` as SQLAlchemy stores it there
SQLITE_INSERT = (f"INSERT INTO invocations ({', '.join(ROW_FIELDS)}) "
                 f"VALUES ({', '.join('?' * len(ROW_FIELDS))})")


def _insert(conn: Connection, rows: list[Row]) -> None:
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(SQLITE_INSERT, [
            (*row[:STARTED_AT], f"{_started(row):%Y-%m-%d %H:%M:%S.%f}", *row[STARTED_AT + 1:])
            for row in rows])
    else:
        conn.execute(insert(invocations), [
            {**dict(zip(ROW_FIELDS, row, strict=True)), "started_at": _started(row)} for row in rows])


def _started(row: Row) -> datetime:
    return datetime.fromtimestamp(row[STARTED_AT], UTC)


def _refused(exc: BaseException) -> bool:
    """The database refuses these records (retrying cannot help), as opposed to being unable
    to take any now (locked, unreachable, full: retrying can)."""
    if isinstance(exc, DBAPIError):
        return isinstance(exc, IntegrityError | DataError) and not exc.connection_invalidated
    return isinstance(exc, StatementError)  # a parameter SQLAlchemy could not convert


def describe_error(exc: BaseException) -> str:
    """The error's first line, without SQLAlchemy's statement and parameters (a record's logs)."""
    if isinstance(exc, RecordWriteFailed):
        return str(exc)  # brief already
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    text = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text[0][:300] if text else ''}"


def _moment(ts: datetime) -> datetime:
    """``ts`` as the table gives it back, naive UTC (SQLite keeps no zone)."""
    return ts.astimezone(UTC).replace(tzinfo=None) if ts.tzinfo is not None else ts


def _not_in_table(conn: Connection, rows: list[Row]) -> list[Row]:
    """The ``rows`` not already in the table (same request id and start), in order."""
    found: set[tuple[str, datetime]] = set()
    ids = sorted({row[REQUEST_ID] for row in rows})
    for i in range(0, len(ids), 500):
        query = select(invocations.c.request_id, invocations.c.started_at).where(
            invocations.c.request_id.in_(ids[i:i + 500]))
        found.update((rid, _moment(ts)) for rid, ts in conn.execute(query))
    return [row for row in rows if (row[REQUEST_ID], _moment(_started(row))) not in found]


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
