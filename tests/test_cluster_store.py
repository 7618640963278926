"""The shared store's parts on PostgreSQL, without servers: code blobs two nodes share, built
packages unpacked instead of rebuilt, the change feed with and without notifications, and the
node heartbeats (see tests/test_scale_out.py for three real nodes)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update

from impuls.cluster.changes import ChangeFeed
from impuls.cluster.nodes import NodeBeat, NodeTable
from impuls.store.blobs import BlobMissing, SharedBlobStore
from impuls.store.db import open_engine
from impuls.store.package_archives import ArchiveDamaged, pack, unpack
from impuls.store.schema import code_blobs
from tests.conftest import POSTGRES_URL, PostgresDatabases

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not POSTGRES_URL, reason="IMPULS_TEST_POSTGRES_URL is not set "
                                                "(.ci/run starts PostgreSQL and sets it)"),
]
DEADLINE = 30.0  # seconds: a guard against hanging, not a bound on speed


@pytest.fixture
def db() -> Iterator[Engine]:
    assert POSTGRES_URL
    dbs = PostgresDatabases(POSTGRES_URL)
    engine = open_engine(dbs.new()["IMPULS_DATABASE_URL"])
    yield engine
    engine.dispose()
    dbs.drop_all()


def test_a_blob_put_on_one_node_is_fetched_into_another_nodes_cache(db: Engine, tmp_path: Path) -> None:
    a, b = SharedBlobStore(tmp_path / "a", db), SharedBlobStore(tmp_path / "b", db)
    sha = a.put(b"print('hi')")
    assert sha == hashlib.sha256(b"print('hi')").hexdigest()
    assert not b.path(sha).exists()
    assert b.get(sha) == b"print('hi')"
    assert b.path(sha).read_bytes() == b"print('hi')"  # cached: the next read is local
    with pytest.raises(BlobMissing):
        b.get("0" * 64)
    # deleted right after a put: the local copy goes, the shared one stays for the grace period
    a.delete(sha)
    assert not a.path(sha).exists() and a.get(sha) == b"print('hi')"
    with db.begin() as conn:
        conn.execute(update(code_blobs).values(stored_at=datetime.now(UTC) - timedelta(hours=1)))
    a.delete(sha)
    b.delete(sha)
    with pytest.raises(BlobMissing):
        b.get(sha)
    with db.connect() as conn:
        assert conn.execute(select(code_blobs.c.sha256)).all() == []


def test_a_package_archive_keeps_links_and_modes_and_refuses_escapes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "tool").write_text("#!/bin/sh\n")
    os.chmod(src / "bin" / "tool", 0o755)
    (src / "handler.py").write_text("x = 1\n")
    os.symlink("bin/tool", src / "tool")
    dest = tmp_path / "dest"
    dest.mkdir()
    unpack(pack(src), dest)
    assert (dest / "handler.py").read_text() == "x = 1\n"
    assert os.readlink(dest / "tool") == "bin/tool" and os.access(dest / "bin" / "tool", os.X_OK)

    for name, link in (("../evil", None), ("/etc/evil", None), ("a/link", "../../etc"), ("link", "/etc")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
            tar.addfile(info, io.BytesIO(b""))
        empty = tmp_path / f"empty-{abs(hash(name))}"
        empty.mkdir()
        with pytest.raises(ArchiveDamaged):
            unpack(buf.getvalue(), empty)
        assert list(empty.iterdir()) == []


@pytest.mark.parametrize("listen", [True, False], ids=["notified", "polling-only"])
def test_a_change_published_on_one_node_reaches_the_other(db: Engine, listen: bool) -> None:
    heard: list[tuple[str, str | None]] = []
    got = threading.Event()

    def apply(name: str, qualifier: str | None) -> None:
        heard.append((name, qualifier))
        got.set()

    writer = ChangeFeed(db, "node-a", lambda *_: None)
    writer.publish("before", "$LATEST")  # before the reader started: no cache of it to forget
    reader = ChangeFeed(db, "node-b", apply, listen=listen)
    reader.start()
    try:
        writer.publish("fn", "$LATEST")
        writer.publish("fn", None)
        reader.publish("mine", "$LATEST")  # its own changes are applied where they are made
        deadline = time.monotonic() + DEADLINE
        while len(heard) < 2 and time.monotonic() < deadline:
            got.wait(0.1)
        time.sleep(2 * reader.poll_seconds)  # room for anything wrongly applied to show up
        assert heard == [("fn", "$LATEST"), ("fn", None)]
        assert reader.applied == 2
    finally:
        reader.close()


def test_a_node_that_stops_beating_is_down_and_a_clean_stop_says_stopped(db: Engine) -> None:
    table = NodeTable(db, heartbeat_seconds=5)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for node in ("a", "b"):
        table.beat(NodeBeat(node, f"http://{node}:8080", "1", "namespace", start, {"instances": 2}), start)
    table.stopped("b", start + timedelta(seconds=1))
    found = {n["id"]: n for n in table.list(start + timedelta(seconds=15))}
    assert found["a"]["state"] == "up" and found["a"]["instances"] == 2  # 3 beats missed: not yet
    assert found["b"]["state"] == "stopped"
    found = {n["id"]: n for n in table.list(start + timedelta(seconds=15.5))}
    assert found["a"]["state"] == "down" and found["a"]["seconds_since_heartbeat"] == 15.5
    table.beat(NodeBeat("b", "http://b:8080", "1", "namespace", start, {}), start + timedelta(seconds=20))
    states = {n["id"]: n["state"] for n in table.list(start + timedelta(seconds=21))}
    assert states == {"a": "down", "b": "up"}


def test_a_change_committed_while_the_database_went_away_is_published_once_it_is_back() -> None:
    from tests.test_store_faults import Database

    assert POSTGRES_URL
    database = Database(POSTGRES_URL)
    engines = [open_engine(database.url) for _ in range(2)]
    heard: list[tuple[str, str | None]] = []
    writer = ChangeFeed(engines[0], "node-a", lambda *_: None)
    reader = ChangeFeed(engines[1], "node-b", lambda name, qualifier: heard.append((name, qualifier)))
    try:
        writer.start()
        reader.start()
        database.refuse_connections()
        writer.publish("fn", "$LATEST")  # the change's own commit succeeded just before: no raise
        writer.publish("fn", None)
        time.sleep(2 * reader.poll_seconds)
        assert heard == []
        database.accept_connections()
        deadline = time.monotonic() + DEADLINE
        while len(heard) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert heard == [("fn", "$LATEST"), ("fn", None)]  # in order, each once
    finally:
        reader.close()
        writer.close()
        for engine in engines:
            engine.dispose()
        database.drop()
