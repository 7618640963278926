"""``/api/v1/functions``: create, list, get, update, delete (versions and aliases:
:mod:`impuls.api.versions`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from impuls.api import contract as c
from impuls.api import versions
from impuls.api.body import read_json
from impuls.api.deps import actor_of, authorize, platform_of
from impuls.auth.principal import Scope
from impuls.errors import InvalidInput
from impuls.functions.models import MAX_ZIP_BYTES, Function
from impuls.platform import Platform
from impuls.store.db import MAX_INT

# base64 of the largest zip, plus room for the other fields
MAX_FUNCTION_BODY = (MAX_ZIP_BYTES * 4) // 3 + 1024 * 1024

UPDATE_ANSWERS = c.answers(c.Function, *c.WRITE, 412)

router = APIRouter(prefix="/api/v1/functions")
router.include_router(versions.router)


def _full(p: Platform, fn: Function) -> dict[str, Any]:
    """A function with its code and build status."""
    return {**fn.to_api(p.registry.code(fn)), "build": p.registry.build_info(fn)}


@router.post("", status_code=201, responses=c.answers(c.Function, *c.WRITE, status=201),
             openapi_extra=c.body(c.FunctionCreate))
async def create_function(request: Request) -> JSONResponse:
    who = authorize(request, Scope.DEPLOY)
    p = platform_of(request)
    body = await read_json(request.receive, request.headers.raw, MAX_FUNCTION_BODY)
    if isinstance(body, dict) and isinstance(body.get("name"), str):
        who.require(Scope.DEPLOY, body["name"])
    fn = await run_in_threadpool(p.registry.create, body, actor_of(request, who))
    return JSONResponse(await run_in_threadpool(_full, p, fn), status_code=201)


@router.get("", responses=c.answers(c.FunctionList))
async def list_functions(
    request: Request,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_INT),
) -> dict[str, Any]:
    who = authorize(request, Scope.READ)
    p = platform_of(request)
    items, total = await run_in_threadpool(p.registry.list, limit, offset, who.functions)
    return {
        "functions": [fn.to_api(list_item=True) for fn in items],
        "count": len(items),
        "total": total,
        "limit": limit,
        "offset": offset,
    }


@router.get("/{name}", responses=c.answers(c.Function, 404))
async def get_function(request: Request, name: str, qualifier: str | None = Query(None)) -> dict[str, Any]:
    """$LATEST, or with ``?qualifier=`` a version number or an alias's version."""
    authorize(request, Scope.READ, name)
    p = platform_of(request)
    fn = await run_in_threadpool(p.registry.get, name, qualifier or None)
    return await run_in_threadpool(_full, p, fn)


@router.put("/{name}", responses=UPDATE_ANSWERS, openapi_extra=c.body(c.FUNCTION_UPDATE))
@router.patch("/{name}", responses=UPDATE_ANSWERS, openapi_extra=c.body(c.FUNCTION_UPDATE))
async def update_function(request: Request, name: str) -> dict[str, Any]:
    who = authorize(request, Scope.DEPLOY, name)
    p = platform_of(request)
    body = await read_json(request.receive, request.headers.raw, MAX_FUNCTION_BODY)
    fn = await run_in_threadpool(p.registry.update, name, body, actor_of(request, who))
    return await run_in_threadpool(_full, p, fn)


@router.put("/{name}/concurrency", responses=c.answers(c.ConcurrencyOut, 404, 413, 415),
            openapi_extra=c.body(c.Concurrency))
async def put_concurrency(request: Request, name: str) -> dict[str, Any]:
    """``{"reserved_concurrency": n}``: the function's limit for every version (0 throttles)."""
    who = authorize(request, Scope.DEPLOY, name)
    body = await read_json(request.receive, request.headers.raw, 4096)
    if not isinstance(body, dict) or set(body) != {"reserved_concurrency"}:
        raise InvalidInput("body: must be {\"reserved_concurrency\": <whole number>}")
    fn = await run_in_threadpool(platform_of(request).registry.put_concurrency, name,
                                 body["reserved_concurrency"], actor_of(request, who))
    return {"name": name, "reserved_concurrency": fn.reserved_concurrency}


@router.delete("/{name}/concurrency", responses=c.answers(c.ConcurrencyOut, 404))
async def delete_concurrency(request: Request, name: str) -> dict[str, Any]:
    who = authorize(request, Scope.DEPLOY, name)
    await run_in_threadpool(platform_of(request).registry.delete_concurrency, name, actor_of(request, who))
    return {"name": name, "reserved_concurrency": None}


@router.delete("/{name}", responses=c.answers(c.Deleted, 404, 409))
async def delete_function(request: Request, name: str, qualifier: str | None = Query(None)) -> dict[str, Any]:
    """The function with everything it has, or with ``?qualifier=N`` version N alone."""
    who = authorize(request, Scope.DEPLOY, name)
    p = platform_of(request)
    await run_in_threadpool(p.registry.delete, name, actor_of(request, who), qualifier or None)
    if qualifier:
        return {"message": "Version deleted successfully", "name": name, "version": qualifier}
    return {"message": "Function deleted successfully", "name": name}
