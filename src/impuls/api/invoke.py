"""``POST /api/v1/functions/{name}[:qualifier]/invoke[?qualifier=...]`` as a bare ASGI handler.

Invocation is the hot path: served here, in front of FastAPI, it skips the
framework's routing, dependency and response machinery (about half of the
server's CPU per call in the benchmark profile).  Everything else goes to
the FastAPI app.  The contract is the same as every other route: the event
is the body (an empty body is ``{}``), at most 6 MB; errors are the one error
shape with the status of :mod:`impuls.api.errors`.
"""

from __future__ import annotations

import json
import logging
import re
from json.encoder import encode_basestring_ascii as _string
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

from pydantic import BaseModel
from starlette import types

from impuls.api.auth import PRINCIPAL
from impuls.api.body import parse_json, read_body
from impuls.api.errors import OUTCOME_STATUS, ErrorReply, error_body, status_of
from impuls.auth.principal import Principal, Scope
from impuls.engine.invoker import MAX_EVENT_BYTES
from impuls.engine.results import InvocationResult
from impuls.errors import ImpulsError, InvalidInput, PayloadTooLarge
from impuls.events.dispatcher import MAX_EVENT_BYTES as ASYNC_EVENT_BYTES
from impuls.tracing import parent_of_asgi

if TYPE_CHECKING:
    from impuls.platform import Platform

log = logging.getLogger("impuls.api")
INVOKE_PATH = re.compile(r"^/api/v1/functions/([^/]+)/invoke$")
JSON_HEADERS = [(b"content-type", b"application/json")]
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}
#: how much of the call's output the reply carries (the record keeps more)
REPLY_LOG_BYTES = 4096


class InvokeFastPath:
    """Routes invocations to the engine directly; passes every other request to ``app``."""

    def __init__(self, app: types.ASGIApp, platform: Platform) -> None:
        self.app = app
        self.platform = platform

    async def __call__(self, scope: types.Scope, receive: types.Receive, send: types.Send) -> None:
        match = INVOKE_PATH.match(scope["path"]) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await _reply(send, 405, error_body("method not allowed"), [(b"allow", b"POST")])
            return
        name, _, named = unquote(match[1]).partition(":")
        try:
            principal: Principal = scope[PRINCIPAL]
            principal.require(Scope.INVOKE, name)
            raw_query: bytes = scope.get("query_string", b"")
            query = parse_qs(raw_query.decode("latin-1")) if raw_query else {}
            qualifier = _qualifier(named, query.get("qualifier", [""])[-1])
            payload = await read_body(receive, scope["headers"], MAX_EVENT_BYTES)
            if not payload.strip():
                payload = b"{}"
            else:
                parse_json(payload, "event")
            traceparent = tracestate = None
            if self.platform.tracer is not None:  # the caller's trace, continued
                traceparent, tracestate = parent_of_asgi(scope["headers"])
            if _flag(query, "async"):
                request_id = await self._accept(name, qualifier, payload, traceparent, tracestate)
                await _reply(send, 202, json.dumps({"request_id": request_id}).encode())
                return
            local = _flag(query, "local")
            result = await self.platform.invoker.invoke(name, payload, qualifier=qualifier, local=local,
                                                        traceparent=traceparent, tracestate=tracestate)
        except ImpulsError as exc:
            status = status_of(exc)
            if status >= 500:
                log.error("invocation failed: %s", exc.message)
            await _reply(send, status, error_body(exc.message))
            return
        except Exception:
            log.exception("internal error during an invocation")
            await _reply(send, 500, error_body("internal server error"))
            return
        http_status, status_code = OUTCOME_STATUS[result.outcome]
        await _reply(send, http_status, envelope(result, status_code))


    async def _accept(self, name: str, qualifier: str | None, payload: bytes, traceparent: str | None,
                      tracestate: str | None) -> str:
        """``?async=true``: refuse now what would fail later, else queue durably (202)."""
        if len(payload) > ASYNC_EVENT_BYTES:
            raise PayloadTooLarge(f"an asynchronous event of {len(payload)} bytes exceeds the "
                                  f"{ASYNC_EVENT_BYTES} byte limit")
        await self.platform.invoker.check(name, qualifier)
        return await self.platform.events.accept(name, qualifier, payload, "api", traceparent, tracestate)


class InvokeReply(BaseModel):
    """The native invoke reply (see ``envelope``): ``body`` when the handler returned, else
    ``error``, ``error_type`` and ``stack``."""

    status_code: int
    body: Any = None
    error: str | None = None
    error_type: str | None = None
    stack: list[str] | None = None
    duration_ms: float
    logs: str
    request_id: str
    cold_start: bool
    executed_version: str


class Accepted(BaseModel):
    """``?async=true``: the event is stored and will be delivered."""

    request_id: str


def openapi_operation(schema: dict[str, Any]) -> dict[str, Any]:
    """The invoke route's OpenAPI path item (the route is served here, in front of FastAPI,
    so FastAPI does not see it); adds the reply models to ``schema``'s components."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (InvokeReply, Accepted, ErrorReply):
        components[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")

    def query(name: str, description: str, kind: str = "string") -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "description": description,
                "schema": {"type": kind}}

    def reply(ref: str, description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}}

    failures = {"400": "the event is not JSON, or the qualifiers disagree", "401": "no valid key",
                "403": "the key may not invoke it, the function is inactive, or local calls are refused",
                "404": "no such function, version or alias", "409": "the function is Pending or Failed",
                "413": "the event is over 6 MB (1 MB with async=true)", "429": "too many calls",
                "502": "the runtime died during the call, or the sandbox could not start",
                "503": "the server is shutting down", "504": "the call timed out"}
    responses = {"200": reply("#/components/schemas/InvokeReply", "the call ran (status_code says "
                              "whether the handler succeeded)"),
                 "202": reply("#/components/schemas/Accepted", "async=true: the event is stored")}
    error = "#/components/schemas/ErrorReply"
    responses.update({status: reply(error, text) for status, text in failures.items()})
    return {"post": {
        "operationId": "invoke_function", "summary": "Invoke a function",
        "description": "The body is the event (any JSON value; empty means {}). See docs/api.md, Invoking.",
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                        "description": "the function, optionally name:qualifier"},
                       query("qualifier", "$LATEST, a version number or an alias"),
                       query("async", "true: queue the event and answer 202", "boolean"),
                       query("local", "true: run unsandboxed on the host (needs --allow-local)", "boolean")],
        "requestBody": {"required": False, "content": {"application/json": {"schema": {}}}},
        "responses": responses,
    }}


def _flag(query: dict[str, list[str]], name: str) -> bool:
    """A boolean query parameter (``true``/``false``, ``1``/``0``, ``yes``/``no``, ``on``/``off``)."""
    value = query.get(name, ["false"])[-1].lower()
    if value not in TRUE and value not in FALSE:
        raise InvalidInput(f"{name}: must be true or false, not {value!r}")
    return value in TRUE


def _qualifier(in_path: str, in_query: str) -> str | None:
    """The qualifier from ``name:qualifier`` or ``?qualifier=`` (they must agree when both are given)."""
    if in_path and in_query and in_path != in_query:
        raise InvalidInput(f"qualifier: {in_query!r} in the query does not match {in_path!r} in the path")
    return in_path or in_query or None


def envelope(result: InvocationResult, status_code: int) -> bytes:
    """The native invoke reply: the handler's result (or error) with the call's facts.

    A handler's result goes in as the runtime's bytes when they are one JSON value in UTF-8
    (checked by parsing them, so nothing the function returns can add fields to the reply):
    parsing once and splicing costs a third of parsing and serialising again.  The facts are
    formatted here (``json.dumps`` of a small dict costs five times as much)."""
    if result.error_type is None:
        outcome = b'"body": %s' % _body(result.payload)
    else:
        outcome = json.dumps({"error": result.error_message, "error_type": result.error_type,
                              "stack": result.stack})[1:-1].encode()
    cold = "true" if result.cold_start else "false"
    logs = _string(result.logs[-REPLY_LOG_BYTES:])
    facts = (f'"duration_ms": {round(result.duration_ms, 3)!r}, "logs": {logs}, '
             f'"request_id": {_string(result.request_id)}, "cold_start": {cold}, '
             f'"executed_version": {_string(result.executed_version)}')
    return b'{"status_code": %d, %s, %s}' % (status_code, outcome, facts.encode())


def _body(payload: bytes) -> bytes:
    """The runtime's response as one JSON value: its own bytes when they are JSON in UTF-8,
    else as a JSON string (text that is not JSON, decoded leniently); empty is null."""
    if not payload:
        return b"null"
    try:
        json.loads(payload.decode())
    except (ValueError, UnicodeDecodeError):
        return json.dumps(payload.decode("utf-8", "replace")).encode()
    return payload


async def _reply(send: types.Send, status: int, body: bytes,
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
