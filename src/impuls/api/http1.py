"""uvicorn's HTTP/1.1 protocol (httptools), with two costs per request taken out and a
stop that does not wait for idle TLS clients.

**The head and the body in one send.**
uvicorn writes a response's status line and headers as soon as the application sends
``http.response.start``, and its body in a second write: two ``send()`` system calls, two
TCP segments and, on loopback, two wake-ups of the client per answer.  The invoke path
sends both messages back to back, so :class:`HeadWithBody` keeps the head back until the
body's write, which carries both.  A head is never held past the current turn of the event
loop: if no write follows it in the same turn (a streamed response whose first chunk is not
ready yet, a ``100 Continue``), a callback the loop runs next sends it alone, so no client
waits longer for its headers than before.  Bytes keep their order; a ``close()`` sends what
is held first.

**One keep-alive timer per connection, not per request.**  uvicorn arms a timer when a
response completes and cancels it when the next request arrives: a timer made and
destroyed for every request.  :class:`HttpProtocol` notes when the connection went idle
instead, and keeps one timer that, when it fires, closes a connection idle for the whole
timeout and otherwise waits for the rest of it.  The connection is closed at the same time
as uvicorn would close it.

**An idle TLS connection is dropped when the server stops.**  Closing it the TLS way waits
for the client's reply to the close, up to 30 s, and an idle client does not answer: a
server with one such client took 30 s to stop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: a body at least this large is written after the head, not copied behind it
MAX_JOINED = 64 * 1024


class HeadWithBody:
    """A transport that sends a response head (bytes starting ``HTTP/1.1 ``) together with the
    write that follows it in the same turn of the loop; everything else goes to ``transport``."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.held = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.held:
            head, self.held = self.held, b""
            if len(data) < MAX_JOINED:
                self.transport.write(head + data)
                return
            self.transport.write(head)
        elif data[:9] == b"HTTP/1.1 ":
            self.held = bytes(data)
            self.loop.call_soon(self.flush)
            return
        self.transport.write(data)

    def flush(self) -> None:
        """Send what is held (nothing when the body's write already took it)."""
        if self.held:
            head, self.held = self.held, b""
            self.transport.write(head)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a :class:`HeadWithBody` transport, with a keep-alive
    timer per connection and idle TLS connections dropped at the stop
    (``uvicorn.Config(http=HttpProtocol)``)."""

    #: loop time the connection's last response completed with no request after it (None: busy)
    idle_since: float | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeadWithBody(transport, self.loop))  # type: ignore[arg-type]

    def _unset_keepalive_if_required(self) -> None:
        """A request arrived (or the connection is lost): not idle; the timer, if armed, stays."""
        self.idle_since = None

    def on_response_complete(self) -> None:
        """uvicorn's, but idle since now instead of a new timer."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self.idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

    def shutdown(self) -> None:
        """The server stops: an idle TLS connection is dropped (uvicorn's ``close()`` would
        wait up to 30 s for the client's reply to the TLS close); else uvicorn's."""
        if self.scheme == "https" and (self.cycle is None or self.cycle.response_complete):
            self.transport.abort()
        else:
            super().shutdown()

    def _idle_check(self) -> None:
        self.timeout_keep_alive_task = None
        if self.idle_since is None:  # busy: its response arms the timer again
            return
        left = self.idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._idle_check)
        else:
            self.timeout_keep_alive_handler()
