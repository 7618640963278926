"""What a route needs from its request: the platform, and who is asking (and whether they may)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from starlette.requests import Request

from impuls.api.auth import PRINCIPAL
from impuls.auth.audit import Actor
from impuls.auth.principal import Principal, Scope

if TYPE_CHECKING:
    from impuls.platform import Platform


def platform_of(request: Request) -> Platform:
    return cast("Platform", request.app.state.platform)


def principal_of(request: Request) -> Principal | None:
    """The principal :class:`~impuls.api.auth.AuthGate` found (None: no valid key)."""
    return cast("Principal | None", request.scope.get(PRINCIPAL))


def authorize(request: Request, scope: Scope, function: str | None = None) -> Principal:
    """The request's principal; Forbidden unless it has ``scope`` (and may touch ``function``)."""
    principal = principal_of(request)
    assert principal is not None, "the auth gate answers unauthenticated API requests"
    principal.require(scope, function)
    return principal


def actor_of(request: Request, principal: Principal) -> Actor:
    """Who makes a change, for the audit log."""
    client = request.client
    return Actor(principal.name, client.host if client else "unknown")
