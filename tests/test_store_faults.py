"""Invocation records while PostgreSQL is unreachable (engine/records.py), on a temporary database.

The shared server keeps running: the test database stops accepting connections
(``ALTER DATABASE ... ALLOW_CONNECTIONS false``) and its backends are terminated
(``pg_terminate_backend``), or the recorder points at a closed port.  Every record added
must end up in the table exactly once and in order once the database is back; ``flush``
returns instead of waiting.  Waits are polls with generous deadlines.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from impuls.engine import records
from impuls.engine.records import InvocationRecorder
from impuls.store.db import open_engine
from tests.helpers import free_port
from tests.unit.test_records import ids, in_table, record, until

POSTGRES_URL = os.environ.get("IMPULS_TEST_POSTGRES_URL")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not POSTGRES_URL, reason="IMPULS_TEST_POSTGRES_URL is not set "
                                                "(.ci/run starts PostgreSQL and sets it)"),
]
DEADLINE = 60.0  # seconds: a guard against hanging, not a bound on speed


class Database:
    """A temporary database on the test server, which the test can make unreachable."""

    def __init__(self, admin_url: str) -> None:
        import psycopg

        self.psycopg = psycopg
        self.admin_url = admin_url
        self.name = f"impuls_test_{uuid.uuid4().hex[:12]}"
        self.admin("CREATE DATABASE {db}")
        self.url = f"{admin_url.rpartition('/')[0]}/{self.name}"

    def admin(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with self.psycopg.connect(self.admin_url, autocommit=True) as conn:
            cur = conn.execute(sql.replace("{db}", f'"{self.name}"'), params or None)
            return cur.fetchall() if cur.description else []

    def refuse_connections(self) -> None:
        """New connections fail; the open ones are terminated."""
        self.admin("ALTER DATABASE {db} ALLOW_CONNECTIONS false")
        self.admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", self.name)

    def accept_connections(self) -> None:
        self.admin("ALTER DATABASE {db} ALLOW_CONNECTIONS true")

    def drop(self) -> None:
        self.admin("ALTER DATABASE {db} ALLOW_CONNECTIONS true")
        self.admin("DROP DATABASE IF EXISTS {db} WITH (FORCE)")


@pytest.fixture
def database() -> Iterator[Database]:
    assert POSTGRES_URL
    made = Database(POSTGRES_URL)
    yield made
    made.drop()


@pytest.fixture
def db(database: Database) -> Iterator[Engine]:
    engine = open_engine(database.url)
    yield engine
    engine.dispose()


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "RETRY_FIRST", 0.01)
    monkeypatch.setattr(records, "RETRY_MAX", 0.05)


def test_records_survive_a_postgres_outage(database: Database, db: Engine, quick_retries: None) -> None:
    async def main() -> None:
        recorder = InvocationRecorder(db, timedelta(days=1), batch_size=5)
        recorder.start()
        for n in range(3):
            recorder.add(record(n))
        assert await asyncio.wait_for(recorder.flush(), DEADLINE)
        database.refuse_connections()
        for n in range(3, 15):
            recorder.add(record(n))
        await until(lambda: recorder.failed_attempts >= 3, "failing")
        assert await asyncio.wait_for(recorder.flush(), DEADLINE) is False
        assert recorder.pending == 12
        database.accept_connections()
        await until(lambda: recorder.pending == 0, "written after the outage")
        assert in_table(db) == ids(*range(15))
        await recorder.close()
        assert recorder.dropped == 0 and recorder.rejected == 0

    asyncio.run(main())


def test_a_backend_terminated_in_the_middle_of_a_batch_loses_and_repeats_nothing(
        database: Database, db: Engine) -> None:
    with db.begin() as conn:  # a trigger holds the insert of req-0003 while impuls_test_hold says so
        conn.execute(text("CREATE TABLE impuls_test_hold (hold boolean NOT NULL)"))
        conn.execute(text("INSERT INTO impuls_test_hold VALUES (true)"))
        conn.execute(text(
            "CREATE FUNCTION impuls_test_hold() RETURNS trigger AS $$ BEGIN "
            "IF NEW.request_id = 'req-0003' AND (SELECT hold FROM impuls_test_hold) THEN "
            "PERFORM pg_sleep(600); END IF; RETURN NEW; END $$ LANGUAGE plpgsql"))
        conn.execute(text("CREATE TRIGGER impuls_test_hold BEFORE INSERT ON invocations "
                          "FOR EACH ROW EXECUTE FUNCTION impuls_test_hold()"))

    def sleeping() -> list[tuple[Any, ...]]:
        return database.admin("SELECT pid FROM pg_stat_activity WHERE datname = %s "
                              "AND wait_event = 'PgSleep'", database.name)

    async def main() -> None:
        recorder = InvocationRecorder(db, timedelta(days=1))
        for n in range(8):
            recorder.add(record(n))
        flush = asyncio.create_task(recorder.flush())
        await until(lambda: bool(sleeping()), "holding the insert")
        with db.begin() as conn:  # req-0000..0002 are inserted, uncommitted; the next try is not held
            conn.execute(text("UPDATE impuls_test_hold SET hold = false"))
        database.refuse_connections()
        assert await asyncio.wait_for(flush, DEADLINE) is False
        assert recorder.pending == 8
        recorder.add(record(8))
        database.accept_connections()
        assert await asyncio.wait_for(recorder.flush(), DEADLINE)
        assert in_table(db) == ids(*range(9)) and recorder.pending == 0

    asyncio.run(main())


def test_a_record_postgres_refuses_fails_alone(db: Engine) -> None:
    async def main() -> None:
        recorder = InvocationRecorder(db, timedelta(days=1))
        recorder.add(record(0))
        recorder.add(record(1, logs="a NUL \x00 in the output"))  # text cannot hold NUL
        recorder.add(record(2, note="n" * 300))  # longer than the column
        recorder.add(record(3))
        assert await asyncio.wait_for(recorder.flush(), DEADLINE)
        assert in_table(db) == ids(0, 3) and recorder.rejected == 2 and recorder.pending == 0

    asyncio.run(main())


def test_flush_returns_when_nothing_listens_on_the_port() -> None:
    assert POSTGRES_URL
    url = POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1)
    host_port = url.split("@", 1)[1].split("/", 1)[0]
    engine = create_engine(url.replace(host_port, f"127.0.0.1:{free_port()}"), pool_pre_ping=True)

    async def main() -> None:
        recorder = InvocationRecorder(engine, timedelta(days=1))
        recorder.add(record(0))
        assert await asyncio.wait_for(recorder.flush(), DEADLINE) is False
        assert await asyncio.wait_for(recorder.flush(), DEADLINE) is False
        assert recorder.pending == 1 and recorder.failed_attempts == 2
        await asyncio.wait_for(recorder.close(), DEADLINE)

    try:
        asyncio.run(main())
    finally:
        engine.dispose()


# --- a real server whose database goes away ---------------------------------------------------

HANDLER = "def handler(event, context):\n    return {'n': event.get('n')}\n"


def test_a_server_answers_503_while_postgres_is_away_and_recovers(database: Database,
                                                                  tmp_path: Any) -> None:
    """While its database refuses connections, requests that need it answer 503 with a message
    that says so; warm calls of a known function go on from the cache, their records are
    written once the database is back; no restart is needed."""
    from tests.helpers import Server

    server = Server(tmp_path / "data", args=["--sandbox", "process"],
                    env={"IMPULS_DATABASE_URL": database.url}).start()
    try:
        server.deploy(name="steady", runtime="python3.11", handler="handler.handler", code=HANDLER)
        assert server.invoke("steady", {"n": 0}).json()["body"] == {"n": 0}
        database.refuse_connections()
        try:
            r = server.create(name="other", runtime="python3.11", handler="handler.handler", code=HANDLER)
            assert r.status_code == 503, r.text
            assert "database is unavailable" in r.json()["message"], r.text
            assert server.request("GET", "/api/v1/functions/steady").status_code == 503
            for n in range(1, 6):  # warm, from the engine's cache
                r = server.invoke("steady", {"n": n})
                assert r.status_code == 200 and r.json()["body"] == {"n": n}, r.text
            metrics = server.request("GET", "/metrics")  # still answers, from memory
            assert metrics.status_code == 200, metrics.text
            pending = [line for line in metrics.text.splitlines()
                       if line.startswith("impuls_records_pending ")]
            assert pending and float(pending[0].split()[1]) >= 5, pending
        finally:
            database.accept_connections()
        assert server.create(name="other", runtime="python3.11", handler="handler.handler",
                             code=HANDLER).status_code == 201
        deadline = datetime.now(UTC) + timedelta(seconds=DEADLINE)
        while True:  # the records of the calls made meanwhile arrive
            found = server.request("GET", "/api/v1/functions/steady/invocations?limit=100").json()
            if found["total"] == 6 or datetime.now(UTC) > deadline:
                break
            time.sleep(0.1)
        assert found["total"] == 6, found["total"]
    finally:
        server.stop()
