"""The microVM guest agent's test for "the runtime now waits for its next event" (it freezes
the runtime then): a GET /invocation/next alone, after a response in the same write (the
Python client pipelines them), or split over two reads."""

from __future__ import annotations

import socket

from impuls.runtimes.guest.agent import Conn

RESPONSE = (b"POST /2018-06-01/runtime/invocation/0f/response HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: 4\r\n\r\n\"ok\"")
NEXT = b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: localhost\r\n\r\n"


def test_the_agent_sees_the_runtime_wait_for_its_next_event() -> None:
    one, other = socket.socketpair()
    try:
        conn = Conn(one, 1)
        assert conn.waits_for_next(NEXT)
        assert not conn.waits_for_next(RESPONSE)
        assert conn.waits_for_next(RESPONSE + NEXT)
        assert not conn.waits_for_next(RESPONSE + NEXT[:30])
        assert conn.waits_for_next(NEXT[30:])
        assert not conn.waits_for_next(b"GET /2018-06-01/runtime/invocation/x HTTP/1.1\r\n\r\n")
        assert not conn.waits_for_next(b"x" * 100_000 + b"\r\n\r\n")
    finally:
        one.close()
        other.close()
