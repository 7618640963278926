"""Function URLs: ``/fn/<name>[:<qualifier>]/<path>`` (and ``<name>.<IMPULS_URL_DOMAIN>``)
as HTTP endpoints served by the function (payload format 2.0).

A request is answered from the URL's configuration (kept in memory, dropped when the
registry announces a change): 404 without one, the CORS preflight without invoking,
401/403 for ``KEY``/``AWS_IAM`` URLs without an invoke-scope key or a valid signature.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from starlette import types

from impuls.api.auth import bearer, is_signed, principal_of_key, sigv4_lookup
from impuls.api.body import read_body
from impuls.api.urls import cors
from impuls.api.urls.event import Request, build
from impuls.api.urls.response import (
    FORBIDDEN,
    INTERNAL_ERROR,
    NOT_FOUND,
    THROTTLED,
    TIMED_OUT,
    TOO_LARGE,
    HttpResponse,
    fixed,
    from_result,
)
from impuls.auth.principal import ANONYMOUS, Principal, Scope
from impuls.auth.sigv4 import SignatureRejected, verify
from impuls.engine.invoker import MAX_EVENT_BYTES
from impuls.errors import (
    Forbidden,
    ImpulsError,
    NotFound,
    PayloadTooLarge,
    ShuttingDown,
    Throttled,
    Unauthenticated,
)
from impuls.functions.base import URL_PREFIX
from impuls.functions.urls import UrlConfig
from impuls.sandbox.runtime_api import ResponseStream
from impuls.tracing import parent_headers

if TYPE_CHECKING:
    from impuls.platform import Platform

log = logging.getLogger("impuls.api.urls")
PREFIX = "/fn/"
LATEST = "$LATEST"


@dataclass(frozen=True)
class Target:
    name: str
    qualifier: str
    #: the function's own path, starting with "/"
    path: str


class UrlDoor:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.domain = platform.settings.url_domain.lower().strip(".")
        self._configs: dict[tuple[str, str], UrlConfig | None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        platform.registry.on_change(self._changed_threadsafe)

    # --- which requests are ours ---------------------------------------------------------

    def target(self, scope: types.Scope) -> Target | None:
        """The function a request is for: by host under IMPULS_URL_DOMAIN, or by path."""
        if self.domain:
            host = _header(scope, b"host").split(":", 1)[0].lower()
            if host.endswith("." + self.domain):
                return Target(host[: -len(self.domain) - 1], LATEST, scope["path"] or "/")
        path: str = scope["path"]
        if not path.startswith(PREFIX):
            return None
        raw = (scope.get("raw_path") or path.encode()).decode("latin-1").split("?", 1)[0]
        head, _, rest = raw[len(PREFIX):].partition("/")
        name, _, qualifier = unquote(head).partition(":")
        return Target(name, qualifier or LATEST, "/" + rest)

    # --- the URL configurations, cached --------------------------------------------------

    def _changed_threadsafe(self, name: str, qualifier: str | None) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._forget, name, qualifier)

    def _forget(self, name: str, qualifier: str | None) -> None:
        if qualifier is None or qualifier.startswith(URL_PREFIX):
            for key in [k for k in self._configs if k[0] == name]:
                del self._configs[key]

    async def _config(self, target: Target) -> UrlConfig | None:
        key = (target.name, target.qualifier)
        if key in self._configs:
            return self._configs[key]
        try:
            found: UrlConfig | None = await asyncio.to_thread(
                self.platform.registry.get_url_config, *key)
        except NotFound:
            found = None
        self._configs[key] = found
        return found

    # --- serving -------------------------------------------------------------------------

    async def __call__(self, scope: types.Scope, receive: types.Receive, send: types.Send) -> None:
        self._loop = self._loop or asyncio.get_running_loop()
        target = self.target(scope)
        assert target is not None, "the dispatcher sends only URL requests here"
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        header_map = dict(headers)
        config = await self._config(target)
        if config is None:
            await _send(send, fixed(*NOT_FOUND))
            return
        if cors.is_preflight(scope["method"], header_map):
            await _send(send, HttpResponse(200, cors.preflight(config.cors, header_map)))
            return
        allowed = cors.response_headers(config.cors, header_map.get("origin", ""))
        parent: tuple[str | None, str | None] = (None, None)
        if self.platform.tracer is not None:  # the caller's trace, continued
            parent = parent_headers(header_map)
        try:
            payload = await self._event(scope, receive, target, config, headers)
            if config.invoke_mode == "RESPONSE_STREAM":
                await self._stream(send, target, payload, allowed, parent)
                return
            response = from_result(await self.platform.invoker.invoke(
                target.name, payload, qualifier=target.qualifier, traceparent=parent[0],
                tracestate=parent[1]))
        except ImpulsError as exc:
            response = _failure(exc)
        response.headers += allowed
        await _send(send, response)

    async def _event(self, scope: types.Scope, receive: types.Receive, target: Target, config: UrlConfig,
                     headers: list[tuple[str, str]]) -> bytes:
        """The request, once allowed, as the function's event (JSON bytes)."""
        raw_query = scope.get("query_string", b"").decode("latin-1")
        lookup = None
        if config.auth_type != "NONE" and self.platform.settings.auth and is_signed(headers):
            lookup = await sigv4_lookup(self.platform.keys, headers, raw_query)  # before the body
        elif config.auth_type != "NONE":
            await self._authorize(await self._bearer(headers), target.name)
        body = await read_body(receive, scope["headers"], MAX_EVENT_BYTES)
        if lookup is not None:
            raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1").split("?", 1)[0]
            signed = verify(scope["method"], raw_path, raw_query, headers, body, lookup)
            await self._authorize(signed.principal, target.name)
        client = scope.get("client") or ("", 0)
        request = Request(scope["method"], target.path, raw_query, headers, body, client[0],
                          f"HTTP/{scope.get('http_version', '1.1')}", _header(scope, b"host").split(":")[0],
                          config.url_id, self.platform.settings.account_id)
        payload = json.dumps(build(request)).encode()
        if len(payload) > MAX_EVENT_BYTES:
            raise PayloadTooLarge("the request does not fit in a 6 MB event")
        return payload

    async def _stream(self, send: types.Send, target: Target, payload: bytes,
                      extra: list[tuple[str, str]], parent: tuple[str | None, str | None]) -> None:
        """RESPONSE_STREAM: the body goes to the client as the function writes it; the status
        and headers come from the stream's HTTP prelude (else 200 and its content type).  A
        function that answers without streaming is answered whole, as BUFFERED."""
        stream = ResponseStream()
        call = asyncio.get_running_loop().create_task(
            self.platform.invoker.invoke(target.name, payload, qualifier=target.qualifier, stream=stream,
                                         traceparent=parent[0], tracestate=parent[1]))
        try:
            if not await stream.started():
                response = from_result(await call)
                response.headers += extra
                await _send(send, response)
                return
            try:
                prelude = await stream.read_prelude()
            except ValueError:
                stream.cancel()
                await _send(send, fixed(*INTERNAL_ERROR))
                return
            head = _prelude_response(prelude, stream.content_type)
            head.headers += extra
            await send({"type": "http.response.start", "status": head.status,
                        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in head.headers]})
            try:
                async for piece in stream:
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            except OSError:  # the client went away: drop the rest, let the function finish
                stream.cancel()
        finally:
            if not call.done():  # the function runs on to its end, even for a client that left
                await call

    async def _bearer(self, headers: list[tuple[str, str]]) -> Principal | None:
        if not self.platform.settings.auth:
            return ANONYMOUS
        token = bearer([(k.encode(), v.encode()) for k, v in headers])
        return await principal_of_key(self.platform.keys, token) if token else None

    @staticmethod
    async def _authorize(principal: Principal | None, name: str) -> None:
        if principal is None:
            raise Unauthenticated("this function URL needs an Impuls key (Bearer) or a signed request")
        principal.require(Scope.INVOKE, name)


def _prelude_response(prelude: dict[str, Any] | None, content_type: str) -> HttpResponse:
    """Status and headers of a streamed response: the prelude's, or 200 with the stream's type."""
    if prelude is None:
        return HttpResponse(200, [("content-type", content_type or "application/octet-stream")])
    status = prelude.get("statusCode", 200)
    out = HttpResponse(status if isinstance(status, int) and 100 <= status <= 599 else 200)
    out.headers = [(str(k).lower(), str(v)) for k, v in (prelude.get("headers") or {}).items()]
    out.headers += [("set-cookie", str(c)) for c in prelude.get("cookies") or []]
    if not any(name == "content-type" for name, _ in out.headers):
        out.headers.append(("content-type", "application/octet-stream"))
    return out


def _failure(exc: ImpulsError) -> HttpResponse:
    """Lambda's fixed answers for what went wrong before or around the call."""
    if isinstance(exc, Unauthenticated):
        return HttpResponse(401, [("content-type", "application/json"),
                                  ("www-authenticate", 'Bearer realm="impuls"')],
                            json.dumps({"message": exc.message}).encode())
    if isinstance(exc, Forbidden | SignatureRejected):
        return fixed(*FORBIDDEN)
    if isinstance(exc, PayloadTooLarge):
        return fixed(*TOO_LARGE)
    if isinstance(exc, Throttled):
        return fixed(*THROTTLED)
    if isinstance(exc, NotFound):
        return fixed(*NOT_FOUND)
    if isinstance(exc, ShuttingDown):
        return fixed(*TIMED_OUT)
    log.warning("function URL request failed: %s", exc.message)
    return fixed(*INTERNAL_ERROR)


def _header(scope: types.Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return ""


async def _send(send: types.Send, response: HttpResponse) -> None:
    head = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
    head.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": head})
    await send({"type": "http.response.body", "body": response.body})
