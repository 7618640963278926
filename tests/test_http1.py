"""The server's HTTP/1.1 protocol (impuls.api.http1): each response's head and body in one
TCP segment, pipelined requests answered in order, idle keep-alive connections closed
after uvicorn's timeout (5 s) and not before, and a TLS server that stops at once."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from impuls.api.http1 import MAX_JOINED, HeadWithBody
from tests.helpers import Server, self_signed_certificate

KEEP_ALIVE_S = 5.0  # uvicorn's default, which the server keeps
#: struct tcp_info (linux/tcp.h): tcpi_data_segs_in, the segments with data a socket received
DATA_SEGS_IN = 152


def _data_segments_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, DATA_SEGS_IN)[0])


def _read_responses(sock: socket.socket, count: int) -> list[bytes]:
    """``count`` whole responses (each with a content-length) read from ``sock``."""
    buf, out = b"", list[bytes]()
    while len(out) < count:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection after {len(out)} responses"
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(buf) < length:
            buf += sock.recv(65536)
        out.append(head + b"\r\n\r\n" + buf[:length])
        buf = buf[length:]
    return out


def _request(path: str = "/health") -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode()


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("http1") / "data").start()
    yield srv
    srv.stop()


def _connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def test_each_response_arrives_in_one_segment(http_server: Server) -> None:
    with _connect(http_server) as sock:
        before = _data_segments_in(sock)
        for _ in range(5):
            sock.sendall(_request())
            (response,) = _read_responses(sock, 1)
            assert response.startswith(b"HTTP/1.1 200 ") and response.endswith(b"}")
        assert _data_segments_in(sock) - before == 5  # uvicorn alone: 10 (head, then body)


def test_pipelined_requests_are_answered_in_order(http_server: Server) -> None:
    with _connect(http_server) as sock:
        sock.sendall(_request("/health") + _request("/no-such-route") + _request("/health"))
        first, second, third = _read_responses(sock, 3)
    assert first.startswith(b"HTTP/1.1 200 ") and third.startswith(b"HTTP/1.1 200 ")
    assert second.startswith(b"HTTP/1.1 404 ") and b"no such route" in second


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(http_server: Server) -> None:
    """One connection is left idle, another asks again every 2 s: the idle one is closed
    about 5 s after its response, the busy one is still served 7 s in."""
    closed_after: list[float] = []

    def idle() -> None:
        with _connect(http_server) as sock:
            sock.sendall(_request())
            _read_responses(sock, 1)
            answered = time.monotonic()
            assert sock.recv(1) == b""
            closed_after.append(time.monotonic() - answered)

    watcher = threading.Thread(target=idle)
    watcher.start()
    with _connect(http_server) as busy:
        for _ in range(4):
            busy.sendall(_request())
            assert _read_responses(busy, 1)[0].startswith(b"HTTP/1.1 200 ")
            time.sleep(2.3)
        busy.sendall(_request())
        assert _read_responses(busy, 1)[0].startswith(b"HTTP/1.1 200 ")
    watcher.join(30)
    assert closed_after and KEEP_ALIVE_S - 0.5 <= closed_after[0] <= KEEP_ALIVE_S + 10


class _Recorder:
    """The writes a transport was asked for (the real socket is not the subject here)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True


def _on_a_loop(check: Callable[[HeadWithBody, _Recorder], Awaitable[None]]) -> None:
    async def run() -> None:
        rec = _Recorder()
        await check(HeadWithBody(cast(asyncio.Transport, rec), asyncio.get_running_loop()), rec)
    asyncio.run(run())


def test_a_head_is_sent_with_the_body_that_follows_it() -> None:
    async def check(t: HeadWithBody, rec: _Recorder) -> None:
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(b"body")
        assert rec.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        await asyncio.sleep(0)
        assert rec.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    _on_a_loop(check)


def test_a_head_alone_goes_out_at_the_next_turn_of_the_loop() -> None:
    async def check(t: HeadWithBody, rec: _Recorder) -> None:
        t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        assert rec.writes == []
        await asyncio.sleep(0)
        assert rec.writes == [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]
        t.write(b"4\r\npart\r\n")
        assert rec.writes[-1] == b"4\r\npart\r\n"
    _on_a_loop(check)


def test_a_large_body_follows_its_head_and_close_sends_what_is_held() -> None:
    async def check(t: HeadWithBody, rec: _Recorder) -> None:
        big = b"x" * MAX_JOINED
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(big)
        assert rec.writes == [b"HTTP/1.1 200 OK\r\n\r\n", big]
        t.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        t.close()
        assert rec.writes[-1] == b"HTTP/1.1 400 Bad Request\r\n\r\n" and rec.closed
    _on_a_loop(check)


def test_tcp_info_offset_is_the_kernels() -> None:
    """The segment count read above is the kernel's: a fresh connection that received one
    known segment says 1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
        with client, peer:
            peer.sendall(b"one")
            assert client.recv(16) == b"one"
            assert _data_segments_in(client) == 1


def test_a_tls_server_with_an_idle_client_stops_at_once(tmp_path: Path) -> None:
    """SIGTERM with a kept-alive TLS connection idle: the server drops it and ends at once
    (closing it the TLS way waited up to 30 s for the client's reply)."""
    cert, key = self_signed_certificate(tmp_path)
    srv = Server(tmp_path / "data", args=["--tls-cert", str(cert), "--tls-key", str(key)],
                 https=True).start()
    context = ssl.create_default_context(cafile=str(cert))
    with context.wrap_socket(_connect(srv), server_hostname="127.0.0.1") as idle:
        idle.sendall(_request())
        assert _read_responses(cast(socket.socket, idle), 1)[0].startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        srv.stop()
        assert time.monotonic() - started < 15
