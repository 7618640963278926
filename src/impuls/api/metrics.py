"""``GET /metrics`` (Prometheus' text format) and the middleware that counts HTTP requests.

``/metrics`` is not under ``/api/``, so the auth gate lets it through with whatever principal
the request's key gives; the route checks it: 401 without a valid key, 403 unless the key has
``read`` scope over every function (the metrics name them all).  ``--metrics-public``
(``IMPULS_METRICS_PUBLIC=1``) opens it to anyone who reaches the port.

:class:`HttpMetrics` wraps the whole application (every door) and counts each answered
request by a route template and its status.  The template is bounded whatever the path:
``/api/v1/functions/{name}/invoke`` (the fast path), the native routes' own templates
(``/api/v1/functions/{name}``, ``/health``, ``/metrics``), ``lambda:<Operation>`` (or
``lambda:unknown``), ``url`` (function URLs), ``console``, and ``other`` (no route: 404s).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response
from starlette import types

from impuls.api import contract as c
from impuls.api.auth import MISSING
from impuls.api.deps import platform_of, principal_of
from impuls.api.invoke import INVOKE_PATH
from impuls.api.lambda_api.routing import PATH_PREFIX as LAMBDA_PATH
from impuls.api.lambda_api.routing import match as lambda_operation
from impuls.auth.principal import Scope
from impuls.errors import Forbidden, Unauthenticated
from impuls.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from impuls.metrics import Metrics

router = APIRouter()

INVOKE_ROUTE = "/api/v1/functions/{name}/invoke"
CONSOLE_PREFIX = "/console"
#: the templates of requests FastAPI routed (set by the router in the request's scope)
ROUTE = "route"


@router.get("/metrics", response_class=Response, responses={
    **c.answers(None, 401, 403), 200: {"description": "Prometheus' text format",
                                       "content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    platform = platform_of(request)
    if not platform.settings.metrics_public:
        principal = principal_of(request)
        if principal is None:
            raise Unauthenticated(MISSING)
        principal.require(Scope.READ)
        if principal.functions != "*":
            raise Forbidden(f"key '{principal.name}' is limited to functions matching "
                            f"'{principal.functions}'; the metrics cover every function")
    return Response(await platform.metrics.exposition(), media_type=CONTENT_TYPE)


class HttpMetrics:
    """Counts every HTTP request ``app`` answers (see the module doc); ``url_target`` tells a
    function URL request (by path or host), as the doors do."""

    def __init__(self, app: types.ASGIApp, metrics: Metrics,
                 url_target: Callable[[types.Scope], object | None]) -> None:
        self.app = app
        self.metrics = metrics
        self.url_target = url_target

    async def __call__(self, scope: types.Scope, receive: types.Receive, send: types.Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_counted(message: types.Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        door = self._door(scope)
        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = door if door is not None else self._native(scope)
            self.metrics.http_request(route, status or 500)

    def _door(self, scope: types.Scope) -> str | None:
        """The template of a request that is not routed by FastAPI (None: it is)."""
        path: str = scope["path"]
        if self.url_target(scope) is not None:
            return "url"
        if INVOKE_PATH.match(path):
            return INVOKE_ROUTE
        if LAMBDA_PATH.match(path):
            raw = (scope.get("raw_path") or path.encode()).decode("latin-1").split("?", 1)[0]
            return _lambda_route(scope["method"], raw, scope.get("query_string", b"").decode("latin-1"))
        if path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/"):
            return "console"
        return None

    @staticmethod
    def _native(scope: types.Scope) -> str:
        template = getattr(scope.get(ROUTE), "path", None)
        return template if isinstance(template, str) and template else "other"


@functools.lru_cache(maxsize=4096)
def _lambda_route(method: str, raw_path: str, raw_query: str) -> str:
    matched = lambda_operation(method, raw_path, raw_query)
    return f"lambda:{matched.operation}" if matched is not None else "lambda:unknown"
