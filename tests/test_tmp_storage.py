"""/tmp as on Lambda, in the isolating sandboxes: on disk and sized by
``ephemeral_storage_mb``, not memory: a 128 MB function writes 400 MB there and reads it back,
and writing past the size fails inside the function with "No space left on device" (not an
out-of-memory kill)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from impuls.sandbox.scratch import ScratchImages
from tests.helpers import Server

FILL = """
import errno, os

def handler(event, context):
    path = "/tmp/" + event["name"]
    blocks = [os.urandom(1 << 20) for _ in range(7)]  # block i of the file is blocks[i % 7]
    written = 0
    try:
        with open(path, "wb") as fh:
            while written < event["mb"] << 20:
                fh.write(blocks[(written >> 20) % 7])
                written += 1 << 20
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        os.unlink(path)
        return {"errno": errno.errorcode.get(exc.errno), "message": str(exc), "written_mb": written >> 20}
    same, n = True, 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            same = same and chunk == blocks[n % 7]
            n += 1
    os.unlink(path)
    st = os.statvfs("/tmp")
    return {"written_mb": written >> 20, "same": same and n << 20 == written,
            "size_mb": st.f_blocks * st.f_frsize >> 20, "entries": os.listdir("/tmp")}
"""


@pytest.fixture(params=["namespace", pytest.param("microvm", marks=pytest.mark.microvm)])
def isolating_server(request: pytest.FixtureRequest, make_server: Callable[..., Server]) -> Server:
    if request.param == "microvm":
        images: Path = request.getfixturevalue("images_dir")
        return make_server(env={"IMPULS_IMAGES_DIR": str(images)}, args=["--sandbox", "microvm"])
    return make_server(args=["--sandbox", "namespace"])


def call(srv: Server, name: str, event: dict[str, object]) -> dict[str, object]:
    r = srv.client.post(f"/api/v1/functions/{name}/invoke", json=event, timeout=900)
    doc: dict[str, object] = r.json()
    return doc


def test_a_128_mb_function_writes_400_mb_to_tmp_and_reads_it_back(isolating_server: Server) -> None:
    srv = isolating_server
    fn = srv.deploy(runtime="python3.11", handler="handler.handler", code=FILL, memory_mb=128,
                    ephemeral_storage_mb=1024, timeout_sec=600)
    doc = call(srv, fn["name"], {"name": "big", "mb": 400})
    assert doc["status_code"] == 200, doc
    body = doc["body"]
    assert isinstance(body, dict)
    assert body["written_mb"] == 400 and body["same"] is True, body
    assert 900 <= body["size_mb"] <= 1024, body  # the file system is the function's size
    assert body["entries"] == [], body  # nothing else in /tmp (no lost+found)


def test_writing_past_ephemeral_storage_is_enospc_inside_the_function(isolating_server: Server) -> None:
    srv = isolating_server
    fn = srv.deploy(runtime="python3.11", handler="handler.handler", code=FILL, memory_mb=128,
                    ephemeral_storage_mb=512, timeout_sec=600)
    doc = call(srv, fn["name"], {"name": "over", "mb": 600})
    assert doc["status_code"] == 200, doc  # the function saw the error and answered
    body = doc["body"]
    assert isinstance(body, dict)
    assert body["errno"] == "ENOSPC" and "No space left on device" in body["message"], body
    assert 400 <= body["written_mb"] <= 512, body
    # the instance is fine and /tmp is usable again once the file is gone
    again = call(srv, fn["name"], {"name": "small", "mb": 10})
    small = again["body"]
    assert isinstance(small, dict) and small["same"] is True and again["cold_start"] is False, again


def _loop_files_under(path: Path) -> list[str]:
    """Backing files of the host's loop devices that lie under ``path``."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            name = backing.read_text().strip()
            if name.startswith(str(path)):
                found.append(name)
    return found


@pytest.mark.namespace
def test_tmp_disks_go_with_their_instances(make_server: Callable[..., Server]) -> None:
    """Nothing of the /tmp disks outlives the server: not after a stop, not after a SIGKILL
    (the restarted server's sweep ends the orphaned sandboxes, and their disks with them)."""
    srv = make_server(args=["--sandbox", "namespace"])
    fn = srv.deploy(runtime="python3.11", handler="handler.handler", code=FILL)
    assert call(srv, fn["name"], {"name": "f", "mb": 1})["status_code"] == 200
    assert _loop_files_under(srv.data_dir), "the instance's /tmp is a loop device of the data directory"
    srv.kill()
    srv.start()
    assert call(srv, fn["name"], {"name": "f", "mb": 1})["status_code"] == 200
    srv.stop()
    deadline = time.monotonic() + 30
    while _loop_files_under(srv.data_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _loop_files_under(srv.data_dir) == []
    assert not list((srv.data_dir).rglob("tmp-*.img")), "no disk file is left"


def test_a_tmp_disk_is_born_with_its_inode_tables_zeroed(tmp_path: Path) -> None:
    """Every block group of a new /tmp disk is marked ITABLE_ZEROED, so the kernel has nothing
    to zero after the mount (with lazy initialisation it wrote 8 MB to each 512 MB disk in
    the background of every instance start), and the disk's file stays sparse."""
    disk = ScratchImages(tmp_path / "images").copy(tmp_path / "tmp.img", 512, (os.getuid(), os.getgid()))
    dump = subprocess.run(["dumpe2fs", str(disk)], capture_output=True, text=True, check=True).stdout
    groups = [line for line in dump.splitlines() if re.match(r"Group \d+:", line)]
    assert len(groups) == 4 and all("ITABLE_ZEROED" in line for line in groups), groups
    assert disk.stat().st_blocks * 512 < 2 * 2**20
