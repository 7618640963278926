"""The asynchronous-event rows: how many events a server accepts per second (each answered
202 only once committed), and how long an accepted event waits before its delivery starts.

Both on the store the server runs on: SQLite in its data directory, or PostgreSQL.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from bench.loadgen import Client, lua_script, run_wrk
from bench.results import EventRow, percentile
from bench.servers import ImpulsServer
from bench.workloads import EVENT, PYTHON

DRAIN_TIMEOUT_S = 300.0


@contextlib.contextmanager
def temporary_database(admin_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database for one server (dropped afterwards); its URL."""
    import psycopg

    name = f"impuls_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(admin_url)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def measure(server: ImpulsServer, store: str, work: Path, concurrency: int, seconds: int,
            delay_samples: int) -> EventRow:
    """Accepts per second at ``concurrency`` (wrk, ``seconds``), then the accept-to-start delay of
    ``delay_samples`` events sent one at a time to an idle warm function."""
    function = f"events-{store}"
    path = server.create(function, PYTHON, max_concurrency=64)
    client = Client(server.url)
    client.request("POST", path, EVENT)  # warm
    url = f"{server.url}{path}?async=true"
    script = lua_script(EVENT, work, name=f"events-{store}.lua")
    result = run_wrk(url, script, concurrency, seconds)
    _drain(server, function)
    delays = []
    for _ in range(delay_samples):
        status, doc, _ = client.request("POST", f"{path}?async=true", EVENT)
        if status != 202:
            raise RuntimeError(f"async invoke: HTTP {status}: {doc}")
        delays.append(_start_delay_ms(client, function, doc["request_id"]))
    client.close()
    return EventRow(store, concurrency, result.requests, result.rps, result.errors + result.non_2xx,
                    len(delays), statistics.median(delays), percentile(delays, 99))


def _drain(server: ImpulsServer, function: str) -> None:
    """Wait until every accepted event of ``function`` ran (so the next row starts idle)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.call("GET", f"/api/v1/functions/{function}/events?limit=1")["pending"] == 0:
            return
        time.sleep(0.5)
    raise RuntimeError(f"events of {function} still pending after {DRAIN_TIMEOUT_S:.0f} s")


def _start_delay_ms(client: Client, function: str, request_id: str) -> float:
    """From the event's acceptance (its row's time) to its first attempt's start, in ms."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, doc, _ = client.request("GET", f"/api/v1/functions/{function}/invocations/{request_id}")
        if doc.get("history"):
            created = _ts(doc["created_at"])
            started = _ts(doc["history"][0]["started_at"])
            return (started - created).total_seconds() * 1000
        time.sleep(0.01)
    raise RuntimeError(f"event {request_id} did not start within 60 s")


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
