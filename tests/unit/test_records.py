"""The invocation record writer (engine/records.py) when the database fails, on a SQLite file.

Another connection holds the database locked (``BEGIN EXCLUSIVE``; the recorder's engine
waits only 50 ms for a lock), a SQL function called by a trigger fails or blocks a write in
the middle of its batch, a connection's commit fails after committing.  Every record added
must end up in the table exactly once and in order, the buffer must stay bounded, and
``flush`` must return rather than wait for the database.  Waits are polls with generous
deadlines; no test measures a duration.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Engine, create_engine, event, select, text

from impuls.engine import records
from impuls.engine.records import InvocationRecord, InvocationRecorder
from impuls.store.db import migrate, open_engine
from impuls.store.schema import invocations

T0 = datetime.now(UTC).replace(microsecond=0)  # recent: the writer prunes what is a day old
DEADLINE = 60.0  # seconds: a guard against hanging, not a bound on speed


def record(n: int, *, started_at: datetime | None = None, **fields: Any) -> InvocationRecord:
    values: dict[str, Any] = {
        "request_id": f"req-{n:04d}", "function_name": "fn", "function_id": "fid",
        "started_at": started_at or T0 + timedelta(milliseconds=n), "duration_ms": 1.5,
        "outcome": "success", "error_type": None, "cold_start": False, "sandbox": "process",
        "logs": f"call {n}\n", "logs_truncated": False}
    values.update(fields)
    return InvocationRecord(**values)


def ids(*numbers: int) -> list[str]:
    return [f"req-{n:04d}" for n in numbers]


def in_table(db: Engine) -> list[str]:
    """The request ids in the table, in insertion order."""
    with db.connect() as conn:
        return list(conn.execute(select(invocations.c.request_id).order_by(invocations.c.id)).scalars())


async def until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"still not {what} after {DEADLINE:.0f} s")
        await asyncio.sleep(0.02)


async def promptly(call: Awaitable[bool]) -> bool:
    """``call``'s result; fails the test instead of hanging."""
    return await asyncio.wait_for(call, DEADLINE)


class Lock:
    """A separate sqlite3 connection that holds the database's write lock while ``held``."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=DEADLINE)

    def take(self) -> None:
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self.conn.execute("COMMIT")


class Gate:
    """``impuls_test_gate(request_id)``, called by a trigger before each insert: fails for
    ``fail_on`` (an OperationalError, as a lock would), waits for ``opened`` on ``block_on``."""

    def __init__(self) -> None:
        self.fail_on: str | None = None
        self.block_on: str | None = None
        self.blocked = threading.Event()
        self.opened = threading.Event()

    def __call__(self, request_id: str) -> int:
        if request_id == self.block_on:
            self.blocked.set()
            self.opened.wait(DEADLINE)
        if request_id == self.fail_on:
            raise RuntimeError("the test says no")
        return 0


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer tries again after 10 ms, doubling up to 40 ms (not 0.25 s to 5 s)."""
    monkeypatch.setattr(records, "RETRY_FIRST", 0.01)
    monkeypatch.setattr(records, "RETRY_MAX", 0.04)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "impuls.db"


@pytest.fixture
def db(path: Path) -> Iterator[Engine]:
    engine = open_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def short_busy_timeout(dbapi_conn: Any, _record: Any) -> None:  # after the store's pragmas
        dbapi_conn.execute("PRAGMA busy_timeout=50")

    engine.dispose()  # the migration's connection waited 10 s
    yield engine
    engine.dispose()


@pytest.fixture
def lock(path: Path, db: Engine) -> Iterator[Lock]:
    held = Lock(path)
    yield held
    held.conn.rollback()
    held.conn.close()


@pytest.fixture
def gate(db: Engine) -> Gate:
    gate = Gate()

    @event.listens_for(db, "connect")
    def add_gate(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.create_function("impuls_test_gate", 1, gate)

    db.dispose()
    with db.begin() as conn:
        conn.execute(text("CREATE TRIGGER impuls_test_gate BEFORE INSERT ON invocations "
                          "BEGIN SELECT impuls_test_gate(NEW.request_id); END"))
    return gate


def test_records_added_while_the_database_is_locked_are_written_once_in_order_after(
        db: Engine, lock: Lock, quick_retries: None) -> None:
    async def main() -> None:
        recorder = InvocationRecorder(db, timedelta(days=1), batch_size=7)
        recorder.start()
        for n in range(5):
            recorder.add(record(n))
        await until(lambda: recorder.pending == 0, "written")
        lock.take()
        for wave in range(4):  # added while the writer fails and backs off
            for n in range(5 + wave * 10, 15 + wave * 10):
                recorder.add(record(n))
            failed = recorder.failed_attempts
            await until(lambda: recorder.failed_attempts > failed, "failing")  # noqa: B023
        assert in_table(db) == ids(*range(5))
        assert recorder.pending == 40 and recorder.dropped == 0
        lock.release()
        await until(lambda: recorder.pending == 0, "written after the lock")
        assert in_table(db) == ids(*range(45))
        assert await promptly(recorder.flush())
        await recorder.close()
        assert in_table(db) == ids(*range(45)) and recorder.rejected == 0

    asyncio.run(main())


def test_flush_while_locked_returns_false_and_keeps_the_records(db: Engine, lock: Lock) -> None:
    async def main() -> None:
        recorder = InvocationRecorder(db, timedelta(days=1))
        recorder.add(record(0))
        lock.take()
        recorder.add(record(1))
        assert await promptly(recorder.flush()) is False
        assert recorder.pending == 2 and in_table(db) == []
        assert await promptly(recorder.flush()) is False  # again: one try each, no hang
        lock.release()
        assert await promptly(recorder.flush()) is True
        assert in_table(db) == ids(0, 1) and recorder.pending == 0

    asyncio.run(main())


def test_a_flush_waiting_for_a_failing_write_does_not_try_again(db: Engine, lock: Lock,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    tries: list[int] = []
    insert = records.insert_rows

    def counting(db: Engine, batch: list[records.Row], unsure: bool) -> records.Refused:
        tries.append(len(batch))
        return insert(db, batch, unsure)

    monkeypatch.setattr(records, "insert_rows", counting)

    async def main() -> None:
        recorder = InvocationRecorder(db, timedelta(days=1))
        recorder.add(record(0))
        lock.take()
        first = asyncio.create_task(recorder.flush())
        await until(lambda: bool(tries), "writing")
        second = await promptly(recorder.flush())  # waits for the first try, which fails
        assert await first is False and second is False
        assert tries == [1] and recorder.failed_attempts == 1
        lock.release()
        assert await promptly(recorder.flush())
        assert in_table(db) == ids(0)

    asyncio.run(main())


def test_a_batch_failing_midway_is_rolled_back_whole_and_written_once(db: Engine, gate: Gate) -> None:
    async def main() -> None:
        recorder = InvocationRecorder(db, timedelta(days=1))
        for n in range(10):
            recorder.add(record(n))
        gate.fail_on = "req-0005"  # rows 0..4 are inserted in the transaction first
        assert await promptly(recorder.flush()) is False
        assert in_table(db) == [] and recorder.pending == 10 and recorder.rejected == 0
        gate.fail_on = None
        recorder.add(record(10))
        assert await promptly(recorder.flush())
        assert in_table(db) == ids(*range(11)) and recorder.pending == 0

    asyncio.run(main())


def test_the_buffer_keeps_the_newest_records_and_counts_the_dropped(db: Engine, lock: Lock,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "impuls.records")

    async def main() -> None:
        recorder = InvocationRecorder(db, timedelta(days=1), max_pending=10, batch_size=4)
        lock.take()
        for n in range(25):
            recorder.add(record(n))
        assert recorder.pending == 10 and recorder.dropped == 15
        assert await promptly(recorder.flush()) is False
        assert "dropped the 15 oldest invocation records" in caplog.text
        lock.release()
        assert await promptly(recorder.flush())
        assert in_table(db) == ids(*range(15, 25))
        assert recorder.pending == 0 and recorder.dropped == 15

    asyncio.run(main())


def test_records_being_written_are_not_dropped_the_oldest_others_are(db: Engine, gate: Gate) -> None:
    async def main() -> None:
        recorder = InvocationRecorder(db, timedelta(days=1), max_pending=6, batch_size=4)
        for n in range(4):
            recorder.add(record(n))
        gate.block_on = "req-0000"
        flush = asyncio.create_task(recorder.flush())
        await until(gate.blocked.is_set, "blocked")
        for n in range(4, 9):  # 4 in flight + at most 2 waiting: 4, 5, 6 go
            recorder.add(record(n))
        assert recorder.pending == 6 and recorder.dropped == 3
        gate.opened.set()
        assert await promptly(flush)
        assert await promptly(recorder.flush())
        assert in_table(db) == ids(0, 1, 2, 3, 7, 8)

    asyncio.run(main())


@pytest.mark.parametrize("outcome", ["commits", "fails"])
def test_a_write_whose_flush_was_cancelled_is_settled_once(db: Engine, gate: Gate, outcome: str) -> None:
    async def main() -> None:
        recorder = InvocationRecorder(db, timedelta(days=1), batch_size=3)
        for n in range(5):
            recorder.add(record(n))
        gate.block_on = "req-0001"
        if outcome == "fails":
            gate.fail_on = "req-0002"
        flush = asyncio.create_task(recorder.flush())
        await until(gate.blocked.is_set, "blocked")
        flush.cancel()  # the insert's thread runs on
        with pytest.raises(asyncio.CancelledError):
            await flush
        recorder.add(record(5))
        assert recorder.pending == 6
        second = asyncio.create_task(recorder.flush())
        await asyncio.sleep(0.1)
        assert not second.done()  # it waits for the write in progress, it does not start another
        gate.opened.set()
        if outcome == "fails":
            assert await promptly(second) is False  # the write it waited for failed
            assert in_table(db) == [] and recorder.pending == 6
            gate.fail_on = None
            assert await promptly(recorder.flush())
        else:
            assert await promptly(second)
        assert in_table(db) == ids(*range(6)) and recorder.pending == 0

    asyncio.run(main())


class FlakyCommit(sqlite3.Connection):
    """Commits, then says it failed (as a connection lost during COMMIT would) while armed."""

    armed = False

    def commit(self) -> None:
        super().commit()
        if FlakyCommit.armed:
            raise sqlite3.OperationalError("disk I/O error (after the commit)")


def test_a_batch_whose_commit_is_in_doubt_is_not_written_twice(path: Path) -> None:
    db = create_engine("sqlite://", creator=lambda: sqlite3.connect(path, factory=FlakyCommit,
                                                                    check_same_thread=False))
    migrate(db)

    async def main() -> None:
        recorder = InvocationRecorder(db, timedelta(days=1))
        for n in range(5):
            recorder.add(record(n))
        FlakyCommit.armed = True
        try:
            assert await promptly(recorder.flush()) is False
        finally:
            FlakyCommit.armed = False
        assert in_table(db) == ids(*range(5)) and recorder.pending == 5  # committed after all
        recorder.add(record(5))
        assert await promptly(recorder.flush())
        assert in_table(db) == ids(*range(6)) and recorder.pending == 0
        recorder.add(record(6))  # no check any more: a plain insert
        assert await promptly(recorder.flush())
        assert in_table(db) == ids(*range(7))

    try:
        asyncio.run(main())
    finally:
        db.dispose()


def test_a_record_the_database_refuses_fails_alone(db: Engine, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        recorder = InvocationRecorder(db, timedelta(days=1))
        for n in range(5):
            recorder.add(record(n, function_name=cast(str, None)) if n == 2 else record(n))
        assert await promptly(recorder.flush())
        assert in_table(db) == ids(0, 1, 3, 4)
        assert recorder.rejected == 1 and recorder.pending == 0
        assert "refused invocation record req-0002" in caplog.text

    asyncio.run(main())


def test_pruning_survives_a_failure(db: Engine, lock: Lock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "impuls.records")
    old = datetime.now(UTC) - timedelta(days=1)

    async def main() -> None:
        recorder = InvocationRecorder(db, timedelta(seconds=2))  # prunes every 0.5 s
        for n in range(3):
            recorder.add(record(n, started_at=old + timedelta(seconds=n)))
        assert await promptly(recorder.flush())
        lock.take()
        recorder.start()
        await until(lambda: "pruning invocation records failed" in caplog.text, "failing to prune")
        assert in_table(db) == ids(0, 1, 2)
        lock.release()
        await until(lambda: in_table(db) == [], "pruned")
        recorder.add(record(3, started_at=datetime.now(UTC)))
        await until(lambda: in_table(db) == ids(3), "written")  # the writer goes on
        await recorder.close()

    asyncio.run(main())


def test_close_with_the_database_locked_returns_and_says_what_is_lost(
        db: Engine, lock: Lock, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        recorder = InvocationRecorder(db, timedelta(days=1))
        recorder.start()
        lock.take()
        for n in range(3):
            recorder.add(record(n))
        await asyncio.wait_for(recorder.close(), DEADLINE)
        assert recorder.pending == 3
        assert "3 invocation records could not be written before the shutdown" in caplog.text

    asyncio.run(main())


def test_the_writer_logs_the_outage_once_and_the_recovery(db: Engine, lock: Lock, quick_retries: None,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "impuls.records")

    async def main() -> None:
        recorder = InvocationRecorder(db, timedelta(days=1))
        recorder.start()
        lock.take()
        recorder.add(record(0))
        await until(lambda: recorder.failed_attempts >= 3, "failing")
        lock.release()
        await until(lambda: recorder.pending == 0, "written")
        await recorder.close()
        messages = [r.getMessage() for r in caplog.records]
        assert sum("cannot write invocation records" in m for m in messages) == 1, messages
        assert any("invocation records are written again" in m for m in messages), messages

    asyncio.run(main())


def test_request_ids_are_unique_uuids_that_sort_by_time() -> None:
    """Version 7 UUIDs: unique, and one made in a later millisecond sorts after every id
    made before it (so the request-id index grows at its end)."""
    import time
    import uuid

    first = [records.new_request_id() for _ in range(20_000)]
    time.sleep(0.002)
    later = records.new_request_id()
    assert len(set(first)) == len(first)
    for rid in (first[0], later):
        parsed = uuid.UUID(rid)
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122 and str(parsed) == rid
    assert later > max(first)
    assert abs(int(later.replace("-", "")[:12], 16) - time.time() * 1000) < 60_000
