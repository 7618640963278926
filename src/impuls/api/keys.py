"""``/api/v1/keys`` and ``/api/v1/audit``: API keys and the audit log (admin scope)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from impuls.api import contract as c
from impuls.api.body import read_json
from impuls.api.deps import actor_of, authorize, platform_of
from impuls.auth import audit
from impuls.auth.principal import Scope
from impuls.errors import InvalidInput
from impuls.store.db import MAX_INT

router = APIRouter(prefix="/api/v1")
MAX_KEY_BODY = 4096
KEY_FIELDS = {"name", "scope", "functions"}


@router.post("/keys", status_code=201, responses=c.answers(c.KeyCreated, 409, 413, 415, status=201),
             openapi_extra=c.body(c.KeyCreate))
async def create_key(request: Request) -> JSONResponse:
    """A new key; the answer holds its secrets (the key, the AWS secret), shown this once."""
    who = authorize(request, Scope.ADMIN)
    body = await read_json(request.receive, request.headers.raw, MAX_KEY_BODY)
    if not isinstance(body, dict):
        raise InvalidInput("body: must be a JSON object")
    unknown = sorted(set(body) - KEY_FIELDS)
    if unknown:
        raise InvalidInput(f"{unknown[0]}: unknown field")
    new = await run_in_threadpool(platform_of(request).keys.create, body.get("name"),
                                  body.get("scope"), body.get("functions", "*"), actor_of(request, who))
    return JSONResponse(new.to_api(), status_code=201)


@router.get("/keys", responses=c.answers(c.KeyList))
async def list_keys(request: Request) -> dict[str, Any]:
    authorize(request, Scope.ADMIN)
    return {"keys": await run_in_threadpool(platform_of(request).keys.list)}


@router.delete("/keys/{name}", responses=c.answers(c.KeyRevoked, 404))
async def revoke_key(request: Request, name: str) -> dict[str, Any]:
    who = authorize(request, Scope.ADMIN)
    return await run_in_threadpool(platform_of(request).keys.revoke, name, actor_of(request, who))


@router.get("/audit", responses=c.answers(c.AuditLog))
async def audit_log(request: Request, limit: int = Query(100, ge=1, le=1000),
                    offset: int = Query(0, ge=0, le=MAX_INT)) -> dict[str, Any]:
    authorize(request, Scope.ADMIN)
    entries, total = await run_in_threadpool(audit.query, platform_of(request).db, limit, offset)
    return {"entries": entries, "count": len(entries), "total": total}
