"""Fixtures: real servers on free ports, on SQLite or PostgreSQL.

Under CI (``CI=true``), where ``scripts/setup`` installed everything, a skipped
test is a failure: a skip there means an install step is missing.  Tests whose
skip depends on the kind of host (cgroup v1 or v2, the CPU) say so with the
``host_variant`` marker.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import Server

POSTGRES_URL = os.environ.get("IMPULS_TEST_POSTGRES_URL")
QEMU = shutil.which("qemu-system-x86_64")
DEFAULT_IMAGES = Path("/var/tmp/impuls-images")
StoreEnv = Callable[[], dict[str, str]]
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if (IN_CI and report.skipped and not hasattr(report, "wasxfail")
            and item.get_closest_marker("host_variant") is None):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI ({reason}): CI installs everything the suite needs"


class PostgresDatabases:
    """Creates empty PostgreSQL databases on demand; drops them all at the end."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.names: list[str] = []

    def new(self) -> dict[str, str]:
        import psycopg

        name = f"impuls_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        return {"IMPULS_DATABASE_URL": f"{self.admin_url.rpartition('/')[0]}/{name}"}

    def drop_all(self) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for name in self.names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module",
                params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def new_store(request: pytest.FixtureRequest) -> Iterator[StoreEnv]:
    """Factory of environments, each selecting a new empty store of the kind under test."""
    if request.param == "sqlite":
        yield dict
        return
    if not POSTGRES_URL:
        pytest.skip("IMPULS_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL and sets it)")
    dbs = PostgresDatabases(POSTGRES_URL)
    yield dbs.new
    dbs.drop_all()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Factory: ``make_server(env=..., args=...)`` starts a server; all are stopped at the end."""
    servers: list[Server] = []

    def factory(env: dict[str, str] | None = None, args: list[str] | None = None,
                data_dir: Path | None = None, https: bool = False) -> Server:
        server = Server(data_dir or tmp_path / f"data{len(servers)}", env=env, args=args,
                        https=https).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        if server.proc and server.proc.poll() is None:
            server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, new_store: StoreEnv) -> Iterator[Server]:
    """A running server on the store under test, shared by a test module."""
    srv = Server(tmp_path_factory.mktemp("server") / "data", env=new_store()).start()
    yield srv
    srv.stop()


@pytest.fixture
def store_env(new_store: StoreEnv) -> dict[str, str]:
    """An environment selecting a new empty store of the kind under test."""
    return new_store()


@pytest.fixture
def fresh_server(make_server: Callable[..., Server], store_env: dict[str, str]) -> Server:
    """A running server with an empty store, for this test alone."""
    return make_server(env=store_env)


@pytest.fixture(scope="session")
def images_dir(pytestconfig: pytest.Config) -> Path:
    """The microVM guest images, built (or confirmed up to date) once per test run.

    ``IMPULS_IMAGES_DIR`` (default /var/tmp/impuls-images) is set for the whole
    run, so drivers and servers made by tests find the images.
    """
    from impuls.images.builder import Builder
    from impuls.sandbox.microvm.images import ImageStore

    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    root = Path(os.environ.get("IMPULS_IMAGES_DIR") or DEFAULT_IMAGES)
    os.environ["IMPULS_IMAGES_DIR"] = str(root)
    started = time.monotonic()
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def progress(line: str) -> None:  # a first build takes a while: show it, even under capture
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(f"\n[microvm images {time.monotonic() - started:5.1f}s] {line}", end="", flush=True)

    Builder(ImageStore(root), progress).build()
    return root
