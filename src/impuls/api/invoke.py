"""``POST /api/v1/functions/{name}/invoke`` as a bare ASGI handler.

Invocation is the hot path: served here, in front of FastAPI, it skips the
framework's routing, dependency and response machinery (about half of the
server's CPU per call in the benchmark profile).  Everything else goes to
the FastAPI app.  The contract is the same as every other route: the event
is the body (an empty body is ``{}``), at most 6 MB; errors are
``{"error": true, "message": ...}`` with the status of the
:class:`~impuls.errors.ImpulsError`.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

from impuls.engine.invoker import MAX_EVENT_BYTES
from impuls.errors import ImpulsError, InvalidInput, PayloadTooLarge

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, MutableMapping

    from impuls.platform import Platform

    Scope = MutableMapping[str, Any]
    Message = MutableMapping[str, Any]
    Receive = Callable[[], Awaitable[Message]]
    Send = Callable[[Message], Awaitable[None]]
    ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("impuls.api")
INVOKE_PATH = re.compile(r"^/api/v1/functions/([^/]+)/invoke$")
JSON_HEADERS = [(b"content-type", b"application/json")]
TRUE = {"1", "true", "yes", "on"}


class InvokeFastPath:
    """Routes invocations to the engine directly; passes every other request to ``app``."""

    def __init__(self, app: ASGIApp, platform: Platform) -> None:
        self.app = app
        self.platform = platform

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = INVOKE_PATH.match(scope["path"]) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await _reply(send, 405, _error("method not allowed"), [(b"allow", b"POST")])
            return
        try:
            for name, value in scope["headers"]:
                if name == b"content-length" and value.isdigit() and int(value) > MAX_EVENT_BYTES:
                    raise PayloadTooLarge(
                        f"request body of {int(value)} bytes exceeds the {MAX_EVENT_BYTES} byte limit")
            payload = await _read_body(receive, MAX_EVENT_BYTES)
            if not payload.strip():
                payload = b"{}"
            else:
                _check_json(payload)
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            local = query.get("local", ["false"])[-1].lower() in TRUE
            result = await self.platform.invoker.invoke(unquote(match[1]), payload, local=local)
        except ImpulsError as exc:
            if exc.status >= 500:
                log.error("invocation failed: %s", exc.message)
            await _reply(send, exc.status, _error(exc.message))
            return
        except Exception:
            log.exception("internal error during an invocation")
            await _reply(send, 500, _error("internal server error"))
            return
        await _reply(send, result.http_status, result.to_json())


def _error(message: str) -> bytes:
    return json.dumps({"error": True, "message": message}).encode()


def _check_json(payload: bytes) -> None:
    try:
        json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"event: not valid JSON ({exc})") from exc


async def _read_body(receive: Receive, limit: int) -> bytes:
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


async def _reply(send: Send, status: int, body: bytes,
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
