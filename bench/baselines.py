"""The two baselines, each a small HTTP server run as its own process by the harness.

Both speak the same request and reply as Impuls's invoke endpoint
(``POST <any path>`` with the event as JSON; reply
``{"status_code":200,"body":...,"duration_ms":...,"logs":"","request_id":...,"cold_start":...}``)
and both use the same HTTP server as Impuls itself: uvicorn with uvloop and
httptools, one worker, access log off, but no framework (a bare ASGI
callable). So the only difference from Impuls is what happens between
receiving the event and replying.

``floor``
    the handler imported once and called in-process: the least any HTTP
    function server on this machine can cost.
``fastapi``
    the floor's in-process handler behind a FastAPI route instead of the bare
    ASGI callable (informational: what the web framework alone costs).
``spawn``
    the original Impuls local mode, spawn-per-call: every request writes a
    runner script (and the handler) to a fresh temp dir and runs a fresh
    ``python3`` (the same interpreter as Impuls's python3.11 runtime) that
    imports the handler, calls it and prints the result, which is returned.

Run: ``python -m bench.baselines {floor,spawn} --port P --code-file F [--python PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
Invoke = Callable[[bytes, str], Awaitable[tuple[bool, Any, str]]]

RUNNER = """\
import json
import sys

sys.path.insert(0, {directory!r})
from handler import handler


class Context:
    aws_request_id = {request_id!r}
    function_name = "spawn-per-call"
    function_version = "$LATEST"
    memory_limit_in_mb = 128


event = json.loads(sys.stdin.buffer.read() or b"{{}}")
sys.stdout.write(json.dumps({{"result": handler(event, Context())}}))
"""


class Context:
    """The handful of context attributes a Python handler may read."""

    function_name = "floor"
    function_version = "$LATEST"
    memory_limit_in_mb = 128
    invoked_function_arn = "arn:aws:lambda:us-east-1:000000000000:function:floor"

    def __init__(self, request_id: str) -> None:
        self.aws_request_id = request_id

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 30_000


def load_handler(code_file: Path) -> Callable[[Any, Any], Any]:
    spec = importlib.util.spec_from_file_location("handler", code_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.handler  # type: ignore[no-any-return]


def floor_invoke(code_file: Path) -> Invoke:
    handler = load_handler(code_file)

    async def invoke(payload: bytes, request_id: str) -> tuple[bool, Any, str]:
        return True, handler(json.loads(payload), Context(request_id)), ""

    return invoke


def spawn_invoke(code_file: Path, python: str) -> Invoke:
    code = code_file.read_text()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}

    async def invoke(payload: bytes, request_id: str) -> tuple[bool, Any, str]:
        work = Path(tempfile.mkdtemp(prefix="impuls-spawn-"))
        try:
            (work / "handler.py").write_text(code)
            (work / "runner.py").write_text(RUNNER.format(directory=str(work), request_id=request_id))
            proc = await asyncio.create_subprocess_exec(
                python, "runner.py", cwd=work, env=env, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate(payload)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if proc.returncode != 0:
            return False, None, err.decode("utf-8", "replace")
        return True, json.loads(out)["result"], err.decode("utf-8", "replace")

    return invoke


def asgi_app(invoke: Invoke) -> App:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] == "GET":
            await _reply(send, 200, b'{"status":"healthy"}')
            return
        request_id = str(uuid.uuid4())
        t0 = time.perf_counter()
        ok, result, logs = await invoke(body if body.strip() else b"{}", request_id)
        reply: dict[str, Any] = {"status_code": 200 if ok else 500}
        if ok:
            reply["body"] = result
        else:
            reply.update(error="runner failed", error_type="Runtime.ExitError")
        reply.update(duration_ms=round((time.perf_counter() - t0) * 1000, 3), logs=logs[-4096:],
                     request_id=request_id, cold_start=False)
        await _reply(send, 200, json.dumps(reply).encode())

    return app


async def _reply(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def fastapi_app(invoke: Invoke) -> App:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "healthy"}

    @app.post("/invoke")
    async def invoke_route(request: Request) -> Response:
        body = await request.body()
        request_id = str(uuid.uuid4())
        t0 = time.perf_counter()
        _, result, _ = await invoke(body if body.strip() else b"{}", request_id)
        reply = {"status_code": 200, "body": result,
                 "duration_ms": round((time.perf_counter() - t0) * 1000, 3), "logs": "",
                 "request_id": request_id, "cold_start": False}
        return Response(json.dumps(reply).encode(), media_type="application/json")

    return app  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines")
    parser.add_argument("kind", choices=["floor", "fastapi", "spawn"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--code-file", type=Path, required=True, help="the Python handler (handler.py)")
    parser.add_argument("--python", default="/usr/bin/python3", help="interpreter spawned per call")
    args = parser.parse_args()
    if args.kind == "spawn":
        app = asgi_app(spawn_invoke(args.code_file, args.python))
    elif args.kind == "fastapi":
        app = fastapi_app(floor_invoke(args.code_file))
    else:
        app = asgi_app(floor_invoke(args.code_file))
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
