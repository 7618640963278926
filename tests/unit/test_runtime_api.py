"""The Runtime API server, driven in-process by a raw HTTP/1.1 client (no runtime, no sandbox).

Every request is written by hand over a plain asyncio stream, as a runtime
client would; every test runs over loopback TCP and over a unix socket.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import stat
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from impuls.errors import InitFailed
from impuls.sandbox import runtime_api
from impuls.sandbox.runtime_api import (
    HTTP_INTEGRATION_CONTENT_TYPE,
    MAX_PRELUDE_BYTES,
    MAX_RESPONSE_BYTES,
    MAX_STREAM_BYTES,
    RESPONSE_TOO_LARGE,
    Invocation,
    ResponseStream,
    RuntimeAPI,
    RuntimeReply,
    parse_error,
)

T = TypeVar("T")
PREFIX = "/2018-06-01/runtime"
NEXT = f"{PREFIX}/invocation/next"
ARN = "arn:aws:lambda:us-east-1:000000000000:function:unit"
STEP = 5.0  # upper bound for any single step; a hang fails the test instead of the run


async def within(aw: Awaitable[T], seconds: float = STEP) -> T:
    return await asyncio.wait_for(aw, seconds)


# --- a raw HTTP/1.1 client ------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    raw: bytes  # exactly the bytes of this response on the wire

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    """One keep-alive connection speaking hand-written HTTP/1.1."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, api: RuntimeAPI) -> RawClient:
        if os.path.isabs(api.address):
            reader, writer = await within(asyncio.open_unix_connection(api.address))
        else:
            host, port = api.address.rsplit(":", 1)
            reader, writer = await within(asyncio.open_connection(host, int(port)))
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, method: str, path: str, body: bytes = b"",
                   headers: dict[str, str] | None = None) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: runtime"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if method != "GET" or body:
            lines.append(f"Content-Length: {len(body)}")
        await self.send_raw(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    async def read_response(self) -> Response:
        head = await within(self.reader.readuntil(b"\r\n\r\n"))
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        version, status, reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1"
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await within(self.reader.readexactly(int(headers["content-length"])))
        return Response(int(status), reason, headers, body, head + body)

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> Response:
        await self.send(method, path, body, headers)
        return await self.read_response()

    async def next(self) -> Response:
        return await self.request("GET", NEXT)

    async def post_response(self, request_id: str, body: bytes) -> Response:
        return await self.request("POST", f"{PREFIX}/invocation/{request_id}/response", body)

    async def at_eof(self) -> bool:
        """True once the server has closed the connection (any further bytes are an error)."""
        rest = await within(self.reader.read())
        assert rest == b"", rest
        return True

    def close(self) -> None:
        self.writer.close()


# --- fixtures ---------------------------------------------------------------------

Listen = Callable[[RuntimeAPI], Awaitable[str]]
Scenario = Callable[[RuntimeAPI, RawClient], Awaitable[None]]


@pytest.fixture(params=["tcp", "unix"])
def listen(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listen]:
    """How the API under test listens: loopback TCP, or a unix socket in a temporary directory."""
    short_dir: str | None = None
    sock_path = tmp_path / "runtime.sock"
    if len(str(sock_path)) > 100:  # sun_path is limited to 108 bytes
        short_dir = tempfile.mkdtemp(prefix="impuls-rt-")
        sock_path = Path(short_dir) / "runtime.sock"

    async def start(api: RuntimeAPI) -> str:
        if request.param == "tcp":
            return await api.listen_tcp()
        return await api.listen_unix(str(sock_path))

    yield start
    if short_dir is not None:
        sock_path.unlink(missing_ok=True)
        os.rmdir(short_dir)




def run(listen: Listen, scenario: Scenario) -> None:
    """Start a RuntimeAPI, connect one raw client, run ``scenario``, close both."""

    async def main() -> None:
        api = RuntimeAPI()
        await listen(api)
        client = await RawClient.connect(api)
        try:
            await scenario(api, client)
        finally:
            client.close()
            api.close()

    asyncio.run(main())


def invocation(payload: bytes = b'{"n":1}', request_id: str | None = None) -> Invocation:
    return Invocation(request_id=request_id or str(uuid.uuid4()), payload=payload,
                      deadline_ms=int(time.time() * 1000) + 3000, function_arn=ARN,
                      trace_id="Root=1-5e1b4151-5ac6c58f5e4b8d4f6a7c1d2e;Sampled=0")


class RecordingTransport:
    """Wraps a server connection's transport and records every ``write``."""

    def __init__(self, inner: asyncio.Transport) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[RecordingTransport]:
    """Every server-side connection made from now on has its transport's writes recorded."""
    made: list[RecordingTransport] = []
    original = runtime_api._Connection.connection_made

    def connection_made(self: Any, transport: asyncio.BaseTransport) -> None:
        original(self, transport)
        self.transport = RecordingTransport(self.transport)
        made.append(self.transport)

    monkeypatch.setattr(runtime_api._Connection, "connection_made", connection_made)
    return made


# --- /next, long-polling, keep-alive ---------------------------------------------


def test_next_long_polls_until_dispatch_and_carries_the_lambda_headers(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        assert not api.ready.done()
        await client.send("GET", NEXT)
        await within(asyncio.shield(api.ready))  # the first /next means init is done
        assert api.ready.result() is None
        pending = asyncio.create_task(client.read_response())
        await asyncio.sleep(0.1)
        assert not pending.done(), "/next must block until an invocation is dispatched"

        inv = invocation(b'{"hello": "world"}')
        api.dispatch(inv)
        r = await within(pending)
        assert r.status == 200
        assert r.headers["content-type"] == "application/json"
        assert r.headers["lambda-runtime-aws-request-id"] == inv.request_id
        assert r.headers["lambda-runtime-deadline-ms"] == str(inv.deadline_ms)
        assert r.headers["lambda-runtime-invoked-function-arn"] == ARN
        assert r.headers["lambda-runtime-trace-id"] == inv.trace_id
        assert r.headers["content-length"] == str(len(inv.payload))
        assert r.body == b'{"hello": "world"}'
        assert not inv.reply.done()

    run(listen, scenario)


def test_dispatch_before_next_is_delivered_on_the_next_poll(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        inv = invocation(b"[1,2,3]")
        api.dispatch(inv)
        r = await client.next()
        assert r.status == 200 and r.body == b"[1,2,3]"
        assert r.headers["lambda-runtime-aws-request-id"] == inv.request_id
        assert api.ready.done() and api.ready.result() is None

    run(listen, scenario)


def test_client_context_is_a_header_of_next_only_when_given(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        inv = invocation()
        inv.client_context = '{"custom":{"k":"v"}}'
        api.dispatch(inv)
        r = await client.next()
        assert r.headers["lambda-runtime-client-context"] == '{"custom":{"k":"v"}}'
        await client.send("POST", f"{PREFIX}/invocation/{inv.request_id}/response", b"{}")
        assert (await client.read_response()).status == 202
        plain = invocation()
        api.dispatch(plain)
        r = await client.next()
        assert "lambda-runtime-client-context" not in r.headers

    run(listen, scenario)


def test_keep_alive_serves_many_invocations_on_one_connection(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        for i in range(5):
            inv = invocation(json.dumps({"i": i}).encode())
            if i % 2:
                api.dispatch(inv)  # already waiting for the runtime
                r = await client.next()
            else:
                await client.send("GET", NEXT)  # the runtime is parked first
                await asyncio.sleep(0.01)
                api.dispatch(inv)
                r = await client.read_response()
            assert r.status == 200 and json.loads(r.body) == {"i": i}
            assert r.headers["lambda-runtime-aws-request-id"] == inv.request_id
            ack = await client.post_response(inv.request_id, f'"result {i}"'.encode())
            assert ack.status == 202
            reply = await within(inv.reply)
            assert reply == RuntimeReply(True, f'"result {i}"'.encode())
        assert len(api._connections) == 1

    run(listen, scenario)


def test_second_dispatch_while_one_is_outstanding_raises(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        first = invocation()
        api.dispatch(first)
        with pytest.raises(RuntimeError, match="already outstanding"):
            api.dispatch(invocation())
        await client.next()
        with pytest.raises(RuntimeError, match="already outstanding"):
            api.dispatch(invocation())  # delivered but not answered: still outstanding
        await client.post_response(first.request_id, b"1")
        await within(first.reply)
        second = invocation(b'"two"')
        api.dispatch(second)  # allowed once the first has its reply
        r = await client.next()
        assert r.headers["lambda-runtime-aws-request-id"] == second.request_id

    run(listen, scenario)


def test_abandoned_invocation_is_forgotten(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        stale = invocation()
        api.dispatch(stale)
        await client.next()
        api.abandon()  # timed out, say
        fresh = invocation(b'"fresh"')
        api.dispatch(fresh)  # no "already outstanding"
        late = await client.post_response(stale.request_id, b'"late"')
        assert late.status == 400
        assert not stale.reply.done()
        r = await client.next()
        assert r.headers["lambda-runtime-aws-request-id"] == fresh.request_id and r.body == b'"fresh"'

    run(listen, scenario)


def test_cancelled_reply_frees_the_instance(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        stale = invocation()
        api.dispatch(stale)
        await client.next()
        stale.reply.cancel()  # the engine gave up on it
        fresh = invocation(b'"fresh"')
        api.dispatch(fresh)
        assert (await client.post_response(stale.request_id, b"1")).status == 400
        assert (await client.next()).body == b'"fresh"'

    run(listen, scenario)


# --- one write per reply -------------------------------------------------------------


def test_every_reply_is_one_transport_write(listen: Listen, recorded: list[RecordingTransport]) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        await within(_until(lambda: len(recorded) == 1))
        transport = recorded[0]

        async def exchange(send: Callable[[], Awaitable[Response]]) -> Response:
            before = len(transport.writes)
            r = await send()
            await asyncio.sleep(0)  # let any straggling second write happen
            assert transport.writes[before:] == [r.raw], "reply not written with one write"
            return r

        # /next: parked then dispatched, and dispatched before polling
        await client.send("GET", NEXT)
        await asyncio.sleep(0.01)
        inv = invocation(b'{"k": "' + b"x" * 5000 + b'"}')
        before = len(transport.writes)
        api.dispatch(inv)
        r = await client.read_response()
        assert transport.writes[before:] == [r.raw] and r.body == inv.payload
        await exchange(lambda: client.post_response(inv.request_id, b'"ok"'))

        inv = invocation(b"{}")
        api.dispatch(inv)
        r = await exchange(client.next)
        assert r.body == b"{}"
        await exchange(lambda: client.request(
            "POST", f"{PREFIX}/invocation/{inv.request_id}/error", b'{"errorType":"E"}'))
        assert (await exchange(lambda: client.post_response("nope", b"1"))).status == 400
        assert (await exchange(lambda: client.request("GET", "/elsewhere"))).status == 404
        assert (await exchange(lambda: client.request("GET", f"{PREFIX}/init/error"))).status == 405
        assert (await exchange(lambda: client.request("POST", f"{PREFIX}/init/error", b"{}"))).status == 202
        r = await exchange(lambda: client.request("GET", NEXT + "\x01"))  # malformed
        assert r.status == 400

    run(listen, scenario)


def test_a_response_pipelined_with_next_is_acknowledged_with_the_next_event(
        listen: Listen, recorded: list[RecordingTransport]) -> None:
    """The Python client sends its response and its next GET /invocation/next in one write:
    the 202 then goes out in the same write as the next event (one wake-up of the runtime
    per invocation), in order; a response sent alone is acknowledged at once."""

    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        await within(_until(lambda: len(recorded) == 1))
        transport = recorded[0]
        first = invocation(b'{"n": 1}')
        api.dispatch(first)
        assert (await client.next()).body == first.payload
        before = len(transport.writes)
        response = (f"POST {PREFIX}/invocation/{first.request_id}/response HTTP/1.1\r\n"
                    f"Host: runtime\r\nContent-Length: 4\r\n\r\n\"ok\"").encode()
        await client.send_raw(response + f"GET {NEXT} HTTP/1.1\r\nHost: runtime\r\n\r\n".encode())
        assert (await within(first.reply)).body == b'"ok"'
        await asyncio.sleep(0.05)
        assert transport.writes[before:] == [], "the 202 went out before the next event"
        second = invocation(b'{"n": 2}')
        api.dispatch(second)
        accepted = await client.read_response()
        event = await client.read_response()
        assert accepted.status == 202 and event.body == second.payload
        assert transport.writes[before:] == [accepted.raw + event.raw]

        second_done = (f"POST {PREFIX}/invocation/{second.request_id}/response HTTP/1.1\r\n"
                       f"Host: runtime\r\nContent-Length: 1\r\n\r\n2").encode()
        await client.send_raw(second_done)  # alone: acknowledged at once
        assert (await client.read_response()).status == 202
        assert (await within(second.reply)).body == b"2"

    run(listen, scenario)


def test_tcp_connections_disable_nagle(recorded: list[RecordingTransport]) -> None:
    async def main() -> None:
        api = RuntimeAPI()
        await api.listen_tcp()
        client = await RawClient.connect(api)
        try:
            await within(_until(lambda: len(recorded) == 1))
            sock = recorded[0].get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            client.close()
            api.close()

    asyncio.run(main())


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.001)


# --- /response and /error ------------------------------------------------------------


def test_response_completes_the_reply_and_is_accepted(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        inv = invocation()
        api.dispatch(inv)
        await client.next()
        body = json.dumps({"statusCode": 200, "body": "é" * 10}).encode()
        ack = await client.post_response(inv.request_id, body)
        assert ack.status == 202
        assert ack.headers["content-type"] == "application/json"
        reply = await within(inv.reply)
        assert reply.ok is True and reply.body == body and reply.error_type is None

    run(listen, scenario)


def test_response_with_an_empty_body(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        inv = invocation()
        api.dispatch(inv)
        await client.next()
        assert (await client.post_response(inv.request_id, b"")).status == 202
        assert await within(inv.reply) == RuntimeReply(True, b"")

    run(listen, scenario)


def test_response_sent_in_fragments_and_chunked(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        inv = invocation()
        api.dispatch(inv)
        await client.next()
        raw = (f"POST {PREFIX}/invocation/{inv.request_id}/response HTTP/1.1\r\n"
               "Host: runtime\r\nTransfer-Encoding: chunked\r\n\r\n"
               "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").encode()
        for i in range(0, len(raw), 7):  # the URL and headers arrive split across reads
            await client.send_raw(raw[i:i + 7])
            await asyncio.sleep(0.001)
        assert (await client.read_response()).status == 202
        assert await within(inv.reply) == RuntimeReply(True, b"hello world")

    run(listen, scenario)


def test_error_gives_a_failed_reply_with_the_error_document(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        inv = invocation()
        api.dispatch(inv)
        await client.next()
        doc = {"errorType": "ValueError", "errorMessage": "bad", "stackTrace": ["line 1"]}
        ack = await client.request("POST", f"{PREFIX}/invocation/{inv.request_id}/error",
                                   json.dumps(doc).encode(),
                                   {"Lambda-Runtime-Function-Error-Type": "Unhandled"})
        assert ack.status == 202
        reply = await within(inv.reply)
        assert reply.ok is False
        assert json.loads(reply.body) == doc
        assert reply.error_type == "Unhandled"
        assert parse_error(reply.body, reply.error_type) == {
            "errorType": "ValueError", "errorMessage": "bad", "stackTrace": ["line 1"]}

    run(listen, scenario)


def test_error_type_header_is_the_fallback(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        inv = invocation()
        api.dispatch(inv)
        await client.next()
        await client.request("POST", f"{PREFIX}/invocation/{inv.request_id}/error",
                             b"segfault, no JSON here",
                             {"lambda-runtime-function-error-type": "Runtime.Crash"})
        reply = await within(inv.reply)
        assert reply.ok is False and reply.error_type == "Runtime.Crash"
        info = parse_error(reply.body, reply.error_type)
        assert info["errorType"] == "Runtime.Crash"
        assert info["errorMessage"] == "segfault, no JSON here"

        # the header belongs to its request only: the next error has none
        inv = invocation()
        api.dispatch(inv)
        await client.next()
        await client.request("POST", f"{PREFIX}/invocation/{inv.request_id}/error", b"{}")
        reply = await within(inv.reply)
        assert reply.error_type is None
        assert parse_error(reply.body, reply.error_type)["errorType"] == "Runtime.Unknown"

    run(listen, scenario)


def test_unknown_or_finished_request_id_is_400(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        r = await client.post_response("no-such-id", b"1")  # nothing dispatched at all
        assert r.status == 400
        assert r.json()["errorType"] == "InvalidRequest"
        assert "no-such-id" in r.json()["errorMessage"]

        inv = invocation()
        api.dispatch(inv)
        await client.next()
        r = await client.post_response(str(uuid.uuid4()), b"1")  # another id
        assert r.status == 400 and r.json()["errorType"] == "InvalidRequest"
        assert not inv.reply.done()
        assert (await client.post_response(inv.request_id, b'"first"')).status == 202
        again = await client.post_response(inv.request_id, b'"second"')  # finished
        assert again.status == 400 and "errorMessage" in again.json()
        err = await client.request("POST", f"{PREFIX}/invocation/{inv.request_id}/error", b"{}")
        assert err.status == 400
        assert (await within(inv.reply)).body == b'"first"'

    run(listen, scenario)


def test_oversized_response_is_response_too_large(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        inv = invocation()
        api.dispatch(inv)
        await client.next()
        r = await client.post_response(inv.request_id, b"x" * (MAX_RESPONSE_BYTES + 1))
        assert r.status in (202, 413)
        reply = await within(inv.reply)
        assert reply.ok is False
        assert reply.error_type == "Function.ResponseSizeTooLarge"  # Lambda's name for it
        assert len(reply.body) <= MAX_RESPONSE_BYTES

        # the connection and the limit are per request: an exactly-at-the-limit body is fine
        inv = invocation()
        api.dispatch(inv)
        await client.next()
        assert (await client.post_response(inv.request_id, b"y" * MAX_RESPONSE_BYTES)).status == 202
        reply = await within(inv.reply)
        assert reply.ok is True and reply.body == b"y" * MAX_RESPONSE_BYTES

    run(listen, scenario)


def test_expect_100_continue_is_answered(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        inv = invocation()
        api.dispatch(inv)
        await client.next()
        await client.send_raw((f"POST {PREFIX}/invocation/{inv.request_id}/response HTTP/1.1\r\n"
                               "Host: runtime\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
                               ).encode())
        interim = await within(client.reader.readuntil(b"\r\n\r\n"), 0.3)
        assert interim.startswith(b"HTTP/1.1 100 ")
        await client.send_raw(b"42")
        assert (await client.read_response()).status == 202
        assert (await within(inv.reply)).body == b"42"

    run(listen, scenario)


# --- streamed responses ---------------------------------------------------------------


class RecordingSink:
    """A StreamSink that records every call, in order; ``seen`` wakes a waiting test."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.flow: Callable[[bool], None] | None = None
        self.seen = asyncio.Event()

    def open(self, content_type: str, flow: Callable[[bool], None] | None) -> None:
        self.events.append(("open", content_type))
        self.flow = flow
        self.seen.set()

    def write(self, chunk: bytes) -> None:
        self.events.append(("write", chunk))
        self.seen.set()

    def close(self, error_type: str | None = None, message: str = "") -> None:
        self.events.append(("close", error_type, message))
        self.seen.set()

    @property
    def body(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "write")

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self.seen.clear()
            await within(self.seen.wait())


def stream_head(request_id: str, content_type: str | None = "text/plain",
                mode: str = "streaming") -> bytes:
    lines = [f"POST {PREFIX}/invocation/{request_id}/response HTTP/1.1", "Host: runtime",
             f"Lambda-Runtime-Function-Response-Mode: {mode}", "Transfer-Encoding: chunked",
             "Trailer: Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


END = b"0\r\n\r\n"


def error_trailers(doc: dict[str, Any], error_type: str | None = None) -> bytes:
    body = base64.b64encode(json.dumps(doc).encode()).decode()
    return (f"0\r\nLambda-Runtime-Function-Error-Type: {error_type or doc['errorType']}\r\n"
            f"Lambda-Runtime-Function-Error-Body: {body}\r\n\r\n").encode()


def streaming_invocation(sink: Any) -> Invocation:
    inv = invocation()
    inv.stream = sink
    return inv


def test_streamed_chunks_reach_the_sink_before_the_request_ends(
        listen: Listen, recorded: list[RecordingTransport]) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        sink = RecordingSink()
        inv = streaming_invocation(sink)
        api.dispatch(inv)
        await client.next()
        await client.send_raw(stream_head(inv.request_id, "text/event-stream"))
        await sink.until(lambda: len(sink.events) == 1)
        assert sink.events == [("open", "text/event-stream")]  # open: before any body
        await client.send_raw(chunk(b"data: one\n\n"))
        await sink.until(lambda: sink.body == b"data: one\n\n")  # the request is still open
        assert not inv.reply.done()
        await client.send_raw(chunk(b"data: two\n\n")[:9])  # a chunk split across reads
        await sink.until(lambda: sink.body == b"data: one\n\ndata: ")
        await client.send_raw(chunk(b"data: two\n\n")[9:])
        await sink.until(lambda: sink.body == b"data: one\n\ndata: two\n\n")
        assert not inv.reply.done()
        before = len(recorded[0].writes)
        await client.send_raw(END)
        ack = await client.read_response()
        assert ack.status == 202 and recorded[0].writes[before:] == [ack.raw]  # one write
        assert await within(inv.reply) == RuntimeReply(True, b"", streamed=True)
        assert sink.events[-1] == ("close", None, "")
        assert [e[0] for e in sink.events] == ["open", "write", "write", "write", "close"]
        # keep-alive: the same connection serves the next invocation, buffered as usual
        plain = invocation()
        api.dispatch(plain)
        await client.next()
        assert (await client.post_response(plain.request_id, b'"ok"')).status == 202
        assert await within(plain.reply) == RuntimeReply(True, b'"ok"')

    run(listen, scenario)


def test_streamed_response_without_content_type_or_body(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        sink = RecordingSink()
        inv = streaming_invocation(sink)
        api.dispatch(inv)
        await client.next()
        await client.send_raw(stream_head(inv.request_id, content_type=None) + END)
        assert (await client.read_response()).status == 202
        assert await within(inv.reply) == RuntimeReply(True, b"", streamed=True)
        assert sink.events == [("open", "application/octet-stream"), ("close", None, "")]

    run(listen, scenario)


def test_error_trailers_end_the_stream_with_the_error(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        sink = RecordingSink()
        inv = streaming_invocation(sink)
        api.dispatch(inv)
        await client.next()
        doc = {"errorType": "TypeError", "errorMessage": "bad after one", "stackTrace": ["at x"]}
        await client.send_raw(stream_head(inv.request_id) + chunk(b"partial"))
        await sink.until(lambda: sink.body == b"partial")
        await client.send_raw(error_trailers(doc))
        assert (await client.read_response()).status == 202
        reply = await within(inv.reply)
        assert reply.ok is False and reply.streamed is True
        assert reply.error_type == "TypeError" and json.loads(reply.body) == doc
        assert sink.events[-1] == ("close", "TypeError", "bad after one")

        # without a readable body the header's type is still the error
        inv = streaming_invocation(sink := RecordingSink())
        api.dispatch(inv)
        await client.next()
        await client.send_raw(stream_head(inv.request_id) +
                              b"0\r\nLambda-Runtime-Function-Error-Type: Runtime.Odd\r\n"
                              b"Lambda-Runtime-Function-Error-Body: %%%\r\n\r\n")
        assert (await client.read_response()).status == 202
        reply = await within(inv.reply)
        assert (reply.ok, reply.error_type, reply.body) == (False, "Runtime.Odd", b"")
        assert sink.events == [("open", "text/plain"), ("close", "Runtime.Odd", "")]

    run(listen, scenario)


def test_streamed_response_is_capped(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        sink = RecordingSink()
        inv = streaming_invocation(sink)
        api.dispatch(inv)
        await client.next()
        await client.send_raw(stream_head(inv.request_id))
        piece = b"z" * (1024 * 1024)
        for _ in range(MAX_STREAM_BYTES // len(piece)):
            await client.send_raw(chunk(piece))
        await sink.until(lambda: len(sink.body) == MAX_STREAM_BYTES)  # exactly at the limit: fine
        assert sink.events[-1][0] == "write"
        await client.send_raw(chunk(b"!"))  # one byte over
        await sink.until(lambda: sink.events[-1][0] == "close")
        assert sink.events[-1][1] == RESPONSE_TOO_LARGE and "20 MB" in sink.events[-1][2]
        assert not inv.reply.done()  # the invocation runs until the runtime ends its request
        await client.send_raw(chunk(b"more, dropped") + END)
        ack = await client.read_response()
        assert ack.status == 413 and ack.json()["errorType"] == RESPONSE_TOO_LARGE
        assert await within(inv.reply) == RuntimeReply(False, b"", RESPONSE_TOO_LARGE, streamed=True)
        assert len(sink.body) == MAX_STREAM_BYTES and sink.events[-1][0] == "close"
        # the cap is per request
        inv = streaming_invocation(RecordingSink())
        api.dispatch(inv)
        await client.next()
        await client.send_raw(stream_head(inv.request_id) + chunk(b"small") + END)
        assert (await client.read_response()).status == 202
        assert (await within(inv.reply)).ok

    run(listen, scenario)


def test_streaming_mode_without_a_sink_is_buffered(listen: Listen) -> None:
    """A caller that cannot stream (e.g. the native invoke) gets the whole body, as Lambda's
    Invoke does for a streaming function; the usual 6 MB limit and error trailers apply."""

    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        inv = invocation()
        api.dispatch(inv)
        await client.next()
        await client.send_raw(stream_head(inv.request_id) + chunk(b"hello ") + chunk(b"world") + END)
        assert (await client.read_response()).status == 202
        assert await within(inv.reply) == RuntimeReply(True, b"hello world")

        inv = invocation()
        api.dispatch(inv)
        await client.next()
        doc = {"errorType": "Error", "errorMessage": "mid-stream", "stackTrace": []}
        await client.send_raw(stream_head(inv.request_id) + chunk(b"lost") + error_trailers(doc))
        assert (await client.read_response()).status == 202
        reply = await within(inv.reply)
        assert (reply.ok, reply.error_type, reply.streamed) == (False, "Error", False)
        assert parse_error(reply.body, reply.error_type)["errorMessage"] == "mid-stream"

        inv = invocation()
        api.dispatch(inv)
        await client.next()
        await client.send_raw(stream_head(inv.request_id) + chunk(b"x" * MAX_RESPONSE_BYTES) + chunk(b"y")
                              + END)
        assert (await client.read_response()).status == 202
        assert await within(inv.reply) == RuntimeReply(False, b"", RESPONSE_TOO_LARGE)

    run(listen, scenario)


def test_streamed_response_to_an_unknown_id_is_400_and_touches_no_sink(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        sink = RecordingSink()
        inv = streaming_invocation(sink)
        api.dispatch(inv)
        await client.next()
        await client.send_raw(stream_head("not-" + inv.request_id) + chunk(b"stray") + END)
        assert (await client.read_response()).status == 400
        assert sink.events == [] and not inv.reply.done()
        await client.send_raw(stream_head(inv.request_id) + chunk(b"mine") + END)
        assert (await client.read_response()).status == 202
        assert sink.body == b"mine" and (await within(inv.reply)).streamed

    run(listen, scenario)


def test_a_second_stream_for_the_same_invocation_is_refused(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        sink = RecordingSink()
        inv = streaming_invocation(sink)
        api.dispatch(inv)
        await client.next()
        await client.send_raw(stream_head(inv.request_id) + chunk(b"first"))
        await sink.until(lambda: sink.body == b"first")
        other = await RawClient.connect(api)
        try:
            r = await other.post_response(inv.request_id, b'"buffered meanwhile"')
            assert r.status == 400 and not inv.reply.done()
        finally:
            other.close()
        await client.send_raw(END)
        assert (await client.read_response()).status == 202
        assert (await within(inv.reply)).streamed and sink.body == b"first"

    run(listen, scenario)


def test_abandoned_stream_stops_feeding_the_sink(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        sink = RecordingSink()
        inv = streaming_invocation(sink)
        api.dispatch(inv)
        await client.next()
        await client.send_raw(stream_head(inv.request_id) + chunk(b"before"))
        await sink.until(lambda: sink.body == b"before")
        api.abandon()  # the deadline passed
        fresh = invocation()
        api.dispatch(fresh)
        await client.send_raw(chunk(b"after") + END)
        assert (await client.read_response()).status == 400
        assert sink.body == b"before" and not inv.reply.done()
        assert (await client.next()).headers["lambda-runtime-aws-request-id"] == fresh.request_id

    run(listen, scenario)


def test_a_full_response_stream_stops_reading_the_runtime(listen: Listen) -> None:
    """Back-pressure: past its high-water mark a ResponseStream pauses the runtime's
    connection, so the server holds a bounded amount however fast the runtime writes."""

    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        stream = ResponseStream(high_water=64 * 1024)
        inv = streaming_invocation(stream)
        api.dispatch(inv)
        await client.next()
        piece = bytes(range(256)) * 256  # 64 KiB
        count = 288  # 18 MiB: more than the socket buffers can hold, under the 20 MB cap
        total = count * len(piece)

        async def produce() -> None:
            await client.send_raw(stream_head(inv.request_id, "application/x-test"))
            for _ in range(count):
                await client.send_raw(chunk(piece))
            await client.send_raw(END)

        producer = asyncio.create_task(produce())
        assert await within(stream.started()) is True and stream.content_type == "application/x-test"
        conn = next(iter(api._connections))
        await within(_until(lambda: conn.paused))
        held = stream._buffered
        assert held <= stream.high_water + 512 * 1024  # bounded: one read past the mark at most
        assert not producer.done()  # the runtime is blocked on its writes
        received = bytearray()
        async for part in stream:
            received += part
            assert stream._buffered <= stream.high_water + 512 * 1024
        assert len(received) == total and received[:len(piece)] == piece
        await within(producer)
        assert (await client.read_response()).status == 202
        assert await within(inv.reply) == RuntimeReply(True, b"", streamed=True)
        assert stream.closed and stream.error_type is None and stream.size == total
        assert not conn.paused

    run(listen, scenario)


# --- ResponseStream, the door's side ---------------------------------------------------------


def test_response_stream_started_says_whether_anything_was_streamed() -> None:
    async def main() -> None:
        buffered = ResponseStream()
        buffered.close()  # the runtime answered the usual way
        assert await buffered.started() is False and await buffered.read() == b""

        failed_early = ResponseStream()
        failed_early.open("text/plain")
        failed_early.close("TypeError", "before any byte")
        assert await failed_early.started() is False
        assert failed_early.error_type == "TypeError"

        empty = ResponseStream()
        empty.open("text/plain")
        empty.close()
        assert await empty.started() is True and await empty.read() == b""

        streaming = ResponseStream()
        streaming.open("text/plain")
        waiting = asyncio.create_task(streaming.started())
        await asyncio.sleep(0)
        assert not waiting.done()  # opened, but nothing streamed yet
        streaming.write(b"")  # ignored: b"" is the end of the stream
        streaming.write(b"a")
        assert await within(waiting) is True
        streaming.write(b"b")
        streaming.close("Sandbox.Timeout", "timed out")
        streaming.write(b"late")  # after close: dropped
        assert [part async for part in streaming] == [b"a", b"b"]
        assert (streaming.error_type, streaming.error_message) == ("Sandbox.Timeout", "timed out")
        streaming.close()  # idempotent: the first close wins
        assert streaming.error_type == "Sandbox.Timeout"

    asyncio.run(main())


def test_response_stream_reads_the_http_prelude() -> None:
    async def main() -> None:
        prelude = {"statusCode": 201, "headers": {"x-a": "1"}, "cookies": ["c=1"]}
        stream = ResponseStream()
        stream.open(HTTP_INTEGRATION_CONTENT_TYPE)
        wire = json.dumps(prelude).encode() + b"\0" * 8 + b"body \0 with a NUL"
        for i in range(0, len(wire), 5):  # the prelude split anywhere, even in its delimiter
            stream.write(wire[i:i + 5])
        stream.close()
        assert await stream.read_prelude() == prelude
        assert b"".join([part async for part in stream]) == b"body \0 with a NUL"

        plain = ResponseStream()
        plain.open("text/html; charset=utf-8")
        plain.write(b"{}" + b"\0" * 8)
        assert await plain.read_prelude() is None and await plain.read() == b"{}" + b"\0" * 8

        for bad in (b"[1]" + b"\0" * 8, b"{nope" + b"\0" * 8, b'{"statusCode": 200}',
                    b" " * (MAX_PRELUDE_BYTES + 100) + b"\0" * 8):
            broken = ResponseStream()
            broken.open(HTTP_INTEGRATION_CONTENT_TYPE)
            broken.write(bad)
            broken.close()
            with pytest.raises(ValueError):
                await broken.read_prelude()

    asyncio.run(main())


def test_response_stream_cancel_drops_the_rest_and_resumes_the_producer() -> None:
    async def main() -> None:
        flows: list[bool] = []
        stream = ResponseStream(high_water=10)
        stream.open("text/plain", flows.append)
        stream.write(b"x" * 8)
        assert flows == []
        stream.write(b"x" * 8)
        assert flows == [True]  # past the high-water mark: stop reading the runtime
        assert await stream.read() == b"x" * 8
        assert flows == [True]  # 8 bytes still held: over half the mark
        assert await stream.read() == b"x" * 8
        assert flows == [True, False]  # at or under half the mark again: go on
        stream.write(b"y" * 20)
        assert flows == [True, False, True]
        stream.cancel()  # the door's client went away
        assert flows == [True, False, True, False]
        stream.write(b"z" * 100)
        assert flows == [True, False, True, False] and stream.size == 136  # counted, not kept
        stream.close()
        assert await stream.read() == b""

    asyncio.run(main())


# --- /init/error ----------------------------------------------------------------------


def test_init_error_before_next_fails_ready(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        doc = {"errorType": "Runtime.ImportModuleError", "errorMessage": "No module named 'app'",
               "stackTrace": "Traceback\n  line 1"}
        r = await client.request("POST", f"{PREFIX}/init/error", json.dumps(doc).encode(),
                                 {"Lambda-Runtime-Function-Error-Type": "Runtime.Other"})
        assert r.status == 202
        with pytest.raises(InitFailed) as caught:
            await within(asyncio.shield(api.ready))
        assert caught.value.error_type == "Runtime.ImportModuleError"
        assert caught.value.message == "No module named 'app'"
        assert caught.value.stack == ["Traceback", "  line 1"]

    run(listen, scenario)


def test_init_error_type_from_the_header(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        await client.request("POST", f"{PREFIX}/init/error", b"it broke",
                             {"Lambda-Runtime-Function-Error-Type": "Runtime.ExitError"})
        with pytest.raises(InitFailed) as caught:
            await within(asyncio.shield(api.ready))
        assert caught.value.error_type == "Runtime.ExitError"
        assert caught.value.message == "it broke"

    run(listen, scenario)


def test_init_error_after_next_leaves_ready_alone(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        inv = invocation()
        api.dispatch(inv)
        await client.next()
        r = await client.request("POST", f"{PREFIX}/init/error", b'{"errorType":"Late"}')
        assert r.status == 202
        assert api.ready.done() and api.ready.exception() is None

    run(listen, scenario)


# --- routing and malformed requests -----------------------------------------------------


@pytest.mark.parametrize("method,path", [
    ("GET", "/"),
    ("GET", "/2018-06-01/runtime"),
    ("GET", "/2020-01-01/runtime/invocation/next"),
    ("GET", f"{PREFIX}/invocation"),
    ("GET", f"{PREFIX}/invocation/next/more"),
    ("POST", f"{PREFIX}/invocation/abc/reply"),
    ("POST", f"{PREFIX}/init"),
])
def test_unknown_paths_are_404(listen: Listen, method: str, path: str) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        r = await client.request(method, path, b"" if method == "GET" else b"{}")
        assert r.status == 404
        assert "errorMessage" in r.json() and "errorType" in r.json()
        assert not api.ready.done()  # not mistaken for a /next
        # the connection stays usable
        inv = invocation()
        api.dispatch(inv)
        assert (await client.next()).headers["lambda-runtime-aws-request-id"] == inv.request_id

    run(listen, scenario)


@pytest.mark.parametrize("method,path", [
    ("PUT", NEXT),
    ("DELETE", NEXT),
    ("GET", f"{PREFIX}/init/error"),
    ("PUT", f"{PREFIX}/init/error"),
])
def test_wrong_method_is_405(listen: Listen, method: str, path: str) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        r = await client.request(method, path)
        assert r.status == 405
        assert "errorMessage" in r.json()
        assert not api.ready.done()

    run(listen, scenario)


def test_post_to_next_is_405(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        assert (await client.request("POST", NEXT, b"{}")).status == 405

    run(listen, scenario)


def test_404_status_line_says_not_found(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        r = await client.request("GET", f"{PREFIX}/bogus")
        assert (r.status, r.reason) == (404, "Not Found")

    run(listen, scenario)


@pytest.mark.parametrize("garbage", [
    b"THIS IS NOT HTTP\r\n\r\n",
    b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nBad Header Line\r\n\r\n",
    b"POST /2018-06-01/runtime/init/error HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
])
def test_malformed_http_is_400_and_closes_the_connection(listen: Listen, garbage: bytes) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        await client.send_raw(garbage)
        r = await client.read_response()
        assert r.status == 400
        assert r.json()["errorType"] == "InvalidRequest"
        assert await client.at_eof()
        await within(_until(lambda: not api._connections))
        # the API itself keeps serving new connections
        other = await RawClient.connect(api)
        try:
            inv = invocation()
            api.dispatch(inv)
            assert (await other.next()).body == inv.payload
        finally:
            other.close()

    run(listen, scenario)


def test_query_string_is_ignored_in_routing(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        inv = invocation()
        api.dispatch(inv)
        assert (await client.request("GET", NEXT + "?x=1")).body == inv.payload
        ack = await client.request("POST", f"{PREFIX}/invocation/{inv.request_id}/response?y=2", b"3")
        assert ack.status == 202
        assert (await within(inv.reply)).body == b"3"

    run(listen, scenario)


# --- listeners and close -----------------------------------------------------------------


def test_listen_tcp_is_loopback_on_a_free_port() -> None:
    async def main() -> None:
        a, b = RuntimeAPI(), RuntimeAPI()
        try:
            addr_a, addr_b = await a.listen_tcp(), await b.listen_tcp()
            assert addr_a == a.address and addr_a.startswith("127.0.0.1:")
            assert addr_a != addr_b and int(addr_a.rsplit(":", 1)[1]) > 0
            # each instance sees only its own invocations
            inv_a, inv_b = invocation(b'"a"'), invocation(b'"b"')
            a.dispatch(inv_a)
            b.dispatch(inv_b)
            ca, cb = await RawClient.connect(b), await RawClient.connect(a)
            assert (await ca.next()).body == b'"b"'
            assert (await cb.next()).body == b'"a"'
            ca.close()
            cb.close()
        finally:
            a.close()
            b.close()

    asyncio.run(main())


def test_listen_unix_makes_a_world_writable_socket(tmp_path: Path) -> None:
    base = tmp_path if len(str(tmp_path)) < 90 else Path(tempfile.mkdtemp(prefix="impuls-rt-"))
    path = str(base / "rt.sock")

    async def main() -> None:
        api = RuntimeAPI()
        try:
            assert await api.listen_unix(path) == path == api.address
            mode = os.stat(path).st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o666
        finally:
            api.close()

    asyncio.run(main())
    if base != tmp_path:
        os.unlink(path)
        base.rmdir()


def test_close_drops_connections_and_cancels_ready(listen: Listen) -> None:
    async def scenario(api: RuntimeAPI, client: RawClient) -> None:
        await client.send("GET", NEXT)
        await within(asyncio.shield(api.ready))
        other = await RawClient.connect(api)
        await within(_until(lambda: len(api._connections) == 2))
        api.close()
        assert await client.at_eof()
        assert await other.at_eof()
        other.close()
        api.close()  # idempotent
        with pytest.raises(OSError):
            await RawClient.connect(api)

    run(listen, scenario)


def test_close_before_ready_cancels_it() -> None:
    async def main() -> None:
        api = RuntimeAPI()
        await api.listen_tcp()
        api.close()
        assert api.ready.cancelled()

    asyncio.run(main())


# --- parse_error ---------------------------------------------------------------------------


def test_parse_error_takes_the_type_from_the_body_first() -> None:
    body = json.dumps({"errorType": "KeyError", "errorMessage": "'k'",
                       "stackTrace": ["a", "b"]}).encode()
    assert parse_error(body, "Unhandled") == {
        "errorType": "KeyError", "errorMessage": "'k'", "stackTrace": ["a", "b"]}


def test_parse_error_falls_back_to_the_header_type() -> None:
    info = parse_error(b'{"errorMessage": "boom"}', "Runtime.HeaderType")
    assert info == {"errorType": "Runtime.HeaderType", "errorMessage": "boom", "stackTrace": []}
    assert parse_error(b'{"errorType": "", "errorMessage": "x"}', "H")["errorType"] == "H"


def test_parse_error_without_any_type() -> None:
    assert parse_error(b"", None) == {
        "errorType": "Runtime.Unknown", "errorMessage": "", "stackTrace": []}


def test_parse_error_non_json_body_becomes_the_message() -> None:
    info = parse_error(b"Segmentation fault \xff", "Runtime.ExitError")
    assert info == {"errorType": "Runtime.ExitError", "errorMessage": "Segmentation fault \ufffd",
                    "stackTrace": []}
    assert parse_error(b"[1, 2]", None)["errorMessage"] == "[1, 2]"  # JSON, not an object
    assert parse_error(b'"just a string"', None)["errorMessage"] == "just a string"


def test_parse_error_string_stack_trace_is_split_into_lines() -> None:
    body = json.dumps({"errorType": "Error", "errorMessage": "m",
                       "stackTrace": "Error: m\n    at handler (index.js:1:7)"}).encode()
    assert parse_error(body, None)["stackTrace"] == ["Error: m", "    at handler (index.js:1:7)"]


def test_parse_error_coerces_odd_values_to_strings() -> None:
    body = json.dumps({"errorType": 42, "errorMessage": {"nested": True},
                       "stackTrace": [1, None]}).encode()
    info = parse_error(body, None)
    assert info == {"errorType": "42", "errorMessage": "{'nested': True}", "stackTrace": ["1", "None"]}
    assert parse_error(b'{"stackTrace": {"not": "a list"}}', None)["stackTrace"] == []
