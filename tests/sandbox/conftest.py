"""Drivers under test, and specs built by hand (no server)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from impuls.runtimes import Runtime, default_registry
from impuls.sandbox.base import InstanceSpec
from tests.helpers import sandbox_unavailable

T = TypeVar("T")
DEFAULT_HANDLER = {"python": "handler.handler", "nodejs": "index.handler", "go": "Handler",
                   "java": "example.Handler::handleRequest", "ruby": "function.handler",
                   "dotnet": "Function::Conformance.Function::Handler", "provided": "function.handler"}
BUILD_CACHE = Path(tempfile.gettempdir()) / "impuls-test-build-cache"
DRIVERS = ["process", "namespace", "microvm"]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A temporary directory every uid can reach (sandboxes run as an unprivileged uid)."""
    path = Path(tempfile.mkdtemp(prefix="impuls-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=DRIVERS)
def driver_kind(request: pytest.FixtureRequest) -> str:
    reason = sandbox_unavailable(request.param, request)
    if reason:
        pytest.skip(f"{request.param} sandbox unavailable here: {reason}")
    return str(request.param)


class SpecFactory:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, files: dict[str, str], runtime: str = "python3.11",
                 handler: str | None = None, **over: Any) -> InstanceSpec:
        rt: Runtime = default_registry().resolve(runtime)
        code = self.root / f"code-{uuid.uuid4().hex[:8]}"
        code.mkdir()
        for name, text in files.items():
            (code / name).write_text(text)
        chosen_handler = handler or DEFAULT_HANDLER[rt.language]
        if rt.build is not None:
            rt.build(code, chosen_handler, BUILD_CACHE)
        for path in [code, *code.rglob("*")]:
            path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
        spec = InstanceSpec(
            instance_id=uuid.uuid4().hex[:16], function_name="conformance", revision=1,
            runtime=rt, handler=chosen_handler,
            code_dir=code, memory_mb=128, ephemeral_storage_mb=512,
            environment={"FUNCTION_VAR": "fn-value"},
        )
        return replace(spec, **over)


@pytest.fixture
def make_spec(world_dir: Path) -> SpecFactory:
    return SpecFactory(world_dir)


#: runtimes whose microVM cold start under emulation takes 10-20 s (a JVM, Mono's JIT): on the
#: microvm driver they get the conformance suite's core cases only (a call with output and
#: state kept, a handler error, one init error each); the rest run on process and namespace
SLOW_IN_EMULATION = ("java17", "dotnet-mono")
MICROVM_CORE = ("test_ready_invoke_reuse_and_output", "test_function_error_keeps_instance")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, dropped, seen_init = [], [], set()
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        runtime = params.get("source", params.get("runtime"))
        name = getattr(item, "originalname", item.name)
        slow = params.get("driver_kind") == "microvm" and runtime in SLOW_IN_EMULATION
        if slow and name == "test_init_errors" and runtime not in seen_init:
            seen_init.add(runtime)
        elif slow and name not in MICROVM_CORE:
            dropped.append(item)
            continue
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
