"""Lambda's function lifecycle in the registry: background builds (``wait=False``), Pending,
Active and Failed, updates InProgress, and builds resumed after a crash.

Builds are real (PackageBuilder): a ``provided`` package without a ``bootstrap`` fails
cheaply.  A build is held back where a test needs to see it unfinished (a gate the test
opens), and finished ones are awaited with ``wait_for_builds``, never with sleeps.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from impuls.errors import FunctionNotReady, InvalidInput, PreconditionFailed, UpdateInProgress
from impuls.functions.packages import BuildFailed
from impuls.functions.registry import FunctionRegistry
from impuls.runtimes import default_registry
from impuls.store.db import open_engine
from tests.helpers import make_zip
from tests.unit.test_registry import OTHER_SOURCE, SOURCE, Store, body
from tests.unit.test_versions import ALICE, Heard

pytestmark = pytest.mark.skipif(not Path("/usr/bin/python3.11").is_file(),
                                reason="the python3.11 runtime needs /usr/bin/python3.11")
BOOTSTRAP = "#!/bin/sh\nexec cat\n"
WAIT = 60.0


def provided(name: str = "custom", files: dict[str, str] | None = None) -> dict[str, Any]:
    """A ``provided`` function; without ``bootstrap`` in ``files`` its build fails."""
    return {"name": name, "runtime": "provided.al2", "handler": "function.handler",
            "code_zip": make_zip(files if files is not None else {"bootstrap": BOOTSTRAP})}


class Gate:
    """Holds every package build until ``open()`` (then lets them all through)."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened = threading.Event()
        self.waiting = threading.Event()
        build = store.packages.get

        def gated(*args: Any) -> Any:
            self.waiting.set()
            assert self.opened.wait(WAIT), "the test never opened the gate"
            return build(*args)

        monkeypatch.setattr(store.packages, "get", gated)

    def open(self) -> None:
        self.opened.set()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Heard]:
    heard = Heard(tmp_path)
    yield heard
    heard.registry.close()


def settle(store: Store) -> None:
    assert store.registry.wait_for_builds(WAIT), "background builds did not finish"


# --- create ---------------------------------------------------------------------------------


def test_create_without_waiting_is_pending_then_active(store: Heard, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(store, monkeypatch)
    fn = store.registry.create(body("fn"), ALICE, wait=False)
    assert (fn.state, fn.state_reason_code, fn.last_update_status) == ("Pending", "Creating", "InProgress")
    assert gate.waiting.wait(WAIT)
    assert store.registry.get("fn").state == "Pending"  # still building
    with pytest.raises(UpdateInProgress):
        store.registry.update("fn", {"memory_mb": 256})
    with pytest.raises(FunctionNotReady, match="state is Pending"):
        store.registry.publish("fn", ALICE)
    gate.open()
    settle(store)
    done = store.registry.get("fn")
    assert (done.state, done.state_reason, done.state_reason_code, done.last_update_status) == (
        "Active", None, None, "Successful")
    assert done.revision_id != fn.revision_id and done.revision == 1
    assert store.registry.package(done).directory.is_dir()
    assert store.heard == [("fn", "$LATEST"), ("fn", "$LATEST")]  # created, then built
    assert [a for a, _, _ in store.actions()] == ["function.create"]


def test_a_failed_background_build_leaves_the_function_failed(store: Heard) -> None:
    fn = store.registry.create(provided(files={"readme.txt": "no bootstrap here"}), ALICE, wait=False)
    assert fn.state == "Pending"
    settle(store)
    failed = store.registry.get("custom")
    assert failed.state == "Failed" and failed.last_update_status == "Failed"
    assert failed.state_reason_code == "InvalidConfiguration"
    assert failed.last_update_status_reason_code == "InvalidConfiguration"
    assert failed.state_reason is not None and "bootstrap" in failed.state_reason
    assert len(failed.state_reason) <= 1000
    assert store.registry.build_info(failed)["status"] == "failed"
    with pytest.raises(FunctionNotReady, match="state is Failed"):
        store.registry.publish("custom", ALICE)
    api = failed.to_api()
    assert api["state"] == "Failed" and "bootstrap" in api["state_reason"]
    # new code that builds makes it Active
    fixed = store.registry.update("custom", {"code_zip": make_zip({"bootstrap": BOOTSTRAP})}, wait=False)
    assert fixed.last_update_status == "InProgress"
    settle(store)
    assert store.registry.get("custom").state == "Active"
    assert store.registry.publish("custom", ALICE).version == "1"


def test_waiting_create_with_a_failing_build_is_refused_and_leaves_nothing(store: Heard) -> None:
    with pytest.raises(BuildFailed, match="bootstrap"):
        store.registry.create(provided(files={"readme.txt": "x"}))
    assert store.registry.list() == ([], 0) and store.blob_shas() == set() and store.heard == []


def test_cheap_checks_still_refuse_at_once_without_waiting(store: Heard) -> None:
    with pytest.raises(InvalidInput, match=r"^code_zip:"):
        store.registry.create(body("fn", code=None, code_zip=make_zip({"other.py": SOURCE})), wait=False)
    with pytest.raises(InvalidInput, match=r"^memory_mb:"):
        store.registry.create(body("fn", memory_mb=1), wait=False)
    settle(store)
    assert store.registry.list() == ([], 0) and store.blob_shas() == set()


# --- update ---------------------------------------------------------------------------------


def test_update_without_waiting_is_built_then_applied(store: Heard, monkeypatch: pytest.MonkeyPatch) -> None:
    before = store.registry.create(body("fn"))
    store.registry.publish("fn", ALICE)
    gate = Gate(store, monkeypatch)
    answer = store.registry.update("fn", {"code": OTHER_SOURCE, "timeout_sec": 7}, ALICE, wait=False)
    assert answer.last_update_status == "InProgress"
    assert answer.timeout_sec == 7 and answer.code_sha256 != before.code_sha256  # as it will be
    served = store.registry.get("fn")
    assert served.code_sha256 == before.code_sha256 and served.timeout_sec == 30 and served.revision == 1
    assert served.last_update_status == "InProgress" and served.state == "Active"
    assert served.pending is not None and served.pending["timeout_sec"] == 7
    assert gate.waiting.wait(WAIT)
    with pytest.raises(UpdateInProgress):
        store.registry.update("fn", {"memory_mb": 256})
    with pytest.raises(UpdateInProgress):
        store.registry.publish("fn", ALICE)
    store.registry.tag("fn", {"k": "v"}, ALICE)  # what needs no build is still allowed
    assert store.blob_shas() == {before.code_sha256, answer.code_sha256}
    gate.open()
    settle(store)
    after = store.registry.get("fn")
    assert (after.last_update_status, after.revision, after.timeout_sec) == ("Successful", 2, 7)
    assert after.code_sha256 == answer.code_sha256 and after.pending is None and after.tags == {"k": "v"}
    assert store.registry.code(after).data == OTHER_SOURCE.encode()
    assert store.blob_shas() == {before.code_sha256, after.code_sha256}  # version 1 keeps the old code
    assert store.registry.publish("fn", ALICE).version == "2"


def test_a_failed_background_update_keeps_the_served_function(store: Heard) -> None:
    before = store.registry.create(provided())
    store.heard.clear()
    bad = make_zip({"readme.txt": "no bootstrap"})
    store.registry.update("custom", {"code_zip": bad, "memory_mb": 512}, ALICE, wait=False)
    settle(store)
    after = store.registry.get("custom")
    assert after.state == "Active" and after.last_update_status == "Failed"
    assert after.last_update_status_reason_code == "InvalidConfiguration"
    assert after.last_update_status_reason is not None and "bootstrap" in after.last_update_status_reason
    assert (after.code_sha256, after.memory_mb, after.revision) == (before.code_sha256, 128, 1)
    assert after.pending is None and store.blob_shas() == {before.code_sha256}  # its blob is gone
    assert store.heard == [("custom", "$LATEST"), ("custom", "$LATEST")]
    again = store.registry.update("custom", {"memory_mb": 256})  # the next change is accepted
    assert again.last_update_status == "Successful" and again.last_update_status_reason is None


def test_a_change_that_needs_no_build_applies_at_once(store: Heard) -> None:
    store.registry.create(body("fn"))
    fn = store.registry.update("fn", {"memory_mb": 256, "description": "d"}, ALICE, wait=False)
    assert fn.last_update_status == "Successful" and fn.memory_mb == 256 and fn.revision == 2
    assert store.registry.wait_for_builds(0)


def test_revision_id_guards_updates(store: Heard) -> None:
    fn = store.registry.create(body("fn", role="arn:aws:iam::123456789012:role/run"))
    with pytest.raises(PreconditionFailed):
        store.registry.update("fn", {"memory_mb": 256}, revision_id="stale")
    changed = store.registry.update("fn", {"memory_mb": 256}, revision_id=fn.revision_id)
    assert changed.revision_id != fn.revision_id and changed.role == fn.role
    with pytest.raises(InvalidInput, match=r"^role:"):
        store.registry.update("fn", {"role": "admin"})


def test_runtime_as_written_is_kept(store: Heard) -> None:
    fn = store.registry.create(provided())
    assert fn.runtime == "provided" and fn.runtime_given == "provided.al2"
    assert store.registry.update("custom", {"memory_mb": 256}).runtime_given == "provided.al2"
    assert store.registry.update("custom", {"runtime": "provided.al2023"}).runtime_given == "provided.al2023"
    assert fn.to_api()["runtime"] == "provided"  # the native API shows the canonical id


# --- crashes and shutdown ---------------------------------------------------------------------


def test_builds_left_by_a_crash_are_resumed(store: Heard, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    store.registry.create(body("active"))
    monkeypatch.setattr(store.registry._builds, "submit", lambda key: False)  # the process "dies"
    store.registry.create(body("pending"), wait=False)
    store.registry.update("active", {"code": OTHER_SOURCE}, wait=False)
    store.registry.create(provided("broken", {"x.txt": "x"}), wait=False)
    assert store.registry.get("pending").state == "Pending"
    restarted = FunctionRegistry(open_engine(f"sqlite:///{tmp_path}/impuls.db"), store.blobs,
                                 default_registry(), store.packages)
    try:
        assert restarted.resume_builds() == 3
        assert restarted.wait_for_builds(WAIT)
        assert restarted.get("pending").state == "Active"
        active = restarted.get("active")
        assert active.last_update_status == "Successful" and active.revision == 2
        assert restarted.code(active).data == OTHER_SOURCE.encode()
        assert restarted.get("broken").state == "Failed"
        assert restarted.resume_builds() == 0
    finally:
        restarted.close()


def test_close_stops_taking_builds(store: Heard) -> None:
    store.registry.close()
    store.registry.create(body("fn"), wait=False)
    assert store.registry.wait_for_builds(0)  # nothing was queued
    assert store.registry.get("fn").state == "Pending"  # the next start resumes it
    assert store.registry.resume_builds() == 1
    assert store.registry.get("fn").state == "Pending"
