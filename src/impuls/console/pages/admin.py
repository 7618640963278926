"""Admin only: API keys (create -- the secrets shown this once --, revoke) and the audit log.
And for every signed-in key: the system page (sandbox, isolation, instances, queue, store)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from impuls import __version__
from impuls.auth import audit
from impuls.auth.principal import Scope
from impuls.console import forms
from impuls.console.base import Console, actor, blocking, enter, enter_post, failed, need, page
from impuls.console.pages.functions import page_number, pages
from impuls.console.render import redirect
from impuls.console.session import Session
from impuls.errors import ImpulsError
from impuls.events import store
from impuls.platform import Platform

AUDIT_PAGE = 50
SCOPES = [s.label for s in Scope]


async def _keys(console: Console, request: Request, session: Session, *, new: dict[str, Any] | None = None,
                error: str = "", values: dict[str, str] | None = None, status: int = 200) -> Response:
    need(session, Scope.ADMIN)
    keys = await blocking(console.platform.keys.list)
    return page(console, request, session, "keys.html", status=status, keys=keys, new=new, error=error,
                scopes=SCOPES, form=values or {"scope": "read", "functions": "*"})


async def keys_page(request: Request) -> Response:
    console, session = await enter(request)
    return await _keys(console, request, session)


async def create_key(request: Request) -> Response:
    """The new key's secrets go into this one answer (never stored, never redirected to)."""
    console, session, form = await enter_post(request)
    who = need(session, Scope.ADMIN)
    try:
        made = await blocking(console.platform.keys.create, forms.text(form, "name").strip(),
                              forms.text(form, "scope"), forms.text(form, "functions").strip() or "*",
                              actor(request, who))
    except ImpulsError as exc:
        return await _keys(console, request, session, error=exc.message, values=forms.values(form),
                           status=failed(exc))
    return await _keys(console, request, session, new=made.to_api(), status=201)


async def revoke_key(request: Request) -> Response:
    console, session, form = await enter_post(request)
    who = need(session, Scope.ADMIN)
    name = forms.text(form, "name")
    try:
        await blocking(console.platform.keys.revoke, name, actor(request, who))
    except ImpulsError as exc:
        return await _keys(console, request, session, error=exc.message, status=failed(exc))
    console.sessions.drop_principal(name)
    session.flash.append(("saved", f"key {name} revoked"))
    return redirect("/keys")


async def audit_page(request: Request) -> Response:
    console, session = await enter(request)
    need(session, Scope.ADMIN)
    number = page_number(request)
    entries, total = await blocking(audit.query, console.platform.db, AUDIT_PAGE, (number - 1) * AUDIT_PAGE)
    return page(console, request, session, "audit.html", entries=entries, total=total, page=number,
                pages=pages(total, AUDIT_PAGE))


def _system(p: Platform) -> dict[str, Any]:
    facts = p.describe()
    return {"facts": facts, "queue_depth": store.depth(p.db),
            "store": p.store_description(), "runtimes": p.registry.runtimes.available()}


async def system_page(request: Request) -> Response:
    console, session = await enter(request)
    need(session, Scope.READ)
    p = console.platform
    data = await blocking(_system, p)
    return page(console, request, session, "system.html", settings=p.settings, server_version=__version__,
                engine=p.invoker.stats(), **data)


routes = [
    Route("/keys", keys_page, methods=["GET"]),
    Route("/keys", create_key, methods=["POST"]),
    Route("/keys/revoke", revoke_key, methods=["POST"]),
    Route("/audit", audit_page, methods=["GET"]),
    Route("/system", system_page, methods=["GET"]),
]
