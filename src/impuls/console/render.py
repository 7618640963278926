"""Turning pages into responses: the Jinja2 templates, the static files, and the headers
every console response carries."""

from __future__ import annotations

import hashlib
import json
import mimetypes
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette import types
from starlette.requests import Request
from starlette.responses import RedirectResponse

from impuls import __version__
from impuls.auth.principal import Principal, Scope
from impuls.console import highlight, svg

if TYPE_CHECKING:
    pass

HERE = Path(__file__).resolve().parent
PREFIX = "/console"
#: what a missing value is shown as
NONE = "\N{EN DASH}"
#: where a response's extra ``Set-Cookie`` values wait in the ASGI scope
COOKIES = "impuls.console.cookies"
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    media_type: str
    version: str


def load_static() -> dict[str, StaticFile]:
    """The console's own CSS, JavaScript and icons, read once (they are small)."""
    files = {}
    for path in sorted((HERE / "static").iterdir()):
        if path.is_file():
            body = path.read_bytes()
            media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if media.startswith("text/") or media in ("application/javascript", "image/svg+xml"):
                media += "; charset=utf-8"
            files[path.name] = StaticFile(body, media, hashlib.sha256(body).hexdigest()[:12])
    return files


def _duration(ms: float | None) -> str:
    if ms is None:
        return NONE
    if ms < 1:
        return f"{ms:.2f} ms"
    if ms < 100:
        return f"{ms:.1f} ms"
    if ms < 10_000:
        return f"{ms:.0f} ms"
    return f"{ms / 1000:.1f} s"


def _when(value: datetime | str | None) -> str:
    if value is None:
        return NONE
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    else:
        parsed = value
    return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _size(n: int | None) -> str:
    if n is None:
        return NONE
    for unit in ("B", "KB", "MB"):
        if n < 1024 or unit == "MB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return f"{n} B"


class Renderer:
    def __init__(self, static: dict[str, StaticFile]) -> None:
        self.static = static
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"),
                               autoescape=select_autoescape(default=True, default_for_string=True),
                               undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.env.globals.update(prefix=PREFIX, version=__version__, static_url=self.static_url,
                                highlight=highlight.highlight, sparkline=svg.sparkline)
        self.env.filters.update(duration=_duration, when=_when, pretty_json=_pretty_json, size=_size)

    def static_url(self, name: str) -> str:
        """A static file's URL with its content hash (so it may be cached for good)."""
        return f"{PREFIX}/static/{name}?v={self.static[name].version}"

    def render(self, template: str, **context: Any) -> str:
        return self.env.get_template(template).render(**context)


def can(principal: Principal, scope: str, function: str | None = None) -> bool:
    """Whether ``principal`` may do what needs ``scope`` (to ``function``): what the templates
    ask before they show a control; the handlers check again with ``Principal.require``."""
    return principal.scope >= Scope.parse(scope) and (function is None or principal.may_touch(function))


def redirect(path: str) -> RedirectResponse:
    """See other (after a POST): ``path`` under the console."""
    return RedirectResponse(path if path.startswith(PREFIX) else PREFIX + path, status_code=303)


def add_cookie(request: Request, value: str) -> None:
    """Send a ``Set-Cookie`` with whatever response this request gets."""
    request.scope.setdefault(COOKIES, []).append(value)


class ResponseHeaders:
    """ASGI middleware: the security headers on every console response, and the cookies the
    request's handlers asked for (:func:`add_cookie`)."""

    def __init__(self, app: types.ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: types.Scope, receive: types.Receive, send: types.Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: types.Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                headers += [(b"set-cookie", c.encode("latin-1")) for c in scope.get(COOKIES, ())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
