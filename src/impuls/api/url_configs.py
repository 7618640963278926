"""``/api/v1/functions/{name}/url``: a function's URL configuration (``?qualifier=`` for an alias's).

Serving the URL is :mod:`impuls.api.urls`; the Lambda API's ``*FunctionUrlConfig``
operations change the same records.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from impuls.api import contract as c
from impuls.api.body import read_json
from impuls.api.deps import actor_of, authorize, platform_of
from impuls.auth.principal import Scope
from impuls.errors import InvalidInput
from impuls.functions.urls import UrlConfig

MAX_BODY = 64 * 1024
FIELDS = ("auth_type", "cors", "invoke_mode")
LATEST = "$LATEST"

router = APIRouter(prefix="/api/v1/functions/{name}/url")


def _with_url(request: Request, config: UrlConfig) -> dict[str, Any]:
    """The configuration and the URL it serves (on the host the client used)."""
    base = str(request.base_url).rstrip("/")
    suffix = "" if config.qualifier == LATEST else f":{config.qualifier}"
    return {**config.to_api(), "url": f"{base}/fn/{config.function_name}{suffix}/"}


async def _body(request: Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    body = await read_json(request.receive, request.headers.raw, MAX_BODY)
    if not isinstance(body, dict):
        raise InvalidInput("body: must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise InvalidInput(f"{unknown[0]}: unknown field (allowed: {', '.join(allowed)})")
    return body


@router.post("", status_code=201, responses=c.answers(c.UrlConfig, 404, 409, 413, 415, status=201),
             openapi_extra=c.body(c.UrlCreate))
async def create_url(request: Request, name: str) -> JSONResponse:
    who = authorize(request, Scope.DEPLOY, name)
    body = await _body(request, ("qualifier", *FIELDS))
    qualifier = body.pop("qualifier", LATEST)
    if not isinstance(qualifier, str):
        raise InvalidInput("qualifier: must be $LATEST or an alias name")
    config = await run_in_threadpool(platform_of(request).registry.put_url_config, name, qualifier, body,
                                     actor_of(request, who), True)
    return JSONResponse(_with_url(request, config), status_code=201)


@router.get("", responses=c.answers(c.UrlConfig, 404))
async def get_url(request: Request, name: str, qualifier: str = Query(LATEST)) -> dict[str, Any]:
    authorize(request, Scope.READ, name)
    config = await run_in_threadpool(platform_of(request).registry.get_url_config, name, qualifier)
    return _with_url(request, config)


@router.patch("", responses=c.answers(c.UrlConfig, 404, 413, 415), openapi_extra=c.body(c.UrlUpdate))
async def update_url(request: Request, name: str, qualifier: str = Query(LATEST)) -> dict[str, Any]:
    who = authorize(request, Scope.DEPLOY, name)
    body = await _body(request, FIELDS)
    config = await run_in_threadpool(platform_of(request).registry.put_url_config, name, qualifier, body,
                                     actor_of(request, who), False)
    return _with_url(request, config)


@router.delete("", responses=c.answers(c.Deleted, 404))
async def delete_url(request: Request, name: str, qualifier: str = Query(LATEST)) -> dict[str, Any]:
    who = authorize(request, Scope.DEPLOY, name)
    await run_in_threadpool(platform_of(request).registry.delete_url_config, name, qualifier,
                            actor_of(request, who))
    return {"message": "URL configuration deleted", "name": name, "qualifier": qualifier}
