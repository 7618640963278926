"""Faults of the host: the data directory's disk fills up.

The server's data directory is a small tmpfs made by the test (root only, as CI runs).  With
the disk full, creates and updates are refused with 507 and a message naming the disk, nothing
half-written is left, existing functions keep answering, and all works again once space is
freed.
"""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Server

HANDLER = "def handler(event, context):\n    return {'n': event.get('n')}\n"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """Write a file until the disk has no space left, down to its last 4 KiB; its path."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for size in (1 << 20, 1 << 12):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                pass
    return filler


def _zip_of(size: int) -> str:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("handler.py", HANDLER)
        zf.writestr("data.bin", os.urandom(size))
    return base64.b64encode(buf.getvalue()).decode()


def test_a_full_disk_refuses_changes_and_keeps_serving(small_disk: Path) -> None:
    server = Server(small_disk / "data", args=["--sandbox", "process"]).start()
    try:
        kept = server.deploy(name="kept", runtime="python3.11", handler="handler.handler", code=HANDLER)
        assert server.invoke(kept["name"], {"n": 1}).json()["body"] == {"n": 1}
        filler = _fill(small_disk)

        r = server.create(name="new-one", runtime="python3.11", handler="handler.handler",
                          code_zip=_zip_of(2 << 20))
        assert r.status_code == 507, r.text
        assert str(small_disk / "data") in r.json()["message"] and "space" in r.json()["message"]
        r = server.request("PATCH", "/api/v1/functions/kept", json={"code": HANDLER + "# changed\n" * 40000})
        assert r.status_code == 507, r.text

        # nothing half-written: no new function, no temporary files, the old code in service
        assert server.request("GET", "/api/v1/functions/new-one").status_code == 404
        leftovers = [p for p in (small_disk / "data").rglob("*") if p.name.endswith(".tmp")
                     or p.name.startswith(".build-")]
        assert not leftovers, leftovers
        assert server.invoke("kept", {"n": 2}).json()["body"] == {"n": 2}

        filler.unlink()
        r = server.create(name="new-one", runtime="python3.11", handler="handler.handler",
                          code_zip=_zip_of(2 << 20))
        assert r.status_code == 201, r.text
        assert server.invoke("new-one", {"n": 3}).json()["body"] == {"n": 3}
    finally:
        server.stop()


def test_a_locked_sqlite_store_answers_503_then_recovers(tmp_path: Path) -> None:
    """Another process holds the SQLite store's write lock longer than the busy timeout: a
    create answers 503 saying the database is unavailable, warm calls go on, and once the lock
    is gone everything works without a restart."""
    import sqlite3

    server = Server(tmp_path / "data", args=["--sandbox", "process"]).start()
    try:
        server.deploy(name="steady", runtime="python3.11", handler="handler.handler", code=HANDLER)
        assert server.invoke("steady", {"n": 0}).json()["body"] == {"n": 0}
        holder = sqlite3.connect(tmp_path / "data" / "impuls.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held
        try:
            r = server.create(name="other", runtime="python3.11", handler="handler.handler", code=HANDLER)
            assert r.status_code == 503, r.text
            assert "database is unavailable" in r.json()["message"] and "locked" in r.json()["message"]
            assert server.invoke("steady", {"n": 1}).json()["body"] == {"n": 1}
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        r = server.create(name="other", runtime="python3.11", handler="handler.handler", code=HANDLER)
        assert r.status_code == 201, r.text
        assert server.invoke("other", {"n": 2}).json()["body"] == {"n": 2}
    finally:
        server.stop()
