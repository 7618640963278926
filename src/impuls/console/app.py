"""The console's ASGI application, mounted at ``/console`` by :mod:`impuls.api.app`.

Routes are thin (one module per concern under :mod:`impuls.console.pages`); conditions
become HTML error pages with the status the API would answer (:mod:`impuls.api.errors`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import quote

from starlette import types
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from impuls.console.base import (
    Console,
    CsrfRejected,
    SignInRequired,
    console_of,
    error_page,
    failed,
    static_response,
)
from impuls.console.pages import (
    admin,
    asynchronous,
    auth,
    functions,
    history,
    invoke,
    logs,
    triggers,
    versions,
)
from impuls.console.render import Renderer, ResponseHeaders, load_static, redirect
from impuls.console.session import COOKIE
from impuls.errors import ImpulsError

if TYPE_CHECKING:
    from impuls.platform import Platform

log = logging.getLogger("impuls.console")
CSRF_MESSAGE = ("the form's security token is missing or does not match this session, or the request "
                "came from another site: reload the page and try again")


async def _sign_in(request: Request, _: Exception) -> Response:
    if request.method in ("GET", "HEAD"):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        response = redirect("/login")
        response.headers["location"] += "?next=" + quote(target, safe="/")
        return response
    return error_page(console_of(request), request, None, 401, "sign in first")


async def _csrf(request: Request, _: Exception) -> Response:
    console = console_of(request)
    return error_page(console, request, console.sessions.get(request.cookies.get(COOKIE)), 403, CSRF_MESSAGE)


async def _impuls_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ImpulsError)
    console = console_of(request)
    status = failed(exc)
    if status >= 500:
        log.error("console request failed: %s", exc.message)
    session = console.sessions.get(request.cookies.get(COOKIE))
    return error_page(console, request, session, status, exc.message)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    console = console_of(request)
    messages = {404: "no such page", 405: "method not allowed"}
    return error_page(console, request, console.sessions.get(request.cookies.get(COOKIE)), exc.status_code,
                      messages.get(exc.status_code, str(exc.detail)))


class Guard:
    """ASGI middleware: an unexpected exception becomes a logged 500 page (not a reset
    connection), when no response has started yet."""

    def __init__(self, app: types.ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: types.Scope, receive: types.Receive, send: types.Send) -> None:
        started = False

        async def watch(message: types.Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("console request failed")
            if started or scope["type"] != "http":
                raise
            body = b"<!doctype html><title>500</title><h1>500</h1><p>internal server error</p>"
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"text/html; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


async def _home(request: Request) -> Response:
    return redirect("/functions")


async def _static(request: Request) -> Response:
    return static_response(console_of(request), request.path_params["file"])


def create_console(platform: Platform) -> Starlette:
    """The console of ``platform`` (its sessions live in this application, in memory)."""
    console = Console(platform, Renderer(load_static()))
    routes = [
        Route("/", _home, methods=["GET"]),
        Route("/static/{file}", _static, methods=["GET"]),
        *auth.routes, *functions.routes, *invoke.routes, *logs.routes, *history.routes,
        *versions.routes, *triggers.routes, *asynchronous.routes, *admin.routes,
    ]
    handlers = {SignInRequired: _sign_in, CsrfRejected: _csrf, ImpulsError: _impuls_error,
                HTTPException: _http_error}
    app = Starlette(routes=routes, middleware=[Middleware(ResponseHeaders), Middleware(Guard)],
                    exception_handlers=handlers)
    app.state.console = console
    return app
