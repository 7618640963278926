"""Invoking a function from the console: a JSON event editor, then the result, the logs, the
duration and whether it was a cold start (or, asynchronously, the queued event's id).  The
call goes through the engine exactly as ``POST /api/v1/functions/{name}/invoke`` does."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from impuls.auth.principal import Scope
from impuls.console import forms
from impuls.console.base import Console, blocking, enter, enter_post, failed, need, page
from impuls.console.session import Session
from impuls.engine.invoker import MAX_EVENT_BYTES
from impuls.engine.results import InvocationResult, Outcome
from impuls.errors import ImpulsError, PayloadTooLarge
from impuls.events.dispatcher import MAX_EVENT_BYTES as ASYNC_EVENT_BYTES
from impuls.functions.models import LATEST
from impuls.platform import Platform

DEFAULT_EVENT = '{\n  "name": "World"\n}\n'


def qualifiers(p: Platform, name: str) -> list[str]:
    """$LATEST, the published versions and the aliases of ``name``."""
    versions = [fn.version for fn in p.registry.versions(name) if fn.version != LATEST]
    aliases = [a.name for a in p.registry.list_aliases(name)]
    return [LATEST, *aliases, *versions]


def _shown(result: InvocationResult) -> dict[str, Any]:
    """A result as the page shows it (the body decoded as JSON where it is JSON)."""
    body: Any = None
    if result.error_type is None:
        try:
            body = json.loads(result.payload) if result.payload else None
        except (ValueError, UnicodeDecodeError):
            body = result.payload.decode("utf-8", "replace")
    return {"ok": result.outcome is Outcome.SUCCESS, "outcome": result.outcome.value, "body": body,
            "error_type": result.error_type, "error": result.error_message, "stack": result.stack,
            "logs": result.logs, "logs_truncated": result.logs_truncated,
            "duration_ms": result.duration_ms, "cold_start": result.cold_start,
            "request_id": result.request_id, "executed_version": result.executed_version}


async def render(console: Console, request: Request, session: Session, name: str, *, event: str | None = None,
                 qualifier: str = LATEST, mode: str = "sync", result: dict[str, Any] | None = None,
                 queued: str = "", error: str = "", status: int = 200) -> Response:
    need(session, Scope.READ, name)
    p = console.platform
    fn = await blocking(p.registry.get, name)
    choices = await blocking(qualifiers, p, name)
    if event is None:
        event = session.last_event.get(name, DEFAULT_EVENT)
    return page(console, request, session, "function/invoke.html", status=status, tab="invoke", fn=fn,
                qualifiers=choices, event=event, qualifier=qualifier, mode=mode, result=result,
                queued=queued, error=error)


async def invoke_page(request: Request) -> Response:
    console, session = await enter(request)
    return await render(console, request, session, request.path_params["name"])


async def invoke(request: Request) -> Response:
    console, session, form = await enter_post(request, MAX_EVENT_BYTES + 64 * 1024)
    name = request.path_params["name"]
    need(session, Scope.INVOKE, name)
    p = console.platform
    event = forms.text(form, "event")
    qualifier = forms.text(form, "qualifier", LATEST) or LATEST
    mode = "async" if forms.text(form, "mode") == "async" else "sync"
    session.last_event[name] = event
    payload = event.encode() if event.strip() else b"{}"
    try:
        forms.json_field(payload.decode(), "event")
        if mode == "async":
            if len(payload) > ASYNC_EVENT_BYTES:
                raise PayloadTooLarge(f"an asynchronous event of {len(payload)} bytes exceeds the "
                                      f"{ASYNC_EVENT_BYTES} byte limit")
            await p.invoker.check(name, qualifier)
            request_id = await p.events.accept(name, qualifier, payload, "console")
            return await render(console, request, session, name, event=event, qualifier=qualifier, mode=mode,
                                queued=request_id)
        result = await p.invoker.invoke(name, payload, qualifier=qualifier)
    except ImpulsError as exc:
        return await render(console, request, session, name, event=event, qualifier=qualifier, mode=mode,
                            error=exc.message, status=failed(exc))
    return await render(console, request, session, name, event=event, qualifier=qualifier, mode=mode,
                        result=_shown(result))


routes = [
    Route("/functions/{name}/invoke", invoke_page, methods=["GET"]),
    Route("/functions/{name}/invoke", invoke, methods=["POST"]),
]
