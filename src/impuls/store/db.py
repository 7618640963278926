"""Database engine set-up: SQLite (WAL) by default, PostgreSQL by URL; migrations at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import InterfaceError, OperationalError

from impuls.errors import StorageFull, StoreUnavailable

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


#: the largest paging offset and version number the API takes: beyond 64 bits the database
#: driver overflows, and nothing real comes close to 31
MAX_INT = 2**31 - 1


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # an answered 2xx survives power loss too
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA case_sensitive_like=ON")  # LIKE as on PostgreSQL (function-name globs)
    cur.close()


#: PostgreSQL: give up on a server that does not answer, rather than wait for the network's timeout
PG_CONNECT_ARGS = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                   "keepalives_count": 3}


def _as_condition(context: ExceptionContext) -> None:
    """A database that cannot be used now becomes StoreUnavailable (a full disk StorageFull),
    so that every door answers it as a condition (503, 507) instead of a fault (500)."""
    error = context.sqlalchemy_exception
    if not (context.is_disconnect or isinstance(error, OperationalError | InterfaceError)):
        return  # the statement's own fault (a constraint, a bad value): not ours to rename
    original = context.original_exception
    first = (str(original).strip().splitlines() or [""])[0][:200]
    if "disk is full" in first or "No space left" in first or getattr(original, "sqlstate", "") == "53100":
        raise StorageFull(f"the database's disk is full ({first}): free some space and try again") from error
    raise StoreUnavailable(f"the database is unavailable ({first}): try again shortly") from error


def open_engine(url: str) -> Engine:
    """An Engine for ``url`` with the store's settings; the schema is migrated to head."""
    engine = engine_for(url)
    migrate(engine)
    return engine


def engine_for(url: str) -> Engine:
    """An Engine for ``url`` with the store's settings (no migration: another process of the
    server uses a store it migrated)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        if parsed.drivername == "postgresql":
            url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, connect_args=PG_CONNECT_ARGS)
    event.listen(engine, "handle_error", _as_condition)
    return engine


#: the PostgreSQL advisory lock nodes starting together take to migrate one at a time
MIGRATION_LOCK = 0x1A9B_5E7D


def migrate(engine: Engine) -> None:
    """Apply every Alembic migration not yet applied (idempotent).  On PostgreSQL the nodes
    of a cluster starting at once migrate one after the other (a transaction-scoped advisory
    lock; PostgreSQL's DDL is transactional, so the next one finds the schema at head)."""
    from alembic import command  # here: the record writer process opens the store without it
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
