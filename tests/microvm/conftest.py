"""MicroVM tests: guest images built once per run (cached), drivers on real QEMU.

The images directory is ``IMPULS_IMAGES_DIR`` or ``/var/tmp/impuls-images``:
the first run on a host builds it (about a minute and a half: debootstrap),
later runs find everything up to date in a second, and snapshots made by one
test are restored by the next.  Tests skip only when QEMU is missing.

VMs may run under TCG (software emulation), on hosts of any speed: no test bounds how
long the guest takes beyond generous timeouts (``CALL_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from impuls.runtimes import Runtime, default_registry
from impuls.sandbox.base import InstanceSpec
from impuls.sandbox.microvm.images import ImageStore
from impuls.sandbox.runtime_api import Invocation
from tests import helpers

T = TypeVar("T")

CALL_TIMEOUT = 60.0  # for an invocation that should take well under a second, even emulated


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def guest_node(store: ImageStore, major: str = "20") -> Runtime | None:
    """The pinned Node.js ``nodejs<major>``, if the guest images offer it."""
    if store.offered().get(f"nodejs{major}") != "nodejs":
        return None
    return default_registry().resolve(f"nodejs{major}")


class Specs:
    """Instance specs over code written to a fresh directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, files: dict[str, str], runtime: Runtime | None = None,
                 handler: str = "handler.handler", **over: Any) -> InstanceSpec:
        code = self.root / f"code-{uuid.uuid4().hex[:8]}"
        code.mkdir(parents=True)
        for name, text in files.items():
            (code / name).write_text(text)
        spec = InstanceSpec(
            instance_id=uuid.uuid4().hex[:16], function_name="microvm-test", revision=1,
            runtime=runtime or default_registry().resolve("python3.11"), handler=handler, code_dir=code,
            memory_mb=128, ephemeral_storage_mb=512, environment={"FUNCTION_VAR": "fn"})
        return replace(spec, **over)


@pytest.fixture
def specs(tmp_path: Path) -> Specs:
    return Specs(tmp_path)


def invocation(event: object, timeout: float = CALL_TIMEOUT) -> Invocation:
    return helpers.invocation(event, timeout, function="microvm-test")


def qemu_pids() -> set[int]:
    """Live (non-zombie) QEMU processes of this host."""
    return set(helpers.live_pids(lambda args: bool(args) and args[0].endswith(b"qemu-system-x86_64")))


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid not in qemu_pids():
            return True
        time.sleep(0.05)
    return False
