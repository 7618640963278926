"""The Lambda Runtime API (2018-06-01), served by Impuls to one instance.

Each instance gets its own listener (loopback TCP port or unix socket), so
an instance can only ever see its own invocations.  The runtime inside the
sandbox long-polls ``GET /2018-06-01/runtime/invocation/next``; the engine
calls :meth:`RuntimeAPI.dispatch` to hand it an event and awaits the
:class:`Invocation`'s future, which the runtime completes by posting to
``.../response`` or ``.../error``.  ``/init/error`` fails :attr:`RuntimeAPI.ready`.

HTTP parsing is httptools (uvicorn's parser); each reply is written with a
single ``write`` so that Nagle never delays it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any, cast

import httptools

from impuls.errors import InitFailed

PREFIX = b"/2018-06-01/runtime/"
MAX_RESPONSE_BYTES = 6 * 1024 * 1024
MAX_ERROR_BYTES = 1024 * 1024
#: the error type of a reply whose response body was over MAX_RESPONSE_BYTES
RESPONSE_TOO_LARGE = "Function.ResponseSizeTooLarge"


@dataclass
class RuntimeReply:
    """What the runtime posted for one invocation."""

    ok: bool
    body: bytes
    error_type: str | None = None


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


def _error_reply(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"errorMessage": message, "errorType": "InvalidRequest"}).encode()
    return _reply(status, reason, body)


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
        self._delivered = False
        self._parked: _Connection | None = None
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
        self._delivered = False
        parked, self._parked = self._parked, None
        if parked is not None and not parked.closed:
            self._deliver(parked)

    def abandon(self) -> None:
        """Forget the outstanding invocation (timed out or cancelled)."""
        self._current = None

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
        self._delivered = True
        conn.write(self._current.next_response())

    def _on_next(self, conn: _Connection) -> None:
        if not self.ready.done():
            self.ready.set_result(None)
        if self._current is not None and not self._delivered and not self._current.reply.done():
            self._deliver(conn)
        else:
            self._parked = conn

    def _on_result(self, conn: _Connection, request_id: str, reply: RuntimeReply) -> None:
        current = self._current
        if current is None or current.request_id != request_id or current.reply.done():
            conn.write(_error_reply(400, "Bad Request", f"unknown or finished request id {request_id}"))
            return
        conn.write(ACCEPTED)
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
    """One HTTP/1.1 connection from the runtime (keep-alive, pipelining not needed)."""

    def __init__(self, api: RuntimeAPI) -> None:
        self.api = api
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.body = bytearray()
        self.too_large = False
        self.error_type: str | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.api._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.api._connections.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.write(_error_reply(400, "Bad Request", "malformed HTTP request"))
            self.abort()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"lambda-runtime-function-error-type":
            self.error_type = value.decode("latin-1")
        elif name == b"expect" and value.lower() == b"100-continue":
            # curl sends this for bodies over 1 MB and would wait a second for the go-ahead
            self.write(CONTINUE)

    def on_body(self, body: bytes) -> None:
        if len(self.body) + len(body) > MAX_RESPONSE_BYTES:
            self.too_large = True
        elif not self.too_large:
            self.body += body

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
            if kind == b"response":
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
