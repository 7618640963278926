"""The Lambda API's ASGI entry: match the operation, verify the signature, run the handler,
answer in Lambda's shapes.  Requests whose path starts with a Lambda API date reach it."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from starlette import types

from impuls.api.auth import sigv4_lookup
from impuls.api.body import read_body
from impuls.api.lambda_api import absent, configs, functions, invoke
from impuls.api.lambda_api.call import Call, Reply
from impuls.api.lambda_api.errors import OperationNotSupported, error_of, error_reply
from impuls.api.lambda_api.routing import match
from impuls.auth.principal import ANONYMOUS
from impuls.auth.sigv4 import Lookup, verify
from impuls.engine.invoker import MAX_EVENT_BYTES
from impuls.errors import ImpulsError, NotFound
from impuls.functions.models import DEFAULT_REGION, MAX_ZIP_BYTES

if TYPE_CHECKING:
    from impuls.platform import Platform

log = logging.getLogger("impuls.api.lambda")

Handler = Callable[[Call], Awaitable[Reply]]
HANDLERS: dict[str, Handler] = {
    "CreateFunction": functions.create_function,
    "GetFunction": functions.get_function,
    "GetFunctionConfiguration": functions.get_function_configuration,
    "ListFunctions": functions.list_functions,
    "UpdateFunctionCode": functions.update_function_code,
    "UpdateFunctionConfiguration": functions.update_function_configuration,
    "DeleteFunction": functions.delete_function,
    "GetAccountSettings": functions.get_account_settings,
    "PublishVersion": functions.publish_version,
    "ListVersionsByFunction": functions.list_versions_by_function,
    "CreateAlias": functions.create_alias,
    "GetAlias": functions.get_alias,
    "UpdateAlias": functions.update_alias,
    "DeleteAlias": functions.delete_alias,
    "ListAliases": functions.list_aliases,
    "TagResource": functions.tag_resource,
    "UntagResource": functions.untag_resource,
    "ListTags": functions.list_tags,
    "PutFunctionConcurrency": functions.put_function_concurrency,
    "GetFunctionConcurrency": functions.get_function_concurrency,
    "DeleteFunctionConcurrency": functions.delete_function_concurrency,
    "Invoke": invoke.invoke,
    "PutFunctionEventInvokeConfig": configs.put_function_event_invoke_config,
    "UpdateFunctionEventInvokeConfig": configs.update_function_event_invoke_config,
    "GetFunctionEventInvokeConfig": configs.get_function_event_invoke_config,
    "DeleteFunctionEventInvokeConfig": configs.delete_function_event_invoke_config,
    "ListFunctionEventInvokeConfigs": configs.list_function_event_invoke_configs,
    "CreateFunctionUrlConfig": configs.create_function_url_config,
    "GetFunctionUrlConfig": configs.get_function_url_config,
    "UpdateFunctionUrlConfig": configs.update_function_url_config,
    "DeleteFunctionUrlConfig": configs.delete_function_url_config,
    "ListFunctionUrlConfigs": configs.list_function_url_configs,
    "GetFunctionCodeSigningConfig": absent.get_function_code_signing_config,
    "GetRuntimeManagementConfig": absent.get_runtime_management_config,
    "GetFunctionRecursionConfig": absent.get_function_recursion_config,
}
#: the largest body of any operation: CreateFunction with a 50 MB zip, base64-encoded in JSON
MAX_BODY = (MAX_ZIP_BYTES * 4) // 3 + 1024 * 1024


class UnknownOperation(NotFound):
    kind = "Lambda API operation"


class LambdaDoor:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    async def __call__(self, scope: types.Scope, receive: types.Receive, send: types.Send) -> None:
        try:
            reply = await self._handle(scope, receive)
        except ImpulsError as exc:
            status, code = error_of(exc)
            if status >= 500:
                log.error("Lambda API %s: %s", code, exc.message)
            await _send(send, *error_reply(status, code, exc.message), b"application/json")
            return
        except Exception:
            log.exception("internal error in the Lambda API")
            await _send(send, *error_reply(500, "ServiceException", "internal server error"),
                        b"application/json")
            return
        body = reply.body
        data = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
        await _send(send, reply.status, reply.headers, data, reply.content_type)

    async def _handle(self, scope: types.Scope, receive: types.Receive) -> Reply:
        method: str = scope["method"]
        raw_path = scope.get("raw_path") or scope["path"].encode()
        raw_path = raw_path.decode("latin-1").split("?", 1)[0]
        raw_query = scope.get("query_string", b"").decode("latin-1")
        matched = match(method, raw_path, raw_query)
        if matched is None:
            raise UnknownOperation(f"{method} {raw_path}")
        handler = HANDLERS.get(matched.operation)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        lookup = await self._credentials(headers, raw_query)  # before a body is read: no key, no read
        limit = MAX_EVENT_BYTES if matched.operation == "Invoke" else MAX_BODY
        body = await read_body(receive, scope["headers"], limit + 1)
        if lookup is None:
            principal, region = ANONYMOUS, _region_of(headers) or DEFAULT_REGION
        else:
            verified = verify(method, raw_path, raw_query, headers, body, lookup)
            principal, region = verified.principal, verified.region
        if handler is None:
            raise OperationNotSupported(matched.operation)
        query_all = parse_qs(raw_query, keep_blank_values=True)
        host = dict(headers).get("host", f"{self.platform.settings.host}:{self.platform.settings.port}")
        call = Call(self.platform, principal, (scope.get("client") or ("unknown",))[0], region,
                    f"{scope.get('scheme', 'http')}://{host}", matched.params,
                    {k: v[-1] for k, v in query_all.items()}, query_all,
                    {k.lower(): v for k, v in headers}, body)
        return await handler(call)

    async def _credentials(self, headers: list[tuple[str, str]], raw_query: str) -> Lookup | None:
        """How the signature will be checked (None: authentication is off)."""
        if not self.platform.settings.auth:
            return None
        return await sigv4_lookup(self.platform.keys, headers, raw_query)


def _region_of(headers: list[tuple[str, str]]) -> str:
    """The region a request was signed for, without checking the signature (authentication off)."""
    for name, value in headers:
        if name.lower() == "authorization":
            m = re.search(r"Credential=[^/]+/\d{8}/([a-z0-9-]+)/", value)
            if m:
                return m[1]
    return ""


async def _send(send: types.Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                content_type: bytes) -> None:
    head = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers]
    if not any(name == b"x-amzn-requestid" for name, _ in headers):
        head.append((b"x-amzn-requestid", _request_id().encode()))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def _request_id() -> str:
    return str(uuid.uuid4())
