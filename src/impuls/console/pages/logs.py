"""A function's logs: those of the last calls, and the output of new calls as it is written,
followed live over server-sent events -- ``GET /api/v1/functions/{name}/logs?follow=true``'s
stream, with the session cookie instead of a bearer key."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from impuls.api.invocations import follow_logs
from impuls.auth.principal import Scope
from impuls.console.base import SignInRequired, blocking, enter, need, page
from impuls.console.session import COOKIE

RECENT = 20


async def logs_page(request: Request) -> Response:
    console, session = await enter(request)
    name = request.path_params["name"]
    need(session, Scope.READ, name)
    p = console.platform
    fn = await blocking(p.registry.get, name)
    await p.recorder.flush()
    records, _ = await blocking(p.recorder.query, name, RECENT, 0)
    return page(console, request, session, "function/logs.html", tab="logs", fn=fn,
                records=list(reversed(records)))


async def stream(request: Request) -> Response:
    """``data: {"request_id", "text"}`` per piece of output, ``: keep-alive`` every 15 s; the
    stream ends when the session does (signed out, expired, its key revoked)."""
    console, session = await enter(request)
    name = request.path_params["name"]
    need(session, Scope.READ, name)
    p = console.platform
    await blocking(p.registry.get, name)
    session_id = request.cookies.get(COOKIE)

    async def still_live() -> bool:
        live = console.sessions.get(session_id)
        return live is not None and (not p.settings.auth or await asyncio.to_thread(
            p.keys.still_valid, live.principal))

    return follow_logs(p.hub, name, still_live)


async def stream_or_401(request: Request) -> Response:
    try:
        return await stream(request)
    except SignInRequired:
        return Response("sign in first\n", status_code=401, media_type="text/plain")


routes = [
    Route("/functions/{name}/logs", logs_page, methods=["GET"]),
    Route("/functions/{name}/logs/stream", stream_or_401, methods=["GET"]),
]
