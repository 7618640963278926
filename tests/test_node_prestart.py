"""Node.js runtimes started ahead of time in the namespace sandbox, through a real server.

Once a Node.js instance was started, the sandbox keeps slots where node already runs the runtime
client, waiting with a neutral environment; a cold start hands one the function's environment and
working directory.  These tests check that such an instance behaves exactly like one started for
its function: its own environment and nothing else, ``/var/task`` as working directory, relative
``require`` and ES modules, its own output; and that a function setting a variable node reads only
at its start (``NODE_OPTIONS``) gets a node started for it, with the variable in effect.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Server, make_zip, sandbox_unavailable
from tests.test_sandbox_faults import descendants, records, until

pytestmark = pytest.mark.namespace

AHEAD = "runtime started ahead of time"
PROBE = """const v8 = require('v8');
const { greeting } = require('./lib/greeting');
exports.handler = async (event) => {
  console.log('probe', event.n);
  return {
    greeting: greeting(event.n), cwd: process.cwd(), env: { ...process.env },
    heapMb: v8.getHeapStatistics().heap_size_limit / 1048576,
  };
};
"""
GREETING = "exports.greeting = (n) => `hello ${n}`;\n"
ESM = "export const handler = async (event) => ({ esm: true, n: event.n, cwd: process.cwd() });\n"


@pytest.fixture
def server(make_server: Callable[..., Server], request: pytest.FixtureRequest) -> Server:
    reason = sandbox_unavailable("namespace", request)
    if reason:
        pytest.skip(f"namespace sandbox unavailable: {reason}")
    return make_server(args=["--sandbox", "namespace"])


def waiting_runtimes(server: Server) -> list[int]:
    """node processes of the server started ahead of time and not yet assigned (their working
    directory is still the sandbox's root; an assigned one's is /var/task)."""
    assert server.proc is not None
    found = []
    for pid in descendants(server.proc.pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if b"IMPULS_PRESTART_FD=3" in environ and cwd == "/":
            found.append(pid)
    return found


def deploy_probe(server: Server, runtime: str, env: dict[str, str]) -> str:
    code = make_zip({"index.js": PROBE, "lib/greeting.js": GREETING})
    return str(server.deploy(runtime=runtime, handler="index.handler", code_zip=code,
                             environment=env)["name"])


def cold_call(server: Server, name: str, n: int) -> dict[str, Any]:
    reply = server.invoke(name, {"n": n})
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    assert body["status_code"] == 200 and body["cold_start"] is True, body
    return body


@pytest.mark.parametrize("runtime", ["nodejs20.x", "nodejs22.x"])
def test_an_instance_started_ahead_of_time_is_its_functions_own(server: Server, runtime: str) -> None:
    first = deploy_probe(server, runtime, {"WHO": "first"})
    cold_call(server, first, 0)  # the first node instance: started for it; the pool fills after
    until(lambda: len(waiting_runtimes(server)) >= 2, "two node runtimes started ahead of time")

    names = [deploy_probe(server, runtime, {"WHO": f"fn{i}", "SECRET": f"s{i}"}) for i in range(2)]
    for i, name in enumerate(names):
        body = cold_call(server, name, i + 1)
        result = body["body"]
        assert result["greeting"] == f"hello {i + 1}" and result["cwd"] == "/var/task", result
        env = result["env"]
        assert env["WHO"] == f"fn{i}" and env["SECRET"] == f"s{i}", env
        assert env["AWS_LAMBDA_FUNCTION_NAME"] == name and env["_HANDLER"] == "index.handler"
        assert env["LAMBDA_TASK_ROOT"] == "/var/task" and env["TZ"] == ":UTC"
        # nothing of the waiting runtime's own environment, nor the platform's variables
        assert not {k for k in env if k.startswith("IMPULS_")}, env
        assert "probe " + str(i + 1) in body["logs"], body["logs"]
        (record,) = records(server, name, 1)
        assert AHEAD in record["note"], record
        warm = server.invoke(name, {"n": 9}).json()
        assert warm["cold_start"] is False and warm["body"]["env"]["WHO"] == f"fn{i}"

    esm = server.deploy(runtime=runtime, handler="index.handler",
                        code_zip=make_zip({"index.mjs": ESM}))["name"]
    until(lambda: waiting_runtimes(server), "a node runtime started ahead of time")
    body = cold_call(server, esm, 5)
    assert body["body"] == {"esm": True, "n": 5, "cwd": "/var/task"}
    assert AHEAD in records(server, esm, 1)[0]["note"]


def test_a_function_setting_node_options_gets_a_node_started_for_it(server: Server) -> None:
    warm_up = deploy_probe(server, "nodejs20.x", {})
    cold_call(server, warm_up, 0)
    until(lambda: waiting_runtimes(server), "a node runtime started ahead of time")
    name = deploy_probe(server, "nodejs20.x", {"NODE_OPTIONS": "--max-old-space-size=96"})
    body = cold_call(server, name, 1)
    assert body["body"]["heapMb"] < 200, body["body"]  # the option took effect (else ~4 GB)
    assert AHEAD not in records(server, name, 1)[0]["note"]
    plain = deploy_probe(server, "nodejs20.x", {})
    assert cold_call(server, plain, 2)["body"]["heapMb"] > 1000  # node's default here
