"""The gate in front of every route: who is asking.

Every request under ``/api/`` needs ``Authorization: Bearer <key>``; without
one, or with an unknown or revoked key, it is answered 401 here and no route
runs.  Other paths (``/health``) pass with whatever principal the key gives,
or none.  Routes then check the scope with :func:`impuls.api.deps.authorize`.
"""

from __future__ import annotations

import asyncio

from starlette import types

from impuls.api.errors import CHALLENGE, error_body
from impuls.auth.keys import KeyStore
from impuls.auth.principal import ANONYMOUS, Principal

#: where the principal of a request is kept in the ASGI scope
PRINCIPAL = "impuls.principal"
PROTECTED_PREFIXES = ("/api/",)
MISSING = "this API needs a key: send 'Authorization: Bearer <key>'"
UNKNOWN = "the API key is unknown or revoked"


def bearer(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


class AuthGate:
    """Authenticates before ``app`` sees the request; ``keys`` None means authentication is off."""

    def __init__(self, app: types.ASGIApp, keys: KeyStore | None) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: types.Scope, receive: types.Receive, send: types.Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        principal: Principal | None = ANONYMOUS
        token = ""
        if self.keys is not None:
            token = bearer(scope["headers"])
            principal = await self._principal(self.keys, token) if token else None
        scope[PRINCIPAL] = principal
        if principal is None and scope["path"].startswith(PROTECTED_PREFIXES):
            await _unauthorized(send, UNKNOWN if token else MISSING)
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _principal(keys: KeyStore, token: str) -> Principal | None:
        return keys.cached(token) or await asyncio.to_thread(keys.authenticate, token)


async def _unauthorized(send: types.Send, message: str) -> None:
    body = error_body(message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in CHALLENGE.items())]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})
