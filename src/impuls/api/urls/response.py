"""A function's result as the HTTP response of its URL (Lambda's rules for function URLs).

The result may be ``{statusCode, headers, body, isBase64Encoded, cookies}``; without
``statusCode`` Lambda infers a 200 ``application/json`` response whose body is the
result (a JSON string's text as it is).  Failures are Lambda's fixed answers.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from impuls.engine.results import InvocationResult, Outcome


@dataclass
class HttpResponse:
    status: int
    #: (lower-case name, value); several Set-Cookie lines stay apart
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


def fixed(status: int, message: str) -> HttpResponse:
    return HttpResponse(status, [("content-type", "application/json")],
                        json.dumps({"message": message}).encode())


INTERNAL_ERROR = (502, "Internal Server Error")
TIMED_OUT = (504, "Service Unavailable")
THROTTLED = (429, "Rate Exceeded.")
TOO_LARGE = (413, "Request Too Long")
NOT_FOUND = (404, "Not Found")
FORBIDDEN = (403, "Forbidden")


def from_result(result: InvocationResult) -> HttpResponse:
    if result.outcome is Outcome.TIMEOUT:
        return fixed(*TIMED_OUT)
    if result.outcome is not Outcome.SUCCESS:
        return fixed(*INTERNAL_ERROR)
    try:
        value = json.loads(result.payload) if result.payload else None
    except (ValueError, UnicodeDecodeError):
        return HttpResponse(200, [("content-type", "application/json")], result.payload)
    if isinstance(value, dict) and "statusCode" in value:
        return _explicit(value)
    if isinstance(value, str):
        return HttpResponse(200, [("content-type", "application/json")], value.encode())
    return HttpResponse(200, [("content-type", "application/json")], result.payload)


def _explicit(value: dict[str, Any]) -> HttpResponse:
    """``{statusCode, headers, body, isBase64Encoded, cookies}``; a malformed one is a 502."""
    status = value.get("statusCode")
    headers = value.get("headers") or {}
    cookies = value.get("cookies") or []
    body = value.get("body")
    if (not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599
            or not isinstance(headers, dict) or not isinstance(cookies, list)):
        return fixed(*INTERNAL_ERROR)
    out = HttpResponse(status, [(str(k).lower(), str(v)) for k, v in headers.items()])
    out.headers += [("set-cookie", str(c)) for c in cookies]
    if body is None:
        return out
    if not isinstance(body, str):
        body = json.dumps(body)
    if value.get("isBase64Encoded"):
        try:
            out.body = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return fixed(*INTERNAL_ERROR)
    else:
        out.body = body.encode()
    if not any(name == "content-type" for name, _ in out.headers):
        out.headers.append(("content-type", "application/json"))
    return out
