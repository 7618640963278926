"""Invocation records and logs of a function (invoking itself: :mod:`impuls.api.invoke`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from impuls.api import contract as c
from impuls.api.deps import authorize, platform_of
from impuls.auth.principal import Scope
from impuls.store.db import MAX_INT

if TYPE_CHECKING:
    from impuls.engine.records import LogHub

router = APIRouter(prefix="/api/v1/functions/{name}")
KEEPALIVE_SECONDS = 15.0
LOG_ANSWERS = c.answers(c.Logs, 404)
LOG_ANSWERS[200]["content"] = {"text/event-stream": {"schema": {"type": "string"}}}  # follow=true


@router.get("/invocations", responses=c.answers(c.InvocationList, 404))
async def invocations(request: Request, name: str, limit: int = Query(50, ge=1, le=1000),
                      offset: int = Query(0, ge=0, le=MAX_INT)) -> dict[str, Any]:
    authorize(request, Scope.READ, name)
    p = platform_of(request)
    await run_in_threadpool(p.registry.get, name)
    await p.recorder.flush()
    records, total = await run_in_threadpool(p.recorder.query, name, limit, offset)
    return {"invocations": [r.to_api() for r in records], "count": len(records), "total": total}


@router.get("/logs", response_model=None, responses=LOG_ANSWERS)
async def logs(request: Request, name: str, follow: bool = False,
               limit: int = Query(20, ge=1, le=1000)) -> Response | dict[str, Any]:
    """Recent invocations' logs (oldest first); with ``follow=true`` a server-sent event stream."""
    authorize(request, Scope.READ, name)
    p = platform_of(request)
    await run_in_threadpool(p.registry.get, name)
    if not follow:
        await p.recorder.flush()
        records, _ = await run_in_threadpool(p.recorder.query, name, limit, 0)
        return {"logs": [{"request_id": r.request_id, "started_at": r.to_api()["started_at"],
                          "logs": r.logs, "truncated": r.logs_truncated} for r in reversed(records)]}
    return follow_logs(p.hub, name)


def follow_logs(hub: LogHub, name: str,
                still_live: Callable[[], Awaitable[bool]] | None = None) -> StreamingResponse:
    """A server-sent event stream of ``name``'s output as it is written: ``data: {"request_id",
    "text"}`` per piece, ``: keep-alive`` every 15 s; it ends when ``still_live`` (asked at each
    keep-alive) says no, or when the client goes."""
    queue = hub.subscribe(name)

    async def events() -> AsyncIterator[bytes]:
        try:
            yield b": following logs of " + name.encode() + b"\n\n"
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    if still_live is not None and not await still_live():
                        return
                    yield b": keep-alive\n\n"
                    continue
                yield b"data: " + json.dumps(event).encode() + b"\n\n"
        finally:
            hub.unsubscribe(name, queue)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
