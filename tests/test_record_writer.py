"""The record writer process (engine/record_writer.py) on a real SQLite file and a real server.

The recorder's own promises (order, bounded buffer, one try per flush, a batch failing
midway) are tested with a writer thread in tests/unit/test_records.py; here the batches
cross to the writer process: every field arrives as it was, a refused record fails alone,
the process killed in the middle of a write loses and repeats nothing (the next write
starts another), and a server's writer has no secret on its command line and ends with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from impuls.engine.record_writer import RecordWriterProcess
from impuls.engine.records import InvocationRecorder
from impuls.store.db import open_engine
from tests.helpers import Server, live_pids, sandbox_unavailable
from tests.unit.test_records import DEADLINE, Lock, ids, in_table, promptly, record, until

WRITER = b"impuls.engine.record_writer"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "impuls.db"


@pytest.fixture
def db(path: Path) -> Iterator[Engine]:
    engine = open_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


def recorder_for(path: Path, db: Engine) -> tuple[InvocationRecorder, RecordWriterProcess]:
    writer = RecordWriterProcess(f"sqlite:///{path}")
    return InvocationRecorder(db, timedelta(days=1), writer=writer), writer


def test_records_cross_to_the_writer_process_unchanged(path: Path, db: Engine) -> None:
    sent = [record(0), record(1, outcome="error", error_type="ValueError", cold_start=True,
                              logs="é\nline 2\n" * 100, logs_truncated=True, note="a note")]

    async def main() -> None:
        recorder, writer = recorder_for(path, db)
        for one in sent:
            recorder.add(one)
        assert await promptly(recorder.flush())
        assert writer.pid is not None and writer.pid != os.getpid()
        stored, total = recorder.query("fn", 10, 0)
        assert total == 2 and list(reversed(stored)) == sent  # every field, the time to the µs
        pid = writer.pid
        await recorder.close()
        assert writer.pid is None and not Path(f"/proc/{pid}").exists()  # ended and reaped

    asyncio.run(main())


def test_a_record_the_database_refuses_fails_alone(path: Path, db: Engine,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "impuls.records")

    async def main() -> None:
        recorder, _ = recorder_for(path, db)
        recorder.add(record(0))
        recorder.add(record(1, function_name=None))  # NOT NULL
        recorder.add(record(2))
        assert await promptly(recorder.flush())
        assert in_table(db) == ids(0, 2) and recorder.rejected == 1 and recorder.pending == 0
        await recorder.close()

    asyncio.run(main())
    assert "refused invocation record req-0001" in caplog.text


def test_a_writer_killed_in_the_middle_of_a_write_loses_and_repeats_nothing(path: Path, db: Engine) -> None:
    lock = Lock(path)

    async def main() -> None:
        recorder, writer = recorder_for(path, db)
        recorder.add(record(0))
        assert await promptly(recorder.flush())
        first = writer.pid
        assert first is not None
        lock.take()  # the writer's next insert waits for the lock (its busy timeout is 10 s)
        for n in range(1, 6):
            recorder.add(record(n))
        flush = asyncio.create_task(recorder.flush())
        await until(lambda: _waiting_for_the_lock(first), "writing")
        os.kill(first, signal.SIGKILL)
        assert await promptly(flush) is False
        assert recorder.pending == 5 and recorder.failed_attempts == 1
        lock.release()
        recorder.add(record(6))
        assert await promptly(recorder.flush())
        assert writer.pid not in (None, first) and writer.started == 2
        assert in_table(db) == ids(*range(7)) and recorder.pending == 0
        await recorder.close()

    try:
        asyncio.run(main())
    finally:
        lock.conn.rollback()
        lock.conn.close()


def _waiting_for_the_lock(pid: int) -> bool:
    """The process is in SQLite's busy handler: asleep in a system call, not reading stdin."""
    try:
        syscall = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return False
    return syscall in {"35", "230"}  # nanosleep, clock_nanosleep (x86-64)


@pytest.mark.parametrize("sandbox", ["process", "namespace"])
def test_a_servers_writer_keeps_the_store_url_off_its_command_line_and_ends_with_it(
        sandbox: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    why = sandbox_unavailable(sandbox, request)
    if why:
        pytest.skip(why)
    server = Server(tmp_path / "data", args=["--sandbox", sandbox]).start()
    try:
        name = server.deploy(runtime="python3.11", handler="handler.handler",
                             code="def handler(event, context):\n    return event\n")["name"]
        for n in range(3):
            assert server.invoke(name, {"n": n}).status_code == 200
        r = server.request("GET", f"/api/v1/functions/{name}/invocations")
        assert r.status_code == 200 and r.json()["total"] == 3, r.text
        assert server.proc is not None
        writers = _writers_of(server.proc.pid)
        assert len(writers) == 1
        cmdline = Path(f"/proc/{writers[0]}/cmdline").read_bytes()
        assert b"sqlite" not in cmdline and str(tmp_path).encode() not in cmdline
        server.kill()
        deadline = time.monotonic() + DEADLINE
        while Path(f"/proc/{writers[0]}").exists() and _state(writers[0]) != "Z":
            assert time.monotonic() < deadline, "the writer outlived its server"
            time.sleep(0.05)
    finally:
        server.stop()


def _writers_of(server_pid: int) -> list[int]:
    return [pid for pid in live_pids(lambda args: WRITER in args) if _parent(pid) == server_pid]


def _parent(pid: int) -> int:
    return int(_stat(pid)[1])


def _state(pid: int) -> str:
    return _stat(pid)[0]


def _stat(pid: int) -> list[Any]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return ["X", "0"]
