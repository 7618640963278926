"""Matching a request to an operation of the service model, on the raw (encoded) path."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

from impuls.api.lambda_api.operations import OPERATIONS

#: a request whose path starts like this belongs to the Lambda API
PATH_PREFIX = re.compile(r"^/20[0-9]{2}-[0-9]{2}-[0-9]{2}/")


@dataclass(frozen=True)
class Route:
    name: str
    method: str
    #: literal segments, or None where the URI template has a ``{Label}``
    segments: tuple[str | None, ...]
    labels: tuple[str, ...]
    #: a query parameter the URI template requires (``?find=LayerVersion``), if any
    discriminator: tuple[str, str] | None

    @classmethod
    def parse(cls, name: str, method: str, uri: str) -> Route:
        path, _, query = uri.partition("?")
        segments: list[str | None] = []
        labels: list[str] = []
        for part in path.strip("/").split("/"):
            if part.startswith("{") and part.endswith("}"):
                segments.append(None)
                labels.append(part[1:-1])
            else:
                segments.append(part)
        discriminator = None
        if query:
            key, _, value = query.partition("=")
            discriminator = (key, value)
        return cls(name, method, tuple(segments), tuple(labels), discriminator)

    def match(self, parts: list[str], query: dict[str, str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        if self.discriminator is not None and query.get(self.discriminator[0]) != self.discriminator[1]:
            return None
        values: list[str] = []
        for part, segment in zip(parts, self.segments, strict=True):
            if segment is None:
                values.append(part)
            elif part != segment:
                return None
        return dict(zip(self.labels, values, strict=True))


ROUTES = [Route.parse(*op) for op in OPERATIONS]
# routes with a discriminator first: ``GET /2018-10-31/layers?find=LayerVersion`` is not ListLayers
ROUTES.sort(key=lambda r: r.discriminator is None)


@dataclass(frozen=True)
class Matched:
    operation: str
    params: dict[str, str]


def match(method: str, raw_path: str, raw_query: str) -> Matched | None:
    """The operation for this request (path labels decoded), or None when none has this path
    and method."""
    parts = [unquote(p) for p in raw_path.strip("/").split("/")]
    query = dict(parse_qsl(raw_query, keep_blank_values=True))
    for route in ROUTES:
        if route.method == method:
            params = route.match(parts, query)
            if params is not None:
                return Matched(route.name, params)
    return None
