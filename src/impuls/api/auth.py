"""Who is asking: bearer keys and SigV4 signatures, and the gate in front of the native API.

Every request under ``/api/`` needs ``Authorization: Bearer <key>``; without
one, or with an unknown or revoked key, :class:`AuthGate` answers 401 and no
route runs.  Other paths (``/health``) pass with whatever principal the key
gives, or none.  Routes then check the scope with :func:`impuls.api.deps.authorize`.
The Lambda API and function URLs authenticate with the helpers below.
"""

from __future__ import annotations

import asyncio
import re
from urllib.parse import parse_qs

from starlette import types

from impuls.api.errors import CHALLENGE, error_body
from impuls.auth.keys import KeyStore
from impuls.auth.principal import ANONYMOUS, Principal
from impuls.auth.sigv4 import ALGORITHM, MISSING_TOKEN, Lookup, SignatureRejected

#: where the principal of a request is kept in the ASGI scope
PRINCIPAL = "impuls.principal"
PROTECTED_PREFIXES = ("/api/",)
MISSING = "this API needs a key: send 'Authorization: Bearer <key>'"
UNKNOWN = "the API key is unknown or revoked"
_CREDENTIAL = re.compile(r"Credential=([A-Z0-9]{16,128})/")


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
        return await principal_of_key(keys, token)


async def principal_of_key(keys: KeyStore, token: str) -> Principal | None:
    """The principal of a bearer key (None: unknown or revoked); cached lookups stay on the loop."""
    return keys.cached(token) or await asyncio.to_thread(keys.authenticate, token)


async def sigv4_lookup(keys: KeyStore, headers: list[tuple[str, str]], raw_query: str) -> Lookup:
    """The credentials lookup to verify a SigV4-signed request with: the signer's key is looked
    up now (from the cache, else the database, off the loop), so verifying later needs neither
    and cannot see the cache expire in between.  SignatureRejected when it is not signed."""
    access_key = _access_key_id(headers, raw_query)
    if not access_key:
        raise SignatureRejected(MISSING_TOKEN, "Missing Authentication Token: sign the request with "
                                               "Signature Version 4 (an Impuls key's AWS credentials)")
    found = keys.cached_credentials(access_key) or await asyncio.to_thread(keys.credentials, access_key)
    return lambda wanted: found if wanted == access_key else None


def is_signed(headers: list[tuple[str, str]]) -> bool:
    return any(n.lower() == "authorization" and v.startswith(ALGORITHM) for n, v in headers)


def _access_key_id(headers: list[tuple[str, str]], raw_query: str) -> str:
    for name, value in headers:
        if name.lower() == "authorization":
            m = _CREDENTIAL.search(value)
            return m[1] if m else ""
    values = parse_qs(raw_query).get("X-Amz-Credential")
    return values[0].split("/", 1)[0] if values else ""


async def _unauthorized(send: types.Send, message: str) -> None:
    body = error_body(message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in CHALLENGE.items())]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})
