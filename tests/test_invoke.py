"""Invoking functions through a real server with real runtime processes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Server, make_zip

PY = "handler.handler"
NODE = "index.handler"

PY_ECHO = """
import os
print("init line")
CALLS = 0
def handler(event, context):
    global CALLS
    CALLS += 1
    print("handling", event)
    return {"event": event, "calls": CALLS, "request_id": context.aws_request_id,
            "function_name": context.function_name, "memory": context.memory_limit_in_mb,
            "remaining": context.get_remaining_time_in_millis(),
            "arn": context.invoked_function_arn}
"""
NODE_ECHO = """
console.log("init line");
let calls = 0;
exports.handler = async (event, context) => {
  calls += 1;
  console.log("handling", JSON.stringify(event));
  return {event, calls, request_id: context.awsRequestId, function_name: context.functionName,
          memory: Number(context.memoryLimitInMB), remaining: context.getRemainingTimeInMillis(),
          arn: context.invokedFunctionArn};
};
"""

SOURCES: dict[str, dict[str, str]] = {
    "python3.11": {
        "echo": PY_ECHO,
        "raise": "def handler(e, c):\n    raise ValueError('broken ' + str(e.get('x')))\n",
        "syntax": "def handler(e, c)\n    return 1\n",
        "import": "import not_a_module_anywhere\ndef handler(e, c):\n    return 1\n",
        "nohandler": "def other(e, c):\n    return 1\n",
        "sleep": "import time\ndef handler(e, c):\n    time.sleep(e.get('s', 10))\n    return 'woke'\n",
        "crash": "import os\ndef handler(e, c):\n    print('dying now', flush=True)\n    os._exit(7)\n",
        "env": "import os\ndef handler(e, c):\n    return dict(os.environ)\n",
        "big": "def handler(e, c):\n    return 'x' * (7 * 1024 * 1024)\n",
        "unserialisable": "def handler(e, c):\n    return {'s': {1, 2}}\n",
        "version": "def handler(e, c):\n    return 'v1'\n",
    },
    "nodejs20": {
        "echo": NODE_ECHO,
        "raise": "exports.handler = async (e) => { throw new RangeError('broken ' + e.x); };\n",
        "syntax": "exports.handler = async (e => 1;\n",
        "import": "require('not-a-module-anywhere');\nexports.handler = async () => 1;\n",
        "nohandler": "exports.other = async () => 1;\n",
        "sleep": "exports.handler = async (e) => { await new Promise(r => setTimeout(r, (e.s ?? 10) * 1000));"
                 " return 'woke'; };\n",
        "crash": "exports.handler = async () => { console.log('dying now'); process.exit(7); };\n",
        "env": "exports.handler = async () => process.env;\n",
        "big": "exports.handler = async () => 'x'.repeat(7 * 1024 * 1024);\n",
        "unserialisable": "exports.handler = async () => ({n: 10n});\n",
        "version": "exports.handler = async () => 'v1';\n",
    },
}
RAISE_TYPE = {"python3.11": "ValueError", "nodejs20": "RangeError"}


@pytest.fixture(scope="module", params=["python3.11", "nodejs20"])
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("invoke") / "data", env={"IMPULS_TEST_SERVER_SECRET": "s3cr3t"},
                    args=["--allow-local"]).start()
    yield server
    server.stop()


def deploy(server: Server, runtime: str, kind: str, **over: Any) -> str:
    handler = PY if runtime == "python3.11" else NODE
    fn = server.deploy(runtime=runtime, handler=handler, code=SOURCES[runtime][kind], **over)
    return str(fn["name"])


def test_success_context_logs_and_warm_reuse(srv: Server, runtime: str) -> None:
    name = deploy(srv, runtime, "echo", memory_mb=256, timeout_sec=7)
    r = srv.invoke(name, {"hello": "world"})
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["status_code"] == 200 and first["cold_start"] is True
    body = first["body"]
    assert body["event"] == {"hello": "world"} and body["calls"] == 1
    assert body["request_id"] == first["request_id"] and body["function_name"] == name
    assert body["memory"] == 256 and 0 < body["remaining"] <= 7000
    assert body["arn"].endswith(f":function:{name}")
    assert "init line" in first["logs"] and "handling" in first["logs"]
    assert first["duration_ms"] > 0
    second = srv.invoke(name).json()  # empty body is {}
    assert second["cold_start"] is False and second["body"]["calls"] == 2
    assert second["body"]["event"] == {} and "init line" not in second["logs"]


def test_handler_error(srv: Server, runtime: str) -> None:
    name = deploy(srv, runtime, "raise")
    r = srv.invoke(name, {"x": 5})
    assert r.status_code == 200
    doc = r.json()
    assert doc["status_code"] == 500 and doc["error_type"] == RAISE_TYPE[runtime]
    assert doc["error"] == "broken 5" and isinstance(doc["stack"], list) and doc["stack"]
    assert doc["request_id"] and "logs" in doc


@pytest.mark.parametrize(("kind", "error_type"), [
    ("syntax", "Runtime.UserCodeSyntaxError"),
    ("import", "Runtime.ImportModuleError"),
    ("nohandler", "Runtime.HandlerNotFound"),
])
def test_init_errors(srv: Server, runtime: str, kind: str, error_type: str) -> None:
    name = deploy(srv, runtime, kind)
    r = srv.invoke(name, {})
    assert r.status_code == 200
    doc = r.json()
    assert doc["status_code"] == 500 and doc["error_type"] == error_type, doc
    assert doc["logs"], "the runtime's output is returned"


def test_timeout_destroys_instance(srv: Server, runtime: str) -> None:
    name = deploy(srv, runtime, "sleep", timeout_sec=1)
    started = time.monotonic()
    r = srv.invoke(name, {"s": 30})
    assert r.status_code == 504
    assert r.json()["error_type"] == "Sandbox.Timeout"
    assert time.monotonic() - started < 10
    r = srv.invoke(name, {"s": 0})
    assert r.status_code == 200 and r.json()["body"] == "woke" and r.json()["cold_start"] is True


def test_runtime_crash(srv: Server, runtime: str) -> None:
    name = deploy(srv, runtime, "crash")
    r = srv.invoke(name)
    assert r.status_code == 502
    doc = r.json()
    assert doc["error_type"] == "Runtime.ExitError" and "dying now" in doc["logs"]


def test_server_environment_is_invisible(srv: Server, runtime: str) -> None:
    name = deploy(srv, runtime, "env", environment={"MINE": "yes"})
    env = srv.invoke(name).json()["body"]
    assert env["MINE"] == "yes" and env["AWS_LAMBDA_FUNCTION_NAME"] == name
    assert "IMPULS_TEST_SERVER_SECRET" not in env and "s3cr3t" not in json.dumps(env)
    assert not any(k.startswith("IMPULS_") for k in env)


def test_response_limits(srv: Server, runtime: str) -> None:
    name = deploy(srv, runtime, "big")
    doc = srv.invoke(name).json()
    assert doc["status_code"] == 500 and doc["error_type"] == "Function.ResponseSizeTooLarge"
    name = deploy(srv, runtime, "unserialisable")
    doc = srv.invoke(name).json()
    assert doc["status_code"] == 500 and doc["error_type"] == "Runtime.MarshalError"
    assert srv.invoke(name).json()["error_type"] == "Runtime.MarshalError"  # instance survived


def test_update_while_warm_runs_new_code(srv: Server, runtime: str) -> None:
    name = deploy(srv, runtime, "version")
    assert srv.invoke(name).json()["body"] == "v1"
    assert srv.invoke(name).json()["cold_start"] is False
    new = SOURCES[runtime]["version"].replace("v1", "v2")
    assert srv.request("PATCH", f"/api/v1/functions/{name}", json={"code": new}).status_code == 200
    doc = srv.invoke(name).json()
    assert doc["body"] == "v2" and doc["cold_start"] is True
    assert srv.request("PATCH", f"/api/v1/functions/{name}",
                       json={"environment": {"A": "1"}}).status_code == 200
    assert srv.invoke(name).json()["cold_start"] is True  # configuration change retires too


def test_request_errors(srv: Server) -> None:
    assert srv.invoke("no-such-function").status_code == 404
    name = deploy(srv, "python3.11", "echo", status="inactive")
    r = srv.invoke(name)
    assert r.status_code == 403 and r.json()["error"] is True
    name = deploy(srv, "python3.11", "echo")
    r = srv.client.post(f"/api/v1/functions/{name}/invoke", content=b"{broken")
    assert r.status_code == 400 and r.json()["error"] is True
    r = srv.client.post(f"/api/v1/functions/{name}/invoke", content=b'"' + b"x" * (6 * 1024 * 1024) + b'"')
    assert r.status_code == 413
    for event in (42, "text", [1, 2], None):
        doc = srv.client.post(f"/api/v1/functions/{name}/invoke", content=json.dumps(event)).json()
        assert doc["body"]["event"] == event


def test_local_mode(srv: Server, tmp_path: Path) -> None:
    name = deploy(srv, "python3.11", "echo")
    r = srv.invoke(name, {"a": 1}, local="true")
    assert r.status_code == 200 and r.json()["body"]["event"] == {"a": 1}


def test_local_mode_refused_without_flag(make_server: Callable[..., Server]) -> None:
    server = make_server()
    name = deploy(server, "python3.11", "echo")
    r = server.invoke(name, {}, local="true")
    assert r.status_code == 403 and "--allow-local" in r.json()["message"]


def test_python_async_handler_and_node_variants(srv: Server) -> None:
    name = srv.deploy(runtime="python3.11", handler="handler.handler",
                      code="import asyncio\nasync def handler(e, c):\n    await asyncio.sleep(0)\n"
                           "    return 'async ok'\n")["name"]
    assert srv.invoke(name).json()["body"] == "async ok"
    cb = srv.deploy(runtime="nodejs20", handler="index.handler",
                    code="exports.handler = (e, c, cb) => cb(null, {via: 'callback'});\n")["name"]
    assert srv.invoke(cb).json()["body"] == {"via": "callback"}
    esm = srv.deploy(runtime="nodejs20", handler="app.handler",
                     code_zip=make_zip({"app.mjs": "export const handler = async () => 'esm ok';\n"}))
    assert srv.invoke(esm["name"]).json()["body"] == "esm ok"
    nested = srv.deploy(runtime="python3.11", handler="pkg/mod.handler",
                        code_zip=make_zip({"pkg/mod.py": "from pkg.util import V\ndef handler(e, c):\n"
                                                          "    return V\n", "pkg/util.py": "V = 'nested'\n"}))
    assert srv.invoke(nested["name"]).json()["body"] == "nested"


def test_invocation_records_and_logs(srv: Server) -> None:
    name = deploy(srv, "python3.11", "echo")
    ids = [srv.invoke(name, {"i": i}).json()["request_id"] for i in range(3)]
    r = srv.request("GET", f"/api/v1/functions/{name}/invocations", params={"limit": 2})
    assert r.status_code == 200
    data = r.json()
    assert data["total"] == 3 and [x["request_id"] for x in data["invocations"]] == ids[::-1][:2]
    rec = data["invocations"][0]
    assert rec["outcome"] == "success" and rec["cold_start"] is False and "handling" in rec["logs"]
    page2 = srv.request("GET", f"/api/v1/functions/{name}/invocations",
                        params={"limit": 2, "offset": 2}).json()
    assert [x["request_id"] for x in page2["invocations"]] == ids[:1]
    logs = srv.request("GET", f"/api/v1/functions/{name}/logs").json()["logs"]
    assert [x["request_id"] for x in logs] == ids and "init line" in logs[0]["logs"]
    assert srv.request("GET", "/api/v1/functions/nope/invocations").status_code == 404


def test_logs_follow_streams_live_output(srv: Server) -> None:
    name = deploy(srv, "python3.11", "echo")
    lines: list[str] = []
    ready = threading.Event()

    def follow() -> None:
        with srv.client.stream("GET", f"/api/v1/functions/{name}/logs",
                               params={"follow": "true"}, timeout=30) as resp:
            for line in resp.iter_lines():
                ready.set()
                if line.startswith("data: "):
                    lines.append(json.loads(line[6:])["text"])
                    if "handling" in "".join(lines):
                        return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    assert ready.wait(10)
    srv.invoke(name, {"live": True})
    t.join(10)
    assert "handling {'live': True}" in "".join(lines)


def test_big_output_is_capped(srv: Server) -> None:
    code = ("import sys\ndef handler(e, c):\n    chunk = 'y' * 1023 + '\\n'\n"
            "    for _ in range(100 * 1024):\n        sys.stdout.write(chunk)\n"
            "    print('END')\n    return 'done'\n")
    name = srv.deploy(runtime="python3.11", handler="handler.handler", code=code, timeout_sec=60)["name"]
    doc = srv.invoke(name).json()
    assert doc["body"] == "done" and len(doc["logs"]) <= 4096 and doc["logs"].endswith("END\n")
    rec = srv.request("GET", f"/api/v1/functions/{name}/invocations").json()["invocations"][0]
    assert rec["logs_truncated"] is True and len(rec["logs"]) <= 64 * 1024


def test_throttling(make_server: Callable[..., Server]) -> None:
    server = make_server(env={"IMPULS_QUEUE_SIZE": "1", "IMPULS_QUEUE_TIMEOUT": "30"})
    name = deploy(server, "python3.11", "sleep", max_concurrency=1)
    results: list[int] = []

    def call(seconds: float) -> None:
        results.append(httpx.post(f"{server.url}/api/v1/functions/{name}/invoke", json={"s": seconds},
                                  timeout=60, headers=server.client.headers).status_code)

    running = threading.Thread(target=call, args=(2,))
    running.start()
    _wait_for(lambda: _busy(server) >= 1)
    queued = threading.Thread(target=call, args=(0,))
    queued.start()
    _wait_for(lambda: _queued(server) >= 1)
    r = server.invoke(name, {"s": 0})
    assert r.status_code == 429 and r.json()["error"] is True and "max_concurrency" in r.json()["message"]
    running.join()
    queued.join()
    assert sorted(results) == [200, 200]  # the queued call ran once a slot was free


def _busy(server: Server) -> int:
    return int(server.request("GET", "/health").json()["engine"]["inflight"])


def _queued(server: Server) -> int:
    return int(server.request("GET", "/health").json()["engine"]["queued"])


def _wait_for(cond: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_idle_instances_expire(make_server: Callable[..., Server]) -> None:
    server = make_server(env={"IMPULS_IDLE_TIMEOUT": "0.5"}, args=["--sandbox", "process"])
    name = deploy(server, "python3.11", "echo")
    assert server.invoke(name).json()["cold_start"] is True
    assert server.invoke(name).json()["cold_start"] is False
    _wait_for(lambda: server.request("GET", "/health").json()["engine"]["instances"] == 0)
    assert not server.processes_in_data_dir()  # scaled to zero: no runtime process left
    assert server.invoke(name).json()["cold_start"] is True


def test_failing_init_is_not_restarted_in_a_loop(make_server: Callable[..., Server], tmp_path: Path) -> None:
    server = make_server(args=["--sandbox", "process"])
    marker = tmp_path / "inits"
    code = f"open({str(marker)!r}, 'a').write('x')\nraise RuntimeError('init fails')\n"
    name = server.deploy(runtime="python3.11", handler="handler.handler", code=code)["name"]
    for _ in range(10):
        doc = server.invoke(name).json()
        assert doc["status_code"] == 500 and doc["error"] == "init fails"
    assert len(marker.read_text()) <= 2


def test_sigterm_drains_in_flight_calls(make_server: Callable[..., Server]) -> None:
    server = make_server(args=["--sandbox", "process"])
    name = deploy(server, "python3.11", "sleep")
    warm = deploy(server, "python3.11", "echo")
    server.invoke(warm)
    result: list[httpx.Response] = []
    t = threading.Thread(target=lambda: result.append(server.invoke(name, {"s": 1.5})))
    t.start()
    _wait_for(lambda: _busy(server) >= 1)
    assert server.stop() in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown
    t.join()
    assert result[0].status_code == 200 and result[0].json()["body"] == "woke"
    assert not server.processes_in_data_dir()


def test_orphans_are_reaped_after_sigkill(make_server: Callable[..., Server]) -> None:
    server = make_server(args=["--sandbox", "process"])
    names = [deploy(server, "python3.11", "echo") for _ in range(3)]
    for name in names:
        server.invoke(name)
    assert len(server.processes_in_data_dir()) >= 3
    server.kill()
    again = make_server(args=["--sandbox", "process"], data_dir=server.data_dir)
    assert not again.processes_in_data_dir()
    assert again.invoke(names[0]).json()["cold_start"] is True



def test_old_invocation_records_are_pruned(make_server: Callable[..., Server]) -> None:
    server = make_server(env={"IMPULS_INVOCATION_RETENTION_DAYS": "0.00002"})  # ~1.7 s
    name = deploy(server, "python3.11", "echo")
    server.invoke(name)
    path = f"/api/v1/functions/{name}/invocations"
    assert server.request("GET", path).json()["total"] == 1
    _wait_for(lambda: server.request("GET", path).json()["total"] == 0, timeout=30)


RSS_HANDLERS = {
    "python3.11": ("handler.handler", "def handler(event, context):\n"
                   "    return int(open('/proc/self/statm').read().split()[1]) * 4096\n"),
}


@pytest.mark.parametrize("runtime_id", sorted(RSS_HANDLERS))
def test_a_warm_runtime_does_not_grow_with_its_calls(tmp_path: Path, runtime_id: str) -> None:
    """Thousands of calls on one instance leave its resident memory where it was (each call
    brings a new trace id; put in the environment with setenv() it stayed there: ~120 bytes
    a call, so a long-lived instance ran into its memory limit).  The process sandbox: an
    instance forked from a version template has free heap pages to hide a slow growth in."""
    server = Server(tmp_path / "data", args=["--sandbox", "process"]).start()
    try:
        handler, code = RSS_HANDLERS[runtime_id]
        name = server.deploy(runtime=runtime_id, handler=handler, code=code, max_concurrency=1)["name"]

        def rss() -> int:
            r = server.invoke(name, {})
            assert r.status_code == 200, r.text
            return int(r.json()["body"])

        for _ in range(300):  # the allocator settles
            rss()
        before = rss()
        for _ in range(3000):
            rss()
        grown = rss() - before
        assert grown < 150 * 1024, f"the runtime grew by {grown} bytes over 3,000 calls"
    finally:
        server.stop()


NODE_TRACE_ENV = """
const { execFileSync } = require('child_process');
exports.handler = async () => {
  const trace = process.env._X_AMZN_TRACE_ID;
  process.env.TZ = 'Asia/Tokyo';
  process.env.MINE = 7;
  return {trace, has: '_X_AMZN_TRACE_ID' in process.env,
          listed: Object.keys(process.env).includes('_X_AMZN_TRACE_ID'),
          child: execFileSync('/usr/bin/env').toString().split('\\n').filter(
            (line) => line.startsWith('_X_AMZN_TRACE_ID=') || line.startsWith('MINE=')),
          hour: new Date(0).getHours(), mine: process.env.MINE};
};
"""


def test_node_sees_each_calls_trace_id_in_its_environment(srv: Server) -> None:
    """The Node.js runtime keeps the trace id out of the C environment (setenv() grew the
    process with every call) yet the function, and a process it starts, see it as before;
    other variables it sets still take effect (TZ)."""
    name = srv.deploy(runtime="nodejs20", handler="index.handler", code=NODE_TRACE_ENV)["name"]
    seen = []
    for _ in range(2):
        r = srv.invoke(name, {})
        assert r.status_code == 200, r.text
        body = r.json()["body"]
        trace = body["trace"]
        assert trace and trace.startswith("Root=1-") and body["has"] and body["listed"], body
        assert sorted(body["child"]) == ["MINE=7", f"_X_AMZN_TRACE_ID={trace}"], body
        assert body["hour"] == 9 and body["mine"] == "7", body
        seen.append(trace)
    assert seen[0] != seen[1]
