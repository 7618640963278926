"""The FastAPI application: routers, and one JSON error shape for every failure."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette import types
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from impuls import __version__
from impuls.api import (
    code,
    contract,
    events,
    functions,
    invocations,
    invoke,
    keys,
    metrics,
    nodes,
    schedules,
    url_configs,
)
from impuls.api.auth import AuthGate
from impuls.api.deps import platform_of, principal_of
from impuls.api.errors import error_response, status_of
from impuls.api.invoke import InvokeFastPath
from impuls.api.lambda_api.door import LambdaDoor
from impuls.api.lambda_api.routing import PATH_PREFIX as LAMBDA_PATH
from impuls.api.urls.door import UrlDoor
from impuls.errors import ImpulsError

if TYPE_CHECKING:
    from impuls.platform import Platform

log = logging.getLogger("impuls.api")


async def _impuls_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImpulsError)
    status = status_of(exc)
    if status >= 500:
        log.error("request failed: %s", exc.message)
    return error_response(status, exc.message)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    messages = {404: "not found", 405: "method not allowed"}
    message = exc.detail if isinstance(exc.detail, str) else messages.get(exc.status_code, "error")
    if exc.status_code == 404 and message == "Not Found":
        message = "no such route"
    headers = exc.headers
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": ", ".join(_allowed(request))}
    return error_response(exc.status_code, message, headers=headers)


def _allowed(request: Request) -> list[str]:
    """Every method some route serves at the request's path (Starlette's own 405 names only
    the first route that matched the path)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, APIRoute) and route.matches(request.scope)[0] != Match.NONE and route.methods:
            methods |= route.methods
    return sorted(methods)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in exc.errors()]
    return error_response(400, "; ".join(parts))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error", exc_info=exc)
    return error_response(500, "internal server error")


def create_app(platform: Platform, console: types.ASGIApp | None = None) -> types.ASGIApp:
    """The ASGI application: invocations on the fast path, everything else through FastAPI;
    ``console`` (the web console, :mod:`impuls.console`, which uses this door's error table)
    is mounted at ``/console``."""
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await platform.start()
        try:
            yield
        finally:
            await platform.stop()

    app = FastAPI(title="Impuls", version=__version__, docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    app.state.platform = platform
    app.add_exception_handler(ImpulsError, _impuls_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        """Open to all, but only a caller with a key learns more than that the server is up."""
        p = platform_of(request)
        up: dict[str, Any] = {"status": "healthy"}
        if not p.settings.auth:
            up["auth"] = "off"
        if principal_of(request) is None:
            return up
        return {**up, "service": "impuls", "version": __version__, **p.health()}

    app.include_router(functions.router)
    app.include_router(invocations.router)
    app.include_router(keys.router)
    app.include_router(code.router)
    app.include_router(url_configs.router)
    app.include_router(events.router)
    app.include_router(schedules.router)
    app.include_router(nodes.router)
    if console is not None:
        app.mount("/console", console)
    app.include_router(metrics.router)
    _document(app)
    native = AuthGate(InvokeFastPath(app, platform), platform.keys if platform.settings.auth else None)
    doors = Doors(native, LambdaDoor(platform), UrlDoor(platform))
    return metrics.HttpMetrics(doors, platform.metrics, doors.url_door.target)


#: routes open without a key (the code download is signed instead)
OPEN_ROUTES = ("/health", "/code/{name}")


def _document(app: FastAPI) -> None:
    """/openapi.json: FastAPI's description plus the request bodies routes read themselves
    (:mod:`impuls.api.contract`), the invoke route (served by the fast path in front of
    FastAPI) and the bearer key every route but :data:`OPEN_ROUTES` needs."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema["paths"]["/api/v1/functions/{name}/invoke"] = invoke.openapi_operation(schema)
            components = schema.setdefault("components", {})
            components["schemas"].update(contract.REQUEST_BODIES)
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            for item in schema["paths"].values():
                for operation in item.values():
                    operation["responses"].pop("422", None)  # a request that fails a rule is 400
            for unused in ("HTTPValidationError", "ValidationError"):
                components["schemas"].pop(unused, None)
            for path in OPEN_ROUTES:
                for operation in schema["paths"][path].values():
                    operation["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class Doors:
    """Function URLs (by path or host) to the URL door, AWS Lambda's paths to the Lambda door,
    everything else to the native API; each door authenticates its own way."""

    def __init__(self, native: types.ASGIApp, lambda_door: LambdaDoor, url_door: UrlDoor) -> None:
        self.native = native
        self.lambda_door = lambda_door
        self.url_door = url_door

    async def __call__(self, scope: types.Scope, receive: types.Receive, send: types.Send) -> None:
        if scope["type"] == "http":
            if self.url_door.target(scope) is not None:
                await self.url_door(scope, receive, send)
                return
            if LAMBDA_PATH.match(scope["path"]):
                await self.lambda_door(scope, receive, send)
                return
        await self.native(scope, receive, send)
