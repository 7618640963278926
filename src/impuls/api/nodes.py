"""``/api/v1/nodes``: the nodes sharing this store, with their heartbeats (admin scope)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from impuls.api import contract as c
from impuls.api.deps import authorize, platform_of
from impuls.auth.principal import Scope

router = APIRouter(prefix="/api/v1/nodes")


@router.get("", responses=c.answers(c.NodeList))
async def list_nodes(request: Request) -> dict[str, Any]:
    authorize(request, Scope.ADMIN)
    platform = platform_of(request)
    table = platform.member.table
    found = await run_in_threadpool(table.list)
    return {"node": platform.node, "heartbeat_seconds": table.heartbeat_seconds,
            "down_after_seconds": table.down_after.total_seconds(), "nodes": found}
