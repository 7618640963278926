"""The record writer process: inserts the invocation records' batches into the store.

Run by the server as ``python -m impuls.engine.record_writer``, so that the database
driver's work (SQLAlchemy's and SQLite's, a few microseconds per record) never holds the
GIL the server's event loop needs: in a worker thread it stalled calls in flight for
milliseconds at every flush.  The recorder (:class:`impuls.engine.records.InvocationRecorder`)
keeps the queue, the order, the retries and the accounting; this process only writes.

The wire is the process's stdin and stdout, frames of a 4-byte big-endian length and a
pickle (both ends are this package on one interpreter).  The first frame is the store's
URL (not an argument: it may hold a password, and arguments are visible to every user);
each further frame is ``(batch, unsure)``, answered by ``("ok", refused)`` or
``("failed", why)`` (``insert_rows``' contract).  At the end of stdin the process exits;
SIGINT and SIGTERM sent to the server's process group are ignored, so that the server's
last flush still has a writer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import struct
import sys
import traceback
from typing import IO, Any

from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError

from impuls.engine.records import RecordWriteFailed, Refused, Row, describe_error, insert_rows
from impuls.errors import ImpulsError

log = logging.getLogger("impuls.records")
FRAME = struct.Struct("!I")
#: seconds a stopping server waits for the process to end before killing it
EXIT_WAIT = 10.0


class RecordWriterProcess:
    """``await writer(batch, unsure)`` writes a batch through the record writer process.

    The process is started by the first write and again by the first write after it ended
    (it is killed, or its stdin is gone): a write it did not answer raises
    ``RecordWriteFailed``, and the recorder sends the batch again, checking which of its
    records are in the table already.  One write at a time; ``close`` ends the process.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        #: processes started so far (a restart after a crash counts)
        self.started = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def __call__(self, batch: list[Row], unsure: bool) -> Refused:
        async with self._lock:
            process = await self._running()
            assert process.stdin is not None and process.stdout is not None
            try:
                process.stdin.write(_frame((batch, unsure)))
                await process.stdin.drain()
                reply = pickle.loads(await _read_frame(process.stdout))
            except BaseException as exc:  # gone, or this write was abandoned mid-frame
                self._process = None
                await _end(process)
                if isinstance(exc, Exception):
                    raise RecordWriteFailed(f"the record writer process ended ({exc!r})") from exc
                raise
        kind, value = reply
        if kind != "ok":
            raise RecordWriteFailed(value)
        refused: Refused = value
        return refused

    async def _running(self) -> asyncio.subprocess.Process:
        if self._process is not None and self._process.returncode is None:
            return self._process
        if self._process is not None:
            log.warning("the record writer process ended (exit status %s); starting another",
                        self._process.returncode)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "impuls.engine.record_writer",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert process.stdin is not None
        process.stdin.write(_frame(self.url))
        self._process = process
        self.started += 1
        return process

    async def close(self) -> None:
        """End the process (after the write in progress, if any)."""
        async with self._lock:
            if self._process is not None:
                process, self._process = self._process, None
                await _end(process)


async def _end(process: asyncio.subprocess.Process) -> None:
    """Close the process's stdin and wait for its exit (kill it after ``EXIT_WAIT`` s)."""
    if process.stdin is not None and not process.stdin.is_closing():
        process.stdin.close()
    try:
        await asyncio.wait_for(asyncio.shield(process.wait()), EXIT_WAIT)
    except TimeoutError:
        process.kill()
        await process.wait()


def _frame(value: Any) -> bytes:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(data)) + data


async def _read_frame(stream: asyncio.StreamReader) -> bytes:
    (size,) = FRAME.unpack(await stream.readexactly(FRAME.size))
    return await stream.readexactly(size)


def _read_blocking(stream: IO[bytes]) -> Any:
    """The next frame's value; None at the end of the stream."""
    head = stream.read(FRAME.size)
    if len(head) < FRAME.size:
        return None
    (size,) = FRAME.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


#: SQLite's page cache for the writer's connection (KiB; SQLite's default is 2 MiB): the
#: invocations table's indexes take each record at a random place (request ids are random),
#: and past the cache every insert reads its pages back from the file
SQLITE_CACHE_KIB = 65536


def _sqlite_cache(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    wire_in = sys.stdin.buffer
    wire_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints goes to the log, not into the wire
    url = _read_blocking(wire_in)
    if url is None:
        return
    from impuls.store.db import engine_for

    db = engine_for(url)
    if db.dialect.name == "sqlite":
        event.listen(db, "connect", _sqlite_cache)
    try:
        while (request := _read_blocking(wire_in)) is not None:
            batch, unsure = request
            try:
                reply: tuple[str, Any] = ("ok", insert_rows(db, batch, unsure))
            except (SQLAlchemyError, ImpulsError) as exc:
                reply = ("failed", describe_error(exc))
            except Exception as exc:  # a fault of this process: the whole story, for the log
                reply = ("failed", f"{describe_error(exc)}\n{traceback.format_exc()}")
            wire_out.write(_frame(reply))
            wire_out.flush()
    finally:
        db.dispose()


if __name__ == "__main__":
    main()
