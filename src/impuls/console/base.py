"""What every console handler starts with: the console, the session of the request (or a
redirect to sign in), and for a POST the form, once its CSRF token and origin are checked."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from impuls.api.errors import status_of
from impuls.auth.audit import Actor
from impuls.auth.principal import ANONYMOUS, Principal, Scope
from impuls.console import forms
from impuls.console.render import Renderer, add_cookie, can, redirect
from impuls.console.session import (
    COOKIE,
    LIFETIME_SECONDS,
    Session,
    SessionStore,
    cookie_headers,
    form_token,
    same_origin,
)
from impuls.errors import ImpulsError

if TYPE_CHECKING:
    from impuls.platform import Platform

_T = TypeVar("_T")
Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class Console:
    platform: Platform
    renderer: Renderer
    sessions: SessionStore = field(default_factory=SessionStore)


class SignInRequired(Exception):
    """No live session: sign in first."""


class CsrfRejected(Exception):
    """A POST without this session's token, or from another origin."""


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


async def enter(request: Request) -> tuple[Console, Session]:
    """The console and the request's session.  With authentication off, a session (as the
    anonymous admin) is made on the first visit; else SignInRequired without a live session,
    or when its key was revoked meanwhile."""
    console = console_of(request)
    session_id = request.cookies.get(COOKIE)
    session = console.sessions.get(session_id)
    if not console.platform.settings.auth:
        if session is None:
            session_id, session = console.sessions.create(ANONYMOUS)
            add_cookie(request, cookie_headers(request, COOKIE, session_id, LIFETIME_SECONDS))
        return console, session
    if session is None:
        raise SignInRequired()
    if not await asyncio.to_thread(console.platform.keys.still_valid, session.principal):
        console.sessions.drop(session_id)
        raise SignInRequired()
    return console, session


async def enter_post(request: Request, limit: int = forms.MAX_FORM) -> tuple[Console, Session, FormData]:
    """:func:`enter`, then the form -- CsrfRejected unless it carries the session's token and
    comes from this server's own pages."""
    if not same_origin(request):
        raise CsrfRejected()
    console, session = await enter(request)
    form = await forms.read_form(request, limit)
    if not session.csrf_ok(form_token(form)):
        raise CsrfRejected()
    return console, session, form


def actor(request: Request, principal: Principal) -> Actor:
    """Who makes a change, for the audit log (as the API names it)."""
    client = request.client
    return Actor(principal.name, client.host if client else "unknown")


async def blocking(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` on a worker thread (the registry and the store block)."""
    return await run_in_threadpool(fn, *args)


def need(session: Session, scope: Scope, function: str | None = None) -> Principal:
    """The session's principal; Forbidden (403) unless it has ``scope`` for ``function``:
    the same check as the API's."""
    session.principal.require(scope, function)
    return session.principal


#: a change a form asks for: (platform, function, form, who) → what was done, for the next page
Change = Callable[["Platform", str, FormData, Actor], Awaitable[str]]
#: a function page with an error and the values typed: (console, request, session, function,
#: error, values, status)
Render = Callable[[Console, Request, Session, str, str, "dict[str, str] | None", int], Awaitable[Response]]


def change(action: Change, tab: str, render: Render) -> Handler:
    """A POST handler for one of a function's forms: the CSRF check, deploy scope for the
    function, then ``action``; on failure the page again (``render``) with the registry's
    message and the status the API would answer, else back to the page (``tab``) with what was
    done."""
    async def handler(request: Request) -> Response:
        console, session, form = await enter_post(request)
        name = request.path_params["name"]
        who = need(session, Scope.DEPLOY, name)
        try:
            done = await action(console.platform, name, form, actor(request, who))
        except ImpulsError as exc:
            return await render(console, request, session, name, exc.message, forms.values(form),
                                failed(exc))
        session.flash.append(("saved", done))
        return redirect(f"/functions/{name}/{tab}")
    return handler


def error_page(console: Console, request: Request, session: Session | None, status: int,
               message: str) -> Response:
    return page(console, request, session, "error.html", status=status, status_code=status,
                message=message)


def failed(exc: ImpulsError) -> int:
    """The HTTP status of a condition: the API's table (one status per condition everywhere)."""
    return status_of(exc)


def page(console: Console, request: Request, session: Session | None, template: str,
         status: int = 200, **context: Any) -> HTMLResponse:
    """A whole page: ``template`` with what every page shows (who is signed in, the CSRF token
    for its forms, the messages of the last change)."""
    principal = session.principal if session is not None else None
    flash = session.pop_flash() if session is not None else []
    body = console.renderer.render(
        template, request=request, session=session, who=principal, csrf=session.csrf if session else "",
        auth_on=console.platform.settings.auth, flash=flash,
        can=(lambda scope, fn=None: can(principal, scope, fn)) if principal else (lambda *_: False),
        **context)
    return HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


def static_response(console: Console, name: str) -> Response:
    found = console.renderer.static.get(name)
    if found is None:
        return Response("not found", status_code=404, media_type="text/plain")
    return Response(found.body, media_type=found.media_type,
                    headers={"Cache-Control": "public, max-age=31536000, immutable"})
