"""The built-in runtime clients' response streaming, case by case (the conformance suite runs
the main cases on every sandbox; these are the clients' own rules, so the process sandbox)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from impuls.sandbox.base import Instance
from impuls.sandbox.runtime_api import HTTP_INTEGRATION_CONTENT_TYPE, ResponseStream, RuntimeReply
from tests.helpers import invocation
from tests.sandbox.conftest import SpecFactory, run
from tests.sandbox.test_conformance import running

NODE = """
const { pipeline, Readable } = require("stream");
const { promisify } = require("util");

exports.handler = awslambda.streamifyResponse(async (event, responseStream) => {
  switch (event.case) {
    case "pipeline":
      await promisify(pipeline)(Readable.from(["a", "b", "c"]), responseStream);
      return;
    case "prelude-only":
      awslambda.HttpResponseStream.from(responseStream, {statusCode: 204}).end();
      return;
    case "throw-before-any-write":
      awslambda.HttpResponseStream.from(responseStream, {statusCode: 200});
      throw new RangeError("nothing written");
    case "left-open":
      responseStream.write("open");
      return;
    case "objects":
      responseStream.write({k: 1});
      responseStream.end();
      return;
    case "late-content-type":
      responseStream.write("x");
      responseStream.setContentType("text/html");
      return;
    case "destroy":
      responseStream.write("before");
      responseStream.destroy(new SyntaxError("destroyed"));
      return;
    case "crash":
      responseStream.write("doomed");
      setTimeout(() => { throw new EvalError("uncaught"); }, 10);
      await new Promise(() => {});
  }
});
"""

NODE_SYNC = """
exports.handler = awslambda.streamifyResponse((event, responseStream) => {
  responseStream.write("sync");
});
"""

PYTHON = """
import asyncio

async def agen(event):
    yield "a"
    await asyncio.sleep(0)
    yield b"b"

def gen(event):
    case = event["case"]
    if case == "empty":
        return
    if case == "prelude-only":
        yield {"statusCode": 204}
        return
    if case == "bad-item":
        yield "ok"
        yield 42
    if case == "raise-before-any-item":
        raise ValueError("nothing yielded")
    if case == "bytes-kinds":
        yield bytearray(b"ba")
        yield memoryview(b"mv")
        yield ""
        yield "é"

def handler(event, context):
    if event["case"] == "async":
        return agen(event)
    return gen(event)
"""


async def stream_call(inst: Instance, event: object) -> tuple[RuntimeReply, ResponseStream, bool, bytes]:
    inv = invocation(event, 10.0)
    stream = inv.stream = ResponseStream()
    reply = await inst.invoke(inv, 10.0)
    started = await stream.started()
    body = b"".join([piece async for piece in stream])
    return reply, stream, started, body


def test_python_generators(make_spec: SpecFactory, world_dir: Path) -> None:
    async def scenario() -> None:
        async with running("process", world_dir, make_spec({"handler.py": PYTHON})) as inst:
            reply, _, started, body = await stream_call(inst, {"case": "async"})
            assert reply == RuntimeReply(True, b"", streamed=True) and started and body == b"ab"

            reply, stream, started, body = await stream_call(inst, {"case": "empty"})
            assert reply.ok and started and body == b""  # an empty stream is still a stream
            assert stream.content_type == "application/octet-stream"

            reply, stream, started, body = await stream_call(inst, {"case": "prelude-only"})
            assert reply.ok and started and stream.content_type == HTTP_INTEGRATION_CONTENT_TYPE
            assert json.loads(body[:-8]) == {"statusCode": 204} and body.endswith(b"\0" * 8)

            reply, stream, started, body = await stream_call(inst, {"case": "bad-item"})
            assert not reply.ok and reply.error_type == "Runtime.MarshalError" and reply.streamed
            assert started and body == b"ok" and "int" in stream.error_message

            reply, stream, started, body = await stream_call(inst, {"case": "raise-before-any-item"})
            assert not reply.ok and reply.error_type == "ValueError"
            assert not started and body == b""  # nothing streamed: a plain function error
            assert json.loads(reply.body)["errorMessage"] == "nothing yielded"

            reply, _, _, body = await stream_call(inst, {"case": "bytes-kinds"})
            assert reply.ok and body == "bamvé".encode()

    run(scenario())


def test_python_prelude_only_reads_back(make_spec: SpecFactory, world_dir: Path) -> None:
    async def scenario() -> None:
        async with running("process", world_dir, make_spec({"handler.py": PYTHON})) as inst:
            inv = invocation({"case": "prelude-only"}, 10.0)
            stream = inv.stream = ResponseStream()
            assert (await inst.invoke(inv, 10.0)).ok
            assert await stream.read_prelude() == {"statusCode": 204}
            assert await stream.read() == b""

    run(scenario())


def test_node_response_streams(make_spec: SpecFactory, world_dir: Path) -> None:
    async def scenario() -> None:
        async with running("process", world_dir, make_spec({"index.js": NODE}, runtime="nodejs20")) as inst:
            reply, _, started, body = await stream_call(inst, {"case": "pipeline"})
            assert reply.ok and reply.streamed and started and body == b"abc"

            inv = invocation({"case": "prelude-only"}, 10.0)
            stream = inv.stream = ResponseStream()
            assert (await inst.invoke(inv, 10.0)).ok  # the prelude goes even with no body
            assert await stream.read_prelude() == {"statusCode": 204} and await stream.read() == b""

            reply, stream, started, _ = await stream_call(inst, {"case": "throw-before-any-write"})
            assert not reply.ok and reply.error_type == "RangeError" and not started
            assert stream.size == 0  # no prelude for a response that failed before its body

            reply, _, started, body = await stream_call(inst, {"case": "left-open"})
            assert reply.ok and body == b"open"  # ended for the handler when it resolved

            reply, _, _, body = await stream_call(inst, {"case": "objects"})
            assert reply.ok and json.loads(body) == {"k": 1}

            reply, stream, started, body = await stream_call(inst, {"case": "late-content-type"})
            assert not reply.ok and reply.error_type == "Runtime.InvalidStreamingOperation"
            assert started and body == b"x" and stream.content_type == "application/octet-stream"

            reply, stream, _, body = await stream_call(inst, {"case": "destroy"})
            assert not reply.ok and reply.error_type == "SyntaxError" and body == b"before"

            reply, stream, _, body = await stream_call(inst, {"case": "crash"})
            assert not reply.ok and reply.error_type == "EvalError" and body == b"doomed"
            assert stream.error_message == "uncaught"
            assert await inst.exited == 129  # an uncaught exception still ends the runtime

    run(scenario())


def test_node_streaming_handler_must_be_async(make_spec: SpecFactory, world_dir: Path) -> None:
    async def scenario() -> None:
        spec = make_spec({"index.js": NODE_SYNC}, runtime="nodejs20")
        async with running("process", world_dir, spec) as inst:
            reply, _, _, _ = await stream_call(inst, {})
            assert not reply.ok and reply.error_type == "Runtime.InvalidStreamingOperation"
            assert json.loads(reply.body)["errorMessage"] == "Streaming does not support non-async handlers."

    run(scenario())


@pytest.mark.parametrize("runtime", ["python3.11", "nodejs20"])
def test_a_streamed_response_without_a_stream_is_answered_whole(
        make_spec: SpecFactory, world_dir: Path, runtime: str) -> None:
    files = {"handler.py": PYTHON} if runtime == "python3.11" else {"index.js": NODE}
    event = {"case": "async"} if runtime == "python3.11" else {"case": "pipeline"}
    expected = b"ab" if runtime == "python3.11" else b"abc"

    async def scenario() -> None:
        async with running("process", world_dir, make_spec(files, runtime=runtime)) as inst:
            assert await inst.invoke(invocation(event, 10.0), 10.0) == RuntimeReply(True, expected)

    run(scenario())
