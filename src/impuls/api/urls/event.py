"""An HTTP request as Lambda's payload format 2.0 event, as function URLs send it."""

from __future__ import annotations

import base64
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

#: bodies of these content types reach the function as text; any other as base64
TEXT_TYPES = ("text/", "application/json", "application/javascript", "application/xml",
              "application/x-www-form-urlencoded", "application/graphql")
TEXT_SUFFIXES = ("+json", "+xml")


@dataclass(frozen=True)
class Request:
    method: str
    #: the path after the URL's prefix, starting with "/"
    path: str
    raw_query: str
    #: (lower-case name, value), in the order received
    headers: list[tuple[str, str]]
    body: bytes
    source_ip: str
    protocol: str
    #: the host the client used, the URL's id and the account
    domain: str
    url_id: str
    account: str


def is_text(content_type: str) -> bool:
    ctype = content_type.split(";", 1)[0].strip().lower()
    return ctype.startswith(TEXT_TYPES) or ctype.endswith(TEXT_SUFFIXES)


def _joined(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Repeated names joined with commas, as function URLs do."""
    out: dict[str, str] = {}
    for name, value in pairs:
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


def build(request: Request, request_id: str | None = None) -> dict[str, Any]:
    """The event (see the payload format 2.0 definition); ``Cookie`` headers become ``cookies``."""
    cookies = [c.strip() for name, value in request.headers if name == "cookie"
               for c in value.split(";") if c.strip()]
    headers = _joined([(n, v) for n, v in request.headers if n != "cookie"])
    now = time.time()
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": request.path,
        "rawQueryString": request.raw_query,
        "headers": headers,
        "requestContext": {
            "accountId": request.account,
            "apiId": request.url_id,
            "domainName": request.domain,
            "domainPrefix": request.domain.split(".", 1)[0],
            "http": {"method": request.method, "path": request.path, "protocol": request.protocol,
                     "sourceIp": request.source_ip, "userAgent": headers.get("user-agent", "")},
            "requestId": request_id or str(uuid.uuid4()),
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": False,
    }
    if cookies:
        event["cookies"] = cookies
    if request.raw_query:
        event["queryStringParameters"] = _joined(parse_qsl(request.raw_query, keep_blank_values=True))
    if request.body:
        if is_text(headers.get("content-type", "")):
            with contextlib.suppress(UnicodeDecodeError):  # not UTF-8 after all: base64 below
                event["body"] = request.body.decode("utf-8")
        if "body" not in event:
            event["body"] = base64.b64encode(request.body).decode("ascii")
            event["isBase64Encoded"] = True
    return event
