"""Console sessions and CSRF protection.

Signing in posts an Impuls key once; the server checks it like the API does and keeps, in
memory, a session: a random id (256 bits) mapped to the key's *principal* (name, scope,
function glob) and a random CSRF token -- never the key.  The browser holds only the id, in
an ``HttpOnly``, ``SameSite=Strict`` cookie limited to ``/console`` (``Secure`` over HTTPS),
which page scripts cannot read.  The store keeps the id's sha256, not the id.

A session ends when it has been idle for :data:`IDLE_SECONDS`, after :data:`LIFETIME_SECONDS`
in all, on sign-out, when the server restarts, and as soon as its key is revoked (each request
checks the key through :meth:`~impuls.auth.keys.KeyStore.still_valid`).

Every form carries the session's CSRF token; every POST is refused (403) unless the token
matches (compared in constant time) and, when the browser says where the request comes from
(``Origin``), it comes from this server.  ``SameSite=Strict`` is a second layer: another site's
page cannot make the browser send the cookie at all.  The sign-in form, before there is a
session, uses a double-submit token: a random value both in a short-lived cookie and in the form.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request

from impuls.auth.principal import Principal

COOKIE = "impuls_console"
#: the sign-in form's double-submit token
LOGIN_COOKIE = "impuls_console_login"
COOKIE_PATH = "/console"
IDLE_SECONDS = 2 * 3600
LIFETIME_SECONDS = 12 * 3600
LOGIN_FORM_SECONDS = 3600
MAX_SESSIONS = 10_000
CSRF_FIELD = "csrf"


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


@dataclass
class Session:
    principal: Principal
    csrf: str
    created: float
    seen: float
    #: messages for the next page (kind, text): "saved", "error"
    flash: list[tuple[str, str]] = field(default_factory=list)
    #: what the invoke form last sent, per function (so it is there again)
    last_event: dict[str, str] = field(default_factory=dict)

    def csrf_ok(self, token: object) -> bool:
        return isinstance(token, str) and hmac.compare_digest(token.encode(), self.csrf.encode())

    def pop_flash(self) -> list[tuple[str, str]]:
        messages, self.flash = self.flash, []
        return messages


class SessionStore:
    """Sessions by the sha256 of their id; thread-safe; bounded (the oldest go first)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, idle: float = IDLE_SECONDS,
                 lifetime: float = LIFETIME_SECONDS, limit: int = MAX_SESSIONS) -> None:
        self.clock = clock
        self.idle = idle
        self.lifetime = lifetime
        self.limit = limit
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, principal: Principal) -> tuple[str, Session]:
        """A new session for ``principal``: its id (for the cookie, shown nowhere else) and itself."""
        session_id = secrets.token_urlsafe(32)
        now = self.clock()
        session = Session(principal, secrets.token_urlsafe(32), now, now)
        with self._lock:
            self._purge(now)
            while len(self._sessions) >= self.limit:
                del self._sessions[next(iter(self._sessions))]  # the oldest (insertion order)
            self._sessions[_digest(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with that id (and it counts as used now), else None."""
        if not session_id:
            return None
        digest = _digest(session_id)
        now = self.clock()
        with self._lock:
            session = self._sessions.get(digest)
            if session is None:
                return None
            if self._expired(session, now):
                del self._sessions[digest]
                return None
            session.seen = now
            return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            with self._lock:
                self._sessions.pop(_digest(session_id), None)

    def drop_principal(self, name: str) -> int:
        """End every session of the key named ``name`` (it was revoked); how many there were."""
        with self._lock:
            gone = [d for d, s in self._sessions.items() if s.principal.name == name]
            for digest in gone:
                del self._sessions[digest]
        return len(gone)

    def __len__(self) -> int:
        return len(self._sessions)

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.seen > self.idle or now - session.created > self.lifetime

    def _purge(self, now: float) -> None:
        for digest in [d for d, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[digest]


def cookie_headers(request: Request, name: str, value: str, max_age: int) -> str:
    """A ``Set-Cookie`` value: HttpOnly, SameSite=Strict, path /console, Secure over HTTPS;
    ``max_age`` 0 deletes the cookie."""
    parts = [f"{name}={value}", f"Path={COOKIE_PATH}", f"Max-Age={max_age}", "HttpOnly", "SameSite=Strict"]
    if request.url.scheme == "https":
        parts.append("Secure")
    return "; ".join(parts)


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another origin (``Origin``, else
    ``Referer``); True when it says nothing (SameSite and the token still apply)."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return source is None
    host = request.headers.get("host", "")
    return urlsplit(source).netloc == host


def form_token(form: Any) -> str:
    value = form.get(CSRF_FIELD, "")
    return value if isinstance(value, str) else ""
