"""The Lambda Runtime API (2018-06-01), served by Impuls to one instance.

Each instance gets its own listener (loopback TCP port or unix socket), so
an instance can only ever see its own invocations.  The runtime inside the
sandbox long-polls ``GET /2018-06-01/runtime/invocation/next``; the engine
calls :meth:`RuntimeAPI.dispatch` to hand it an event and awaits the
:class:`Invocation`'s future, which the runtime completes by posting to
``.../response`` or ``.../error``.  ``/init/error`` fails :attr:`RuntimeAPI.ready`.

Response streaming (Lambda's): a runtime may post ``.../response`` with
``Lambda-Runtime-Function-Response-Mode: streaming`` and a chunked body.  When the
invocation carries a :class:`StreamSink` (``Invocation.stream``, given by a door that
can stream, e.g. a :class:`ResponseStream`), each piece of the body is handed to it
as it arrives, the runtime's connection stops being read while the sink is full, and
the reply completes when the body ends (``RuntimeReply.streamed``).  A failure after
the stream started comes as the trailers ``Lambda-Runtime-Function-Error-Type`` and
``Lambda-Runtime-Function-Error-Body`` (base64 of the error document).  A streamed
response may hold :data:`MAX_STREAM_BYTES`; without a sink it is buffered like any
response (and :data:`MAX_RESPONSE_BYTES` applies).

HTTP parsing is httptools (uvicorn's parser); each reply is written with a
single ``write`` so that Nagle never delays it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import errno
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import httptools

from impuls.errors import InitFailed

PREFIX = b"/2018-06-01/runtime/"
MAX_RESPONSE_BYTES = 6 * 1024 * 1024
MAX_ERROR_BYTES = 1024 * 1024
#: the error type of a reply whose response body was over MAX_RESPONSE_BYTES
#: (or, streamed, over MAX_STREAM_BYTES)
RESPONSE_TOO_LARGE = "Function.ResponseSizeTooLarge"
#: Lambda's (soft) limit on a streamed response
MAX_STREAM_BYTES = 20 * 1024 * 1024
#: how a streamed response is typed when the runtime names no Content-Type
DEFAULT_STREAM_CONTENT_TYPE = "application/octet-stream"
#: a streamed response that starts with an HTTP prelude: the JSON metadata
#: ``{"statusCode", "headers", "cookies"}``, then PRELUDE_DELIMITER, then the body
HTTP_INTEGRATION_CONTENT_TYPE = "application/vnd.awslambda.http-integration-response"
PRELUDE_DELIMITER = b"\0" * 8
MAX_PRELUDE_BYTES = 16 * 1024
#: a ResponseStream holding more than this stops the runtime's connection being read
STREAM_HIGH_WATER = 1024 * 1024
#: how long ``RuntimeAPI.unread`` waits for a dead runtime's connection to be seen closed
UNREAD_WAIT_S = 1.0


@dataclass
class RuntimeReply:
    """What the runtime posted for one invocation.  ``streamed``: the body went to the
    invocation's stream sink as it arrived (``body`` is then empty, or the error document)."""

    ok: bool
    body: bytes
    error_type: str | None = None
    streamed: bool = False


class StreamSink(Protocol):
    """Where a streamed response goes, piece by piece (see :class:`ResponseStream`).

    Called from the event loop, in this order: ``open`` once (when the runtime starts
    a streamed response; never for a buffered one), ``write`` for each piece of the
    body as it arrives (never empty), and ``close`` once at the end, with the error
    type and message when the stream ended in a failure (the runtime's trailers, the
    size limit, or, from the engine, a timeout or crash).  ``close`` may come without
    ``open`` (the invocation ended without streaming) and must be idempotent.
    ``flow(True)`` asks the producer to stop reading the runtime; ``flow(False)``
    to go on.
    """

    def open(self, content_type: str, flow: Callable[[bool], None] | None) -> None: ...

    def write(self, chunk: bytes) -> None: ...

    def close(self, error_type: str | None = None, message: str = "") -> None: ...


class ResponseStream:
    """A streamed response between the runtime's connection (producer, the
    :class:`StreamSink` side) and a door (consumer).

    A door passes one to ``Invoker.invoke(..., stream=...)`` and then::

        if await stream.started():          # the runtime streams
            prelude = await stream.read_prelude()  # HTTP integration metadata, or None
            async for chunk in stream:      # the body as it arrives; ends with the stream
                ...
        result = await the_invoke_call      # result.streamed; its outcome says how it ended

    ``started()`` is False when the invocation ended without streaming anything:
    a buffered reply, or a failure before the first byte.  The result is then what
    it is today, to be sent whole.  Pieces are buffered up to ``high_water`` bytes;
    beyond, the runtime's connection is not read until the door catches up (the
    runtime's writes block).  A door that loses its client calls ``cancel()``: the
    rest of the stream is dropped, and the function runs on to its end.
    """

    def __init__(self, high_water: int = STREAM_HIGH_WATER) -> None:
        self.high_water = high_water
        #: the runtime's Content-Type ("" until the stream opens)
        self.content_type = ""
        #: bytes the runtime streamed so far
        self.size = 0
        #: set when the stream ended in a failure
        self.error_type: str | None = None
        self.error_message = ""
        self._opened = False
        self._closed = False
        self._cancelled = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._started: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._flow: Callable[[bool], None] | None = None
        self._paused = False

    # --- the producer (StreamSink) ------------------------------------------------

    def open(self, content_type: str, flow: Callable[[bool], None] | None = None) -> None:
        if self._opened or self._closed:
            return
        self._opened = True
        self.content_type = content_type
        self._flow = flow

    def write(self, chunk: bytes) -> None:
        if not self._opened or self._closed or not chunk:
            return
        self.size += len(chunk)
        if not self._started.done():
            self._started.set_result(True)
        if self._cancelled:
            return
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        self._wake()
        if self._buffered > self.high_water and not self._paused and self._flow is not None:
            self._paused = True
            self._flow(True)

    def close(self, error_type: str | None = None, message: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        if error_type:
            self.error_type, self.error_message = error_type, message
        if not self._started.done():  # an empty stream that ended well was still a stream
            self._started.set_result(self._opened and not error_type)
        self._resume()
        self._flow = None
        self._wake()

    # --- the consumer (a door) -------------------------------------------------------

    @property
    def closed(self) -> bool:
        """The producer is done (the consumer may still have pieces to read)."""
        return self._closed

    async def started(self) -> bool:
        """True once the runtime streamed its first byte (or ended a stream cleanly
        with none); False when the invocation ended without streaming."""
        return await asyncio.shield(self._started)

    async def read(self) -> bytes:
        """The next piece of the body; b"" once the stream has ended."""
        while not self._chunks:
            if self._closed:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= self.high_water // 2:
            self._resume()
        return chunk

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk

    async def read_prelude(self) -> dict[str, Any] | None:
        """The HTTP integration prelude (``{"statusCode", "headers", "cookies"}``) when the
        stream's Content-Type is :data:`HTTP_INTEGRATION_CONTENT_TYPE`, else None (and
        nothing is read).  Call it before reading the body, which follows the prelude.
        Raises ValueError when the prelude is malformed (not a JSON object followed by
        eight NUL bytes within the first :data:`MAX_PRELUDE_BYTES`)."""
        if self.content_type.split(";", 1)[0].strip().lower() != HTTP_INTEGRATION_CONTENT_TYPE:
            return None
        head = bytearray()
        while (end := head.find(PRELUDE_DELIMITER)) < 0:
            if len(head) > MAX_PRELUDE_BYTES + len(PRELUDE_DELIMITER):
                raise ValueError(f"no HTTP prelude delimiter within the first {MAX_PRELUDE_BYTES} bytes")
            chunk = await self.read()
            if not chunk:
                raise ValueError("the stream ended before its HTTP prelude did")
            head += chunk
        rest = bytes(head[end + len(PRELUDE_DELIMITER):])
        if rest:
            self._chunks.appendleft(rest)
            self._buffered += len(rest)
        try:
            prelude = json.loads(head[:end]) if end else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"the HTTP prelude is not JSON: {exc}") from None
        if not isinstance(prelude, dict):
            raise ValueError("the HTTP prelude is not a JSON object")
        return prelude

    def cancel(self) -> None:
        """The consumer is gone: drop what is buffered and everything still to come."""
        self._cancelled = True
        self._chunks.clear()
        self._buffered = 0
        self._resume()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            if self._flow is not None:
                self._flow(False)


@dataclass
class Invocation:
    """One event handed to the runtime, and the future of its reply."""

    request_id: str
    payload: bytes
    deadline_ms: int
    function_arn: str
    trace_id: str = ""
    #: the caller's client context, compact JSON on one line (the engine checks it)
    client_context: str | None = None
    #: where a streamed response goes; None: a streamed response is buffered like any other
    stream: StreamSink | None = None
    reply: asyncio.Future[RuntimeReply] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())

    def next_response(self) -> bytes:
        context = ("" if self.client_context is None
                   else f"Lambda-Runtime-Client-Context: {self.client_context}\r\n")
        head = (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: application/json\r\n"
            f"Lambda-Runtime-Aws-Request-Id: {self.request_id}\r\n"
            f"Lambda-Runtime-Deadline-Ms: {self.deadline_ms}\r\n"
            f"Lambda-Runtime-Invoked-Function-Arn: {self.function_arn}\r\n"
            f"Lambda-Runtime-Trace-Id: {self.trace_id}\r\n"
            f"{context}"
            f"Content-Length: {len(self.payload)}\r\n\r\n"
        ).encode()
        return head + self.payload


def _reply(status: int, reason: str, body: bytes = b'{"status":"OK"}') -> bytes:
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


ACCEPTED = _reply(202, "Accepted")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _error_reply(status: int, reason: str, message: str, error_type: str = "InvalidRequest") -> bytes:
    body = json.dumps({"errorMessage": message, "errorType": error_type}).encode()
    return _reply(status, reason, body)


STREAM_TOO_LARGE_MESSAGE = f"the function's streamed response exceeds the {MAX_STREAM_BYTES >> 20} MB limit"
STREAM_TOO_LARGE = _error_reply(413, "Request Entity Too Large",
                                f"the streamed response exceeds {MAX_STREAM_BYTES} bytes",
                                RESPONSE_TOO_LARGE)


class RuntimeAPI:
    """The Runtime API endpoint of one instance.

    ``ready`` completes when the runtime first asks for an event (its init is
    done), or fails with :class:`InitFailed` when it posts ``/init/error``.
    At most one invocation is outstanding at a time.
    """

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self._current: Invocation | None = None
        #: the connection the current invocation was written to (None: not delivered yet)
        self._delivered_on: _Connection | None = None
        self._parked: _Connection | None = None
        self._streaming: _Connection | None = None  # posting the current invocation's stream
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self.address = ""

    async def listen_tcp(self, host: str = "127.0.0.1") -> str:
        """Listen on a free loopback port; returns ``host:port`` for AWS_LAMBDA_RUNTIME_API."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, 0, backlog=8)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"{host}:{port}"
        return self.address

    async def listen_unix(self, path: str) -> str:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), path, backlog=8)
        os.chmod(path, 0o666)
        self.address = path
        return path

    def dispatch(self, invocation: Invocation) -> None:
        """Hand ``invocation`` to the runtime (now if it is waiting on /next, else on its next poll)."""
        if self._current is not None and not self._current.reply.done():
            raise RuntimeError("an invocation is already outstanding on this instance")
        self._current = invocation
        self._delivered_on = None
        parked, self._parked = self._parked, None
        if parked is not None and not parked.closed:
            self._deliver(parked)

    async def unread(self) -> bool:
        """Whether the runtime, now gone, never read the last dispatched invocation: it was
        not written to any connection, or the connection it was written to was reset -- a
        socket closed with unread data resets its peer (and a write to a dead peer fails),
        while a runtime that read the event and then died closes it cleanly.  Asked after the
        runtime's exit; the connection's end may still be on its way (a busy host defers
        it), so an open one is waited for, ``UNREAD_WAIT_S`` at most (one another process
        still holds stays open)."""
        conn = self._delivered_on
        if conn is None:
            return True
        if not conn.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.gone), UNREAD_WAIT_S)
        if conn.closed:
            return conn.reset
        return conn.socket_error() in (errno.ECONNRESET, errno.EPIPE)

    def abandon(self) -> None:
        """Forget the outstanding invocation (timed out or cancelled)."""
        self._current = None
        self._streaming = None

    def close(self) -> None:
        """Stop listening and drop every connection (idempotent)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._connections):
            conn.abort()
        self._connections.clear()
        if not self.ready.done():
            self.ready.cancel()

    # --- called by connections ----------------------------------------------

    def _deliver(self, conn: _Connection) -> None:
        assert self._current is not None
        self._delivered_on = conn
        conn.write(self._current.next_response())

    def _on_next(self, conn: _Connection) -> None:
        if not self.ready.done():
            self.ready.set_result(None)
        if self._current is not None and self._delivered_on is None and not self._current.reply.done():
            self._deliver(conn)
        else:
            self._parked = conn

    def _begin_stream(self, conn: _Connection, request_id: str) -> Invocation | None:
        """The invocation a streamed response of ``conn`` belongs to (None: unknown or finished,
        or already being answered)."""
        current = self._current
        if (current is None or current.request_id != request_id or current.reply.done()
                or self._streaming is not None):
            return None
        self._streaming = conn
        return current

    def _on_result(self, conn: _Connection, request_id: str, reply: RuntimeReply,
                   ack: bytes = ACCEPTED) -> None:
        current = self._current
        if (current is None or current.request_id != request_id or current.reply.done()
                or self._streaming not in (None, conn)):
            conn.write(_error_reply(400, "Bad Request", f"unknown or finished request id {request_id}"))
            return
        self._streaming = None
        conn.write(ack)
        current.reply.set_result(reply)

    def _on_init_error(self, conn: _Connection, body: bytes, error_type: str | None) -> None:
        conn.write(ACCEPTED)
        if self.ready.done():
            return
        info = parse_error(body, error_type)
        self.ready.set_exception(
            InitFailed(info["errorType"], info["errorMessage"], stack=info["stackTrace"])
        )


def parse_error(body: bytes, header_type: str | None) -> dict[str, Any]:
    """The error document a runtime posted; the type comes from the body, else the header."""
    try:
        doc = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError):
        doc = {"errorMessage": body.decode("utf-8", "replace")}
    if not isinstance(doc, dict):
        doc = {"errorMessage": str(doc)}
    stack = doc.get("stackTrace") or []
    if isinstance(stack, str):
        stack = stack.splitlines()
    return {
        "errorType": str(doc.get("errorType") or header_type or "Runtime.Unknown"),
        "errorMessage": str(doc.get("errorMessage", "")),
        "stackTrace": [str(line) for line in stack] if isinstance(stack, list) else [],
    }




class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection from the runtime (keep-alive, pipelined requests answered in
    order).

    What the requests of one read call for is written at once at its end.  A runtime that
    sends its response and its next ``GET /invocation/next`` together (the Python client
    does) does not wait for the 202: that reply is held and written with the next event, so
    the runtime is woken once per invocation, not twice.
    """

    def __init__(self, api: RuntimeAPI) -> None:
        self.api = api
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reset = False  # lost with an error: the peer went away with data unread, or a write failed
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # lost
        self.paused = False  # not reading: a streamed response's sink is full
        #: writes while a read is parsed (None: not parsing), and replies held for the next write
        self._batch: list[bytes] | None = None
        self._held = b""
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.body = bytearray()
        self.too_large = False
        self.error_type: str | None = None
        # a streamed response: its mode header, its type, its error trailer, and where it goes
        self.streaming = False
        self.content_type = ""
        self.error_body: bytes | None = None
        self.sink: StreamSink | None = None
        self.sink_of: Invocation | None = None
        self.streamed = 0
        self.overflow = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.api._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reset = isinstance(exc, (ConnectionResetError, BrokenPipeError))
        if not self.gone.done():
            self.gone.set_result(None)
        self.api._connections.discard(self)
        if self.api._streaming is self:  # the runtime went away mid-stream
            self.api._streaming = None

    def data_received(self, data: bytes) -> None:
        self._batch = []
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._batch.append(_error_reply(400, "Bad Request", "malformed HTTP request"))
            self._send(b"".join(self._batch))
            self.abort()
            return
        finally:
            batch, self._batch = self._batch, None
        if self.api._parked is self:  # a GET /next waits: the replies before it go with its answer
            self._held += b"".join(batch)
        elif batch:
            self._send(b"".join(batch))

    def write(self, data: bytes) -> None:
        if self._batch is not None:
            self._batch.append(data)
        else:
            self._send(data)

    def _send(self, data: bytes) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def socket_error(self) -> int:
        """The socket's pending error (SO_ERROR; 0: none, or no socket)."""
        sock = None if self.transport is None else self.transport.get_extra_info("socket")
        if sock is None:
            return 0
        try:
            return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
        except OSError:
            return 0

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def flow(self, pause: bool) -> None:
        """Stop (or resume) reading the runtime: a streamed response's sink is full (or not)."""
        if self.transport is None or self.closed or pause == self.paused:
            return
        self.paused = pause
        if pause:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:  # also called for trailers
        name = name.lower()
        if name == b"lambda-runtime-function-error-type":
            self.error_type = value.decode("latin-1")
        elif name == b"lambda-runtime-function-error-body":
            self.error_body = value
        elif name == b"lambda-runtime-function-response-mode":
            self.streaming = value.strip().lower() == b"streaming"
        elif name == b"content-type":
            self.content_type = value.decode("latin-1").strip()
        elif name == b"expect" and value.lower() == b"100-continue":
            # curl sends this for bodies over 1 MB and would wait a second for the go-ahead
            self.write(CONTINUE)

    def on_headers_complete(self) -> None:
        """A streamed response to an invocation that has a sink starts flowing now."""
        if not self.streaming or self.parser.get_method() != b"POST":
            return
        request_id = self._response_of()
        if request_id is None:
            return
        invocation = self.api._begin_stream(self, request_id)
        if invocation is None or invocation.stream is None:
            return  # unknown (a 400 once it ends), or buffered like any response
        self.sink, self.sink_of = invocation.stream, invocation
        self.sink.open(self.content_type or DEFAULT_STREAM_CONTENT_TYPE, self.flow)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.streamed += len(body)
            if self.overflow:
                return
            if self.streamed > MAX_STREAM_BYTES:
                self.overflow = True
                self.sink.close(RESPONSE_TOO_LARGE, STREAM_TOO_LARGE_MESSAGE)
                self.flow(False)
            elif self.sink_of is self.api._current:
                self.sink.write(bytes(body))
        elif len(self.body) + len(body) > MAX_RESPONSE_BYTES:
            self.too_large = True
        elif not self.too_large:
            self.body += body

    def _response_of(self) -> str | None:
        """The request id of a ``.../invocation/{id}/response`` path, else None."""
        path = self.url.split(b"?", 1)[0]
        parts = path[len(PREFIX):].split(b"/") if path.startswith(PREFIX) else []
        if len(parts) == 3 and parts[0] == b"invocation" and parts[2] == b"response":
            return parts[1].decode("latin-1")
        return None

    def _streamed_reply(self) -> tuple[RuntimeReply, bytes]:
        """The reply (and the runtime's answer) for a response posted in streaming mode."""
        sink, self.sink = self.sink, None
        streamed = sink is not None
        if self.overflow:
            return RuntimeReply(False, b"", RESPONSE_TOO_LARGE, streamed=True), STREAM_TOO_LARGE
        if self.error_type is not None or self.error_body is not None:
            try:
                body = base64.b64decode(self.error_body or b"", validate=True)[:MAX_ERROR_BYTES]
            except (binascii.Error, ValueError):
                body = b""
            if sink is not None:
                info = parse_error(body, self.error_type)
                sink.close(info["errorType"], info["errorMessage"])
            return RuntimeReply(False, body, self.error_type, streamed), ACCEPTED
        if sink is not None:
            sink.close()
            return RuntimeReply(True, b"", streamed=True), ACCEPTED
        if self.too_large:
            return RuntimeReply(False, b"", RESPONSE_TOO_LARGE), ACCEPTED
        return RuntimeReply(True, bytes(self.body)), ACCEPTED

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        if not path.startswith(PREFIX):
            self.write(_error_reply(404, "Not Found", "unknown Runtime API path"))
            return
        rest = path[len(PREFIX):]
        if rest in (b"invocation/next", b"init/error") and method != (b"GET" if rest == b"invocation/next"
                                                                      else b"POST"):
            self.write(_error_reply(405, "Method Not Allowed", "unsupported method for this path"))
        elif rest == b"invocation/next":
            self.api._on_next(self)
        elif rest == b"init/error":
            self.api._on_init_error(self, bytes(self.body[:MAX_ERROR_BYTES]), self.error_type)
        elif rest.startswith(b"invocation/") and method == b"POST":
            _, request_id, kind = [*rest.split(b"/"), b"", b""][:3]
            rid = request_id.decode("latin-1")
            if kind == b"response" and self.streaming:
                self.flow(False)
                reply, ack = self._streamed_reply()
                self.api._on_result(self, rid, reply, ack)
            elif kind == b"response":
                if self.too_large:
                    reply = RuntimeReply(False, b"", RESPONSE_TOO_LARGE)
                else:
                    reply = RuntimeReply(True, bytes(self.body))
                self.api._on_result(self, rid, reply)
            elif kind == b"error":
                self.api._on_result(self, rid, RuntimeReply(False, bytes(self.body[:MAX_ERROR_BYTES]),
                                                            self.error_type))
            else:
                self.write(_error_reply(404, "Not Found", "unknown Runtime API path"))
        else:
            self.write(_error_reply(404, "Not Found", "unknown Runtime API path"))
