"""Signing in with an Impuls key, and signing out."""

from __future__ import annotations

import asyncio
import secrets

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from impuls.console.base import CsrfRejected, console_of, enter_post, page
from impuls.console.forms import read_form, text
from impuls.console.render import PREFIX, add_cookie, redirect
from impuls.console.session import (
    COOKIE,
    LIFETIME_SECONDS,
    LOGIN_COOKIE,
    LOGIN_FORM_SECONDS,
    cookie_headers,
    form_token,
    same_origin,
)

UNKNOWN = "the key is unknown or revoked"


def _next(value: str) -> str:
    """Where to go after signing in: a console path, never another site."""
    if value.startswith(PREFIX + "/") and not value.startswith("//") and "\\" not in value:
        return value
    return PREFIX + "/functions"


def _form(request: Request, status: int = 200, error: str = "", next_: str = "") -> Response:
    console = console_of(request)
    token = secrets.token_urlsafe(32)
    add_cookie(request, cookie_headers(request, LOGIN_COOKIE, token, LOGIN_FORM_SECONDS))
    return page(console, request, None, "login.html", status=status, login_csrf=token, error=error,
                next=_next(next_ or request.query_params.get("next", "")))


async def login_form(request: Request) -> Response:
    if not console_of(request).platform.settings.auth:
        return redirect("/functions")
    return _form(request)


async def login(request: Request) -> Response:
    """Check the key as the API does; a new session (a new id: nothing carried over) on success."""
    console = console_of(request)
    if not console.platform.settings.auth:
        return redirect("/functions")
    if not same_origin(request):
        raise CsrfRejected()
    form = await read_form(request, 16 * 1024)
    expected = request.cookies.get(LOGIN_COOKIE, "")
    given = form_token(form)
    if not expected or not secrets.compare_digest(expected.encode(), given.encode()):
        raise CsrfRejected()
    key = text(form, "key").strip()
    keys = console.platform.keys
    principal = (keys.cached(key) or await asyncio.to_thread(keys.authenticate, key)) if key else None
    if principal is None:
        return _form(request, 401, UNKNOWN if key else "enter an Impuls key", text(form, "next"))
    old = request.cookies.get(COOKIE)
    console.sessions.drop(old)
    session_id, _ = console.sessions.create(principal)
    add_cookie(request, cookie_headers(request, COOKIE, session_id, LIFETIME_SECONDS))
    add_cookie(request, cookie_headers(request, LOGIN_COOKIE, "", 0))
    return redirect(_next(text(form, "next")))


async def logout(request: Request) -> Response:
    console, _, _ = await enter_post(request)
    console.sessions.drop(request.cookies.get(COOKIE))
    add_cookie(request, cookie_headers(request, COOKIE, "", 0))
    if not console.platform.settings.auth:
        return redirect("/functions")
    return redirect("/login?signed_out=1")


routes = [
    Route("/login", login_form, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
]
