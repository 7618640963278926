"""``/api/v1/functions/{name}/versions`` and ``.../aliases``: publish, list and delete
versions; create, read, change and delete aliases (included by :mod:`impuls.api.functions`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from impuls.api import contract as c
from impuls.api.body import read_json, read_optional_json
from impuls.api.deps import actor_of, authorize, platform_of
from impuls.auth.principal import Scope
from impuls.errors import InvalidInput

MAX_BODY = 64 * 1024

router = APIRouter()


def _fields(body: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidInput("body: must be a JSON object")
    for key in body:
        if key not in allowed:
            raise InvalidInput(f"{key}: unknown field (allowed: {', '.join(allowed)})")
    return body


@router.post("/{name}/versions", status_code=201, responses=c.answers(c.Function, *c.WRITE, 412, status=201),
             openapi_extra=c.body(c.VersionPublish, required=False))
async def publish_version(request: Request, name: str) -> JSONResponse:
    who = authorize(request, Scope.DEPLOY, name)
    p = platform_of(request)
    body = _fields(await read_optional_json(request.receive, request.headers.raw, MAX_BODY),
                   ("description", "code_sha256", "revision_id"))
    fn = await run_in_threadpool(p.registry.publish, name, actor_of(request, who),
                                 body.get("description", ""), body.get("code_sha256"),
                                 body.get("revision_id"))
    return JSONResponse(fn.to_api(), status_code=201)


@router.get("/{name}/versions", responses=c.answers(c.VersionList, 404))
async def list_versions(request: Request, name: str) -> dict[str, Any]:
    authorize(request, Scope.READ, name)
    versions = await run_in_threadpool(platform_of(request).registry.versions, name)
    return {"versions": [fn.to_api(list_item=True) for fn in versions]}


@router.post("/{name}/aliases", status_code=201, responses=c.answers(c.Alias, 404, 409, 413, 415, status=201),
             openapi_extra=c.body(c.AliasCreate))
async def create_alias(request: Request, name: str) -> JSONResponse:
    who = authorize(request, Scope.DEPLOY, name)
    body = _fields(await read_json(request.receive, request.headers.raw, MAX_BODY),
                   ("name", "function_version", "description", "routing"))
    for required in ("name", "function_version"):
        if required not in body:
            raise InvalidInput(f"{required}: required")
    alias = await run_in_threadpool(
        platform_of(request).registry.create_alias, name, body["name"], body["function_version"],
        actor_of(request, who), body.get("description", ""), body.get("routing"))
    return JSONResponse(alias.to_api(), status_code=201)


@router.get("/{name}/aliases", responses=c.answers(c.AliasList, 404))
async def list_aliases(request: Request, name: str,
                       function_version: str | None = Query(None)) -> dict[str, Any]:
    authorize(request, Scope.READ, name)
    aliases = await run_in_threadpool(platform_of(request).registry.list_aliases, name, function_version)
    return {"aliases": [alias.to_api() for alias in aliases]}


@router.get("/{name}/aliases/{alias}", responses=c.answers(c.Alias, 404))
async def get_alias(request: Request, name: str, alias: str) -> dict[str, Any]:
    authorize(request, Scope.READ, name)
    found = await run_in_threadpool(platform_of(request).registry.get_alias, name, alias)
    return found.to_api()


@router.patch("/{name}/aliases/{alias}", responses=c.answers(c.Alias, 404, 409, 412, 413, 415),
              openapi_extra=c.body(c.AliasUpdate))
async def update_alias(request: Request, name: str, alias: str) -> dict[str, Any]:
    who = authorize(request, Scope.DEPLOY, name)
    body = _fields(await read_json(request.receive, request.headers.raw, MAX_BODY),
                   ("function_version", "description", "routing", "revision_id"))
    changed = await run_in_threadpool(
        platform_of(request).registry.update_alias, name, alias, actor_of(request, who),
        body.get("function_version"), body.get("description"), body.get("routing"), body.get("revision_id"))
    return changed.to_api()


@router.delete("/{name}/aliases/{alias}", responses=c.answers(c.Deleted, 404, 409))
async def delete_alias(request: Request, name: str, alias: str) -> dict[str, Any]:
    who = authorize(request, Scope.DEPLOY, name)
    await run_in_threadpool(platform_of(request).registry.delete_alias, name, alias, actor_of(request, who))
    return {"message": "Alias deleted successfully", "name": name, "alias": alias}
