"""CORS for function URLs, from the URL's configuration: preflights answered without invoking
the function, and the headers added to every response."""

from __future__ import annotations

from typing import Any


def _allowed_origin(cors: dict[str, Any], origin: str) -> str | None:
    origins = cors.get("allow_origins") or []
    if "*" in origins:
        return "*" if not cors.get("allow_credentials") else origin
    return origin if origin in origins else None


def response_headers(cors: dict[str, Any], origin: str) -> list[tuple[str, str]]:
    """What an actual (not preflight) response carries for a request from ``origin``."""
    if not cors or not origin:
        return []
    allowed = _allowed_origin(cors, origin)
    if allowed is None:
        return []
    out = [("access-control-allow-origin", allowed)]
    if allowed != "*":
        out.append(("vary", "Origin"))
    if cors.get("allow_credentials"):
        out.append(("access-control-allow-credentials", "true"))
    if cors.get("expose_headers"):
        out.append(("access-control-expose-headers", ",".join(cors["expose_headers"])))
    return out


def is_preflight(method: str, headers: dict[str, str]) -> bool:
    return method == "OPTIONS" and "origin" in headers and "access-control-request-method" in headers


def preflight(cors: dict[str, Any], headers: dict[str, str]) -> list[tuple[str, str]]:
    """The headers of the 200 answer to a preflight (only those the config allows)."""
    origin = headers.get("origin", "")
    allowed = _allowed_origin(cors, origin) if cors else None
    if allowed is None:
        return []
    out = response_headers(cors, origin)
    wanted = headers.get("access-control-request-method", "").upper()
    methods = [m.upper() for m in cors.get("allow_methods") or []]
    if wanted and ("*" in methods or wanted in methods):
        out.append(("access-control-allow-methods", ",".join(methods)))
    requested = headers.get("access-control-request-headers", "")
    allowed_headers = [h.lower() for h in cors.get("allow_headers") or []]
    if requested and allowed_headers:
        if "*" in allowed_headers:
            out.append(("access-control-allow-headers", requested))
        else:
            out.append(("access-control-allow-headers", ",".join(allowed_headers)))
    if cors.get("max_age") is not None:
        out.append(("access-control-max-age", str(cors["max_age"])))
    return out
