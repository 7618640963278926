"""The host end of a guest's virtio-serial link: frames from the agent demultiplexed into the
instance's output, its control messages, and Runtime API connections relayed to the host.

Each guest Runtime API connection is relayed byte for byte to the instance's own
:class:`~impuls.sandbox.runtime_api.RuntimeAPI` unix socket: the HTTP stream is parsed
once, on the host, and the runtime clients run unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from impuls.errors import SandboxStartFailed
from impuls.runtimes.guest.protocol import (
    CLOSE,
    CTL,
    DATA,
    LOG,
    LOGDROP,
    OPEN,
    FrameReader,
    control,
    frame,
    frames,
)
from impuls.sandbox.base import OutputCapture

log = logging.getLogger("impuls.sandbox.microvm.link")


class _Channel(asyncio.Protocol):
    """One guest Runtime API connection, relayed to the instance's RuntimeAPI socket."""

    def __init__(self, link: GuestLink, chan: int) -> None:
        self.link = link
        self.chan = chan
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.closed:
            transport.close()
            return
        for data in self.pending:
            self.transport.write(data)  # type: ignore[union-attr]
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.link.send(b"".join(frames(DATA, self.chan, data)))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.link.channel_closed(self.chan, notify=True)

    def write(self, data: bytes) -> None:
        if self.transport is None:
            self.pending.append(data)
        elif not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class GuestLink(asyncio.Protocol):
    """The host end of the agent's virtio-serial port (see :mod:`impuls.runtimes.guest.protocol`)."""

    def __init__(self, api_socket: str, output: OutputCapture) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.api_socket = api_socket
        self.output = output
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.channels: dict[int, _Channel] = {}
        self.hello: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.loaded: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.runtime_exit: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.pongs: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        for fut in (self.hello, self.loaded, self.runtime_exit):
            fut.add_done_callback(_consume)
        self.on_exit: Callable[[dict[str, Any]], None] | None = None
        self.first_request_ms = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        for chan in list(self.channels):
            self.channel_closed(chan, notify=False)
        gone = ConnectionError("the VM closed its serial link")
        for fut in (self.hello, self.loaded):
            if not fut.done():
                fut.set_exception(gone)
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def control(self, message: dict[str, Any]) -> None:
        self.send(control(message))

    def data_received(self, data: bytes) -> None:
        try:
            items = self.reader.feed(data)
        except ValueError as exc:
            log.warning("bad frame from the guest agent: %s", exc)
            if self.transport is not None:
                self.transport.abort()
            return
        for kind, chan, payload in items:
            if kind == LOG:
                self.output.feed(payload)
            elif kind == LOGDROP:
                self.output.dropped += int(payload or b"0")
            elif kind == DATA:
                channel = self.channels.get(chan)
                if channel is not None:
                    channel.write(payload)
            elif kind == OPEN:
                self._open(chan)
            elif kind == CLOSE:
                channel = self.channels.pop(chan, None)
                if channel is not None:
                    channel.close()
            elif kind == CTL:
                self._on_control(json.loads(payload))

    def _open(self, chan: int) -> None:
        old = self.channels.pop(chan, None)
        if old is not None:
            old.close()
        channel = _Channel(self, chan)
        self.channels[chan] = channel

        async def connect() -> None:
            try:
                await self.loop.create_unix_connection(lambda: channel, self.api_socket)
            except OSError:
                channel.closed = True
                self.channel_closed(chan, notify=True)

        self.loop.create_task(connect())

    def channel_closed(self, chan: int, notify: bool) -> None:
        channel = self.channels.pop(chan, None)
        if channel is not None:
            channel.close()
        if notify:
            self.send(frame(CLOSE, chan))

    def _on_control(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "hello" and not self.hello.done():
            self.hello.set_result(msg)
        elif op == "loaded" and not self.loaded.done():
            self.loaded.set_result(msg)
        elif op == "load-failed" and not self.loaded.done():
            error = SandboxStartFailed(f"the guest agent could not load: {msg.get('error')}")
            self.loaded.set_exception(error)
        elif op == "exit" and not self.runtime_exit.done():
            self.runtime_exit.set_result(msg)
            if self.on_exit is not None:
                self.on_exit(msg)
        elif op == "first-request":
            self.first_request_ms = float(msg.get("ms", 0))
        elif op == "pong":
            fut = self.pongs.pop(msg.get("t"), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    async def ping(self, timeout: float = 5.0) -> tuple[float, int]:
        """One round trip host → agent → host: (seconds, guest clock minus host clock in ns)."""
        token = secrets.token_hex(4)
        fut: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self.pongs[token] = fut
        t0, sent = time.perf_counter(), time.time_ns()
        self.control({"op": "ping", "t": token})
        msg = await asyncio.wait_for(fut, timeout)
        received = time.time_ns()
        return time.perf_counter() - t0, int(msg.get("now", 0)) - (sent + received) // 2

    async def sync_clock(self, tolerance_ns: int = 1_000_000) -> int:
        """Step the guest's wall clock onto the host's (NTP-style, one exchange); returns the error fixed.

        ``load`` sets the clock from the host's time at sending, but a restored guest takes
        tens of ms (cold, under TCG) to act on it: deadlines would be off by as much."""
        _, offset = await self.ping()
        if abs(offset) > tolerance_ns:
            self.control({"op": "clock-step", "delta_ns": -offset})
        return offset


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # never "exception was never retrieved"
