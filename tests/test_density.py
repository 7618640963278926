"""A thousand idle warm instances of a hundred functions on one server (namespace sandbox), every
one of them then answering a warm call -- started under the usual soft limit of 1,024 open files,
which the server raises for itself (functions keep 1,024).

Bounded: 2,000 calls in two rounds.  What it costs in time and memory is the benchmark's density
row (``bench/density.py``), not asserted here.
"""

from __future__ import annotations

import concurrent.futures
import resource
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import Server, sandbox_unavailable

pytestmark = pytest.mark.namespace

FUNCTIONS, PER_FUNCTION = 100, 10
HOLDER = ("import time\n\n\ndef handler(event, context):\n"
          "    time.sleep(event.get('hold', 0))\n    return {'ok': True}\n")
#: a function's calls of a round are sent together, and each holds its instance this long
HOLD_S = 3.0
BATCH = 25


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    reason = sandbox_unavailable("namespace", request)
    if reason:
        pytest.skip(f"namespace sandbox unavailable: {reason}")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    srv = Server(tmp_path / "data", args=["--sandbox", "namespace"],
                 env={"IMPULS_MAX_CONCURRENCY": str(FUNCTIONS * PER_FUNCTION)},
                 wrapper=["/usr/bin/prlimit", f"--nofile=1024:{hard}", "--"]).start(timeout=60)
    yield srv
    srv.stop()


def _open_files_limit(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no open-files line")


def _round(server: Server, names: list[str]) -> list[dict[str, object]]:
    """Every function's ``PER_FUNCTION`` calls, released together (``BATCH`` functions at a time),
    each holding its instance for ``HOLD_S``: each call of a function needs an instance of its own."""
    out: list[dict[str, object]] = []
    auth = {"Authorization": f"Bearer {server.admin_key}"}
    for start in range(0, len(names), BATCH):
        calls = [n for n in names[start:start + BATCH] for _ in range(PER_FUNCTION)]
        together = threading.Barrier(len(calls))

        def call(name: str, together: threading.Barrier = together) -> dict[str, object]:
            with httpx.Client(base_url=server.url, headers=auth, timeout=300) as client:  # one each
                together.wait()  # made first: a client takes milliseconds to make
                r = client.post(f"/api/v1/functions/{name}/invoke", json={"hold": HOLD_S})
            assert r.status_code == 200, r.text
            return dict(r.json())

        with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
            out += pool.map(call, calls)
    return out


def test_a_thousand_warm_instances_answer_warm(server: Server) -> None:
    assert server.proc is not None
    soft, hard = _open_files_limit(server.proc.pid)
    assert soft == hard, "the server raises its soft limit on open files to the hard one"

    names = [f"dense-{i:03d}" for i in range(FUNCTIONS)]
    for name in names:
        server.deploy(name=name, runtime="python3.11", handler="handler.handler", code=HOLDER,
                      max_concurrency=PER_FUNCTION)
    first = _round(server, names)
    assert all(r["status_code"] == 200 for r in first), [r for r in first if r["status_code"] != 200][:3]
    engine = server.request("GET", "/health").json()["engine"]
    assert engine["instances"] == FUNCTIONS * PER_FUNCTION, engine
    assert engine["idle"] == FUNCTIONS * PER_FUNCTION, engine

    second = _round(server, names)
    assert all(r["status_code"] == 200 for r in second)
    cold = [r for r in second if r["cold_start"]]
    assert not cold, f"{len(cold)} of {len(second)} calls of the second round started an instance"
    assert server.request("GET", "/health").json()["engine"]["instances"] == FUNCTIONS * PER_FUNCTION
