"""Asynchronous invocations of a function: their state, the event-invoke config, dead letters.

(Queueing one is ``POST .../invoke?async=true`` on the invoke fast path.)
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from impuls.api import contract as c
from impuls.api.body import read_json
from impuls.api.deps import actor_of, authorize, platform_of
from impuls.auth.principal import Scope
from impuls.errors import InvalidInput
from impuls.events import store
from impuls.store.db import MAX_INT

router = APIRouter(prefix="/api/v1/functions/{name}")
MAX_BODY = 64 * 1024
LATEST = "$LATEST"


@router.get("/invocations/{request_id}", responses=c.answers(c.Event, 404))
async def event(request: Request, name: str, request_id: str) -> dict[str, Any]:
    """An asynchronous invocation: its state, attempts and the outcome of each."""
    authorize(request, Scope.READ, name)
    p = platform_of(request)
    await run_in_threadpool(p.registry.get, name)
    return await run_in_threadpool(store.describe, p.db, name, request_id)


@router.get("/events", responses=c.answers(c.EventList, 404))
async def events(request: Request, name: str, limit: int = Query(50, ge=1, le=1000),
                 offset: int = Query(0, ge=0, le=MAX_INT)) -> dict[str, Any]:
    authorize(request, Scope.READ, name)
    p = platform_of(request)
    await run_in_threadpool(p.registry.get, name)
    return await run_in_threadpool(store.list_events, p.db, name, limit, offset)


# --- the event-invoke config -----------------------------------------------------------------


@router.get("/event-config", responses=c.answers(c.EventConfig, 404))
async def get_event_config(request: Request, name: str, qualifier: str = Query(LATEST)) -> dict[str, Any]:
    authorize(request, Scope.READ, name)
    config = await run_in_threadpool(platform_of(request).registry.get_event_config, name, qualifier)
    return config.to_api()


@router.put("/event-config", responses=c.answers(c.EventConfig, 404, 413, 415),
            openapi_extra=c.body(c.EventConfigPut))
async def put_event_config(request: Request, name: str, qualifier: str = Query(LATEST)) -> dict[str, Any]:
    """Replace the config: fields not given take their defaults (2 retries, 21600 s, no destinations)."""
    who = authorize(request, Scope.DEPLOY, name)
    body = await read_json(request.receive, request.headers.raw, MAX_BODY)
    if not isinstance(body, dict):
        raise InvalidInput("body: must be a JSON object")
    config = await run_in_threadpool(platform_of(request).registry.put_event_config, name, qualifier, body,
                                     actor_of(request, who))
    return config.to_api()


@router.delete("/event-config", responses=c.answers(c.Deleted, 404))
async def delete_event_config(request: Request, name: str, qualifier: str = Query(LATEST)) -> dict[str, Any]:
    who = authorize(request, Scope.DEPLOY, name)
    await run_in_threadpool(platform_of(request).registry.delete_event_config, name, qualifier,
                            actor_of(request, who))
    return {"message": "event-invoke config deleted", "name": name, "qualifier": qualifier}


# --- dead letters ----------------------------------------------------------------------------


@router.get("/dead-letters", responses=c.answers(c.DeadLetters, 404))
async def dead_letters(request: Request, name: str) -> dict[str, Any]:
    authorize(request, Scope.READ, name)
    p = platform_of(request)
    await run_in_threadpool(p.registry.get, name)
    letters = await run_in_threadpool(store.dead_letters_of, p.db, name)
    return {"dead_letters": letters, "count": len(letters)}


@router.post("/dead-letters/{letter}/redrive", status_code=202,
             responses=c.answers(c.Redriven, 404, status=202))
async def redrive(request: Request, name: str, letter: str) -> dict[str, Any]:
    """Queue the letter's original event again (a new request id); the letter is gone."""
    authorize(request, Scope.DEPLOY, name)
    p = platform_of(request)
    request_id = await run_in_threadpool(store.redrive, p.db, name, letter, p.events.clock())
    p.events.wake()
    return {"request_id": request_id}


@router.delete("/dead-letters/{letter}", responses=c.answers(c.Deleted, 404))
async def delete_dead_letter(request: Request, name: str, letter: str) -> dict[str, Any]:
    authorize(request, Scope.DEPLOY, name)
    await run_in_threadpool(store.delete_dead_letter, platform_of(request).db, name, letter)
    return {"message": "dead letter deleted", "id": letter}
