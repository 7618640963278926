"""One Lambda API request as the handlers see it (:class:`Call`), and what they answer (:class:`Reply`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from impuls.api.lambda_api.names import FunctionRef, parse_function
from impuls.auth.audit import Actor
from impuls.auth.principal import Principal, Scope
from impuls.errors import InvalidInput

if TYPE_CHECKING:
    from impuls.platform import Platform

T = TypeVar("T")


@dataclass
class Reply:
    status: int = 200
    #: a dict is sent as JSON; bytes as they are; None as an empty body
    body: dict[str, Any] | bytes | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_type: bytes = b"application/json"


@dataclass
class Call:
    platform: Platform
    principal: Principal
    source: str
    #: from the request's credential scope (ARNs name it)
    region: str
    #: the scheme and host the client used, for URLs the answer hands out
    base_url: str
    params: dict[str, str]
    #: the last value of each query parameter; ``query_all`` has every value
    query: dict[str, str]
    query_all: dict[str, list[str]]
    #: lower-case header names
    headers: dict[str, str]
    body: bytes

    @property
    def account(self) -> str:
        return self.platform.settings.account_id

    @property
    def actor(self) -> Actor:
        return Actor(self.principal.name, self.source)

    def json(self) -> dict[str, Any]:
        """The request body as a JSON object ({} when empty)."""
        if not self.body.strip():
            return {}
        try:
            doc = json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise InvalidInput("the request body must be a JSON object")
        return doc

    def function(self, scope: Scope, label: str = "FunctionName", qualified: bool = True) -> FunctionRef:
        """The function the path names (and the ``Qualifier`` query parameter), once the
        principal may act on it with ``scope``."""
        ref = parse_function(self.params[label], self.account,
                             self.query.get("Qualifier") if qualified else None)
        self.principal.require(scope, ref.name)
        return ref

    async def run(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """A blocking registry call, off the event loop."""
        return await asyncio.to_thread(fn, *args, **kw)
