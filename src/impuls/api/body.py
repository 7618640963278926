"""Reading request bodies with a size limit, and checking that they are JSON.

Works on the bare ASGI ``receive`` so that the invocation fast path and the
FastAPI routes share it (a route passes ``request.receive``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from starlette import types

from impuls.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

Headers = Iterable[tuple[bytes, bytes]]


def _header(headers: Headers, name: bytes) -> str:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return ""


async def read_body(receive: types.Receive, headers: Headers, limit: int) -> bytes:
    """The raw body, or PayloadTooLarge as soon as it (or its Content-Length) exceeds ``limit``."""
    declared = _header(headers, b"content-length")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the {limit} byte limit")
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit} byte limit")
        if not message.get("more_body", False):
            break
    return bytes(body)


def require_json_type(headers: Headers) -> None:
    """UnsupportedMediaType unless the Content-Type is JSON (a missing one is taken as JSON)."""
    ctype = _header(headers, b"content-type").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type must be application/json, not {ctype!r}")


def parse_json(raw: bytes, what: str = "body") -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{what}: not valid JSON ({exc})") from exc


async def read_json(receive: types.Receive, headers: Headers, limit: int) -> Any:
    """A JSON request body (required, at most ``limit`` bytes, of a JSON content type)."""
    require_json_type(headers)
    raw = await read_body(receive, headers, limit)
    if not raw.strip():
        raise InvalidInput("body: a JSON object is required")
    return parse_json(raw)


async def read_optional_json(receive: types.Receive, headers: Headers, limit: int) -> Any:
    """Like :func:`read_json`, but an empty body is ``{}``."""
    raw = await read_body(receive, headers, limit)
    if not raw.strip():
        return {}
    require_json_type(headers)
    return parse_json(raw)
