"""Reading request bodies with size and media-type limits."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from impuls.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, or PayloadTooLarge as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the {limit} byte limit")
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit} byte limit")
    return bytes(chunks)


def require_json_type(request: Request) -> None:
    """415 unless the Content-Type is JSON (a missing Content-Type is taken as JSON)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type must be application/json, not {ctype!r}")


def parse_json(raw: bytes, what: str = "body") -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{what}: not valid JSON ({exc})") from exc


async def read_json(request: Request, limit: int) -> Any:
    require_json_type(request)
    raw = await read_body(request, limit)
    if not raw.strip():
        raise InvalidInput("body: a JSON object is required")
    return parse_json(raw)
