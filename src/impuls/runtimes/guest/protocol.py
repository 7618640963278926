"""The host ↔ guest wire protocol and the guest layout both sides rely on.

Imported by the guest agent (copied next to it, to /opt/impuls/protocol.py in
every rootfs) and by the host (driver, VMM argv, image builder): standard
library only, and nothing the host does not share with the guest.
"""

from __future__ import annotations

import json
import struct
from typing import Any

# --- wire protocol ---------------------------------------------------------------
#
# The VM's one link to the host is a virtio-serial port named PORT_NAME.  Both
# ends multiplex everything over it as frames: HEADER, then `length` bytes of
# payload (at most MAX_PAYLOAD; longer data is split, see `frames`).

PORT_NAME = "impuls"
HEADER = struct.Struct("!BxHI")  # kind, channel, payload length
MAX_PAYLOAD = 1 << 20

# Frame kinds:
# * OPEN/DATA/CLOSE carry the Lambda Runtime API byte stream of each connection
#   the runtime client opens to the agent (unix socket API_SOCKET, or TCP
#   API_ADDRESS for clients that only speak TCP), one channel per connection.
#   The agent does not parse HTTP: the host relays each channel, untouched, to
#   the instance's RuntimeAPI.  Either side may CLOSE a channel.
# * LOG carries the runtime's stdout+stderr (one pipe, channel 0).  Before the
#   agent forwards anything the runtime sent on a connection (a response POST,
#   say) or reports its exit, it drains that pipe: one ordered stream then
#   guarantees that output written before a response reaches the host before
#   that response.  Of a flood, only the last LOG_TAIL bytes cross the link;
#   a LOGDROP frame (payload: a decimal byte count) counts the rest.
# * CTL carries one JSON message (`control`), channel 0.  Guest → host:
#   `hello` (booted, ready to load a function; sent once, before any snapshot),
#   `loaded` / `load-failed` (the answer to `load`), `first-request` (ms from
#   `load` to the runtime's first Runtime API request), `exit` (the runtime
#   ended: `status`, and `oom` when the guest kernel OOM-killed it), `pong`.
#   Host → guest: `load` (environment, argv, wall clock, entropy, /tmp size,
#   code disk type), `ping` (answered by `pong` with the guest's clock: also
#   the host's clock probe) and `clock-step` (shift the guest's wall clock).
CTL, OPEN, DATA, CLOSE, LOG, LOGDROP = 1, 2, 3, 4, 5, 6
LOG_TAIL = 256 * 1024

# --- guest layout ------------------------------------------------------------------

GUEST_ROOT = "/opt/impuls"  # the agent, this module and the runtime clients
CONFIG_PATH = GUEST_ROOT + "/guest.json"  # written by the image builder: the rootfs' runtime
TASK_ROOT = "/var/task"  # the function's code, read-only
CODE_ROOT = "/var/impuls-code"  # the code disk's romfs: task/ (bound at TASK_ROOT) and pycache/
TMP_DIR = "/tmp"
API_SOCKET = "/run/impuls/api.sock"
API_TCP_PORT = 9001
API_ADDRESS = f"127.0.0.1:{API_TCP_PORT}"
SANDBOX_USER = "sbx_user1051"  # the function runs as this user (added to the rootfs by the builder)
SANDBOX_UID = 993
SANDBOX_GID = 990
PYTHON = "/usr/bin/python3"
PYTHON_CLIENT = GUEST_ROOT + "/python/bootstrap.py"
NODE_CLIENT = GUEST_ROOT + "/nodejs/bootstrap.js"
RUBY_CLIENT = GUEST_ROOT + "/ruby/bootstrap.rb"


def frame(kind: int, chan: int = 0, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, chan, len(payload)) + payload


def frames(kind: int, chan: int, payload: bytes) -> list[bytes]:
    """``payload`` split into frames of at most MAX_PAYLOAD bytes."""
    if len(payload) <= MAX_PAYLOAD:
        return [frame(kind, chan, payload)]
    return [frame(kind, chan, payload[i:i + MAX_PAYLOAD]) for i in range(0, len(payload), MAX_PAYLOAD)]


def control(message: dict[str, Any]) -> bytes:
    return frame(CTL, 0, json.dumps(message, separators=(",", ":")).encode())


class FrameReader:
    """Reassembles frames from a byte stream."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self.buf
        buf += data
        out: list[tuple[int, int, bytes]] = []
        pos = 0
        size = HEADER.size
        while len(buf) - pos >= size:
            kind, chan, length = HEADER.unpack_from(buf, pos)
            if length > MAX_PAYLOAD:
                raise ValueError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
            end = pos + size + length
            if end > len(buf):
                break
            out.append((kind, chan, bytes(buf[pos + size:end])))
            pos = end
        if pos:
            del buf[:pos]
        return out
