"""``Invoke``: RequestResponse, Event and DryRun, with Tail logs and the client context.

A function error is never an HTTP error: it is a 200 with ``X-Amz-Function-Error:
Unhandled`` and Lambda's error document as the payload.  Event invocations are queued
durably (:mod:`impuls.events`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging

from impuls.api.lambda_api.call import Call, Reply
from impuls.auth.principal import Scope
from impuls.engine.invoker import MAX_EVENT_BYTES
from impuls.engine.results import InvocationResult, Outcome
from impuls.errors import InvalidInput, PayloadTooLarge, SandboxStartFailed
from impuls.events.dispatcher import MAX_EVENT_BYTES as ASYNC_EVENT_BYTES
from impuls.tracing import parent_headers

log = logging.getLogger("impuls.api.lambda")
TAIL_BYTES = 4096


class InvalidRequestContent(InvalidInput):
    """The payload is not JSON."""


async def invoke(call: Call) -> Reply:
    ref = call.function(Scope.INVOKE)
    kind = call.headers.get("x-amz-invocation-type", "RequestResponse")
    if kind not in ("RequestResponse", "Event", "DryRun"):
        raise InvalidInput(f"X-Amz-Invocation-Type must be RequestResponse, Event or DryRun, not {kind!r}")
    payload = call.body if call.body.strip() else b"{}"
    if len(payload) > MAX_EVENT_BYTES:
        raise PayloadTooLarge(f"Request must be smaller than {MAX_EVENT_BYTES} bytes for the "
                              "InvokeFunction operation")
    try:
        json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestContent(f"Could not parse request body into json: {exc}") from exc
    invoker = call.platform.invoker
    context = _client_context(call.headers.get("x-amz-client-context"))
    if kind == "DryRun":
        await call.run(call.platform.registry.get, ref.name, ref.qualifier)
        return Reply(204)
    traceparent = tracestate = None
    if call.platform.tracer is not None:  # the caller's trace (traceparent, or X-Amzn-Trace-Id), continued
        traceparent, tracestate = parent_headers(call.headers)
    if kind == "Event":  # queued durably, delivered with Lambda's retry rules
        if len(payload) > ASYNC_EVENT_BYTES:
            raise PayloadTooLarge(f"An asynchronous event must be smaller than {ASYNC_EVENT_BYTES} bytes")
        await invoker.check(ref.name, ref.qualifier)
        request_id = await call.platform.events.accept(ref.name, ref.qualifier, payload, "lambda",
                                                       traceparent, tracestate)
        return Reply(202, headers=[(b"x-amzn-requestid", request_id.encode())])
    result = await invoker.invoke(ref.name, payload, qualifier=ref.qualifier, client_context=context,
                                  region=call.region, account=call.account, traceparent=traceparent,
                                  tracestate=tracestate)
    return _reply(result, call.headers.get("x-amz-log-type") == "Tail")


def _client_context(value: str | None) -> str | None:
    """``X-Amz-Client-Context``: base64 of a JSON object, handed to the runtime as JSON."""
    if not value:
        return None
    try:
        doc = json.loads(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput("X-Amz-Client-Context must be the base64 of a JSON object") from exc
    if not isinstance(doc, dict):
        raise InvalidInput("X-Amz-Client-Context must be the base64 of a JSON object")
    return json.dumps(doc)


def _reply(result: InvocationResult, tail: bool) -> Reply:
    if result.error_type == SandboxStartFailed.error_type:
        raise SandboxStartFailed(result.error_message)  # the platform's fault, not the function's
    headers = [(b"x-amz-executed-version", result.executed_version.encode())]
    if tail:
        logs = result.logs.encode()[-TAIL_BYTES:]
        headers.append((b"x-amz-log-result", base64.b64encode(logs)))
    if result.outcome is Outcome.SUCCESS:
        return Reply(200, result.payload, headers)
    headers.append((b"x-amz-function-error", b"Unhandled"))
    document = {"errorMessage": result.error_message, "errorType": result.error_type,
                "stackTrace": result.stack}
    return Reply(200, json.dumps(document).encode(), headers)


