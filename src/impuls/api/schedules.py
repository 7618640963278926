"""``/api/v1/functions/{name}/schedules``: a function's schedules (fired by
:class:`impuls.events.scheduler.Scheduler`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from impuls.api import contract as c
from impuls.api.body import read_json
from impuls.api.deps import actor_of, authorize, platform_of
from impuls.auth.principal import Scope
from impuls.errors import InvalidInput
from impuls.events.scheduler import ScheduleStore

#: a payload may be 256 KB of JSON; room for the other fields and escapes
MAX_BODY = 512 * 1024

router = APIRouter(prefix="/api/v1/functions/{name}/schedules")


def _store(request: Request) -> ScheduleStore:
    return ScheduleStore(platform_of(request).db)


async def _body(request: Request) -> dict[str, Any]:
    body = await read_json(request.receive, request.headers.raw, MAX_BODY)
    if not isinstance(body, dict):
        raise InvalidInput("body: must be a JSON object")
    return body


@router.post("", status_code=201, responses=c.answers(c.Schedule, 404, 409, 413, 415, status=201),
             openapi_extra=c.body(c.ScheduleCreate))
async def create_schedule(request: Request, name: str) -> JSONResponse:
    who = authorize(request, Scope.DEPLOY, name)
    body = await _body(request)
    schedule = await run_in_threadpool(_store(request).create, name, body, actor_of(request, who))
    return JSONResponse(schedule.to_api(), status_code=201)


@router.get("", responses=c.answers(c.ScheduleList, 404))
async def list_schedules(request: Request, name: str) -> dict[str, Any]:
    authorize(request, Scope.READ, name)
    found = await run_in_threadpool(_store(request).list, name)
    return {"schedules": [s.to_api() for s in found]}


@router.get("/{schedule}", responses=c.answers(c.Schedule, 404))
async def get_schedule(request: Request, name: str, schedule: str) -> dict[str, Any]:
    authorize(request, Scope.READ, name)
    return (await run_in_threadpool(_store(request).get, name, schedule)).to_api()


@router.patch("/{schedule}", responses=c.answers(c.Schedule, 404, 413, 415),
              openapi_extra=c.body(c.ScheduleUpdate))
async def update_schedule(request: Request, name: str, schedule: str) -> dict[str, Any]:
    who = authorize(request, Scope.DEPLOY, name)
    body = await _body(request)
    changed = await run_in_threadpool(_store(request).update, name, schedule, body, actor_of(request, who))
    return changed.to_api()


@router.delete("/{schedule}", responses=c.answers(c.Deleted, 404))
async def delete_schedule(request: Request, name: str, schedule: str) -> dict[str, Any]:
    who = authorize(request, Scope.DEPLOY, name)
    await run_in_threadpool(_store(request).delete, name, schedule, actor_of(request, who))
    return {"message": "Schedule deleted", "function_name": name, "name": schedule}
