"""API keys: made, stored only as hashes, looked up, revoked.

A key is ``impuls_<key id>_<secret>`` (48 random bits of id, 256 of secret);
the store keeps the key id and the sha256 of the whole key, never the key.
Each key also has AWS-style credentials for the Lambda API: an access key id
(stored) and a secret access key that the server derives from its own secret
(``<data dir>/server-secret``, mode 0600, or ``IMPULS_SERVER_SECRET``), so the
database never holds it either.

Lookups are cached for at most :data:`CACHE_SECONDS`; a revoke on this node
empties the cache at once, so a revoked key stops working within that time
everywhere and at once here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from impuls.auth import audit
from impuls.auth.audit import Actor
from impuls.auth.principal import Principal, Scope, check_pattern
from impuls.errors import InvalidInput, KeyExists, KeyNotFound
from impuls.store.schema import api_keys

log = logging.getLogger("impuls.auth")

KEY_PREFIX = "impuls_"
CACHE_SECONDS = 1.0
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY_RE = re.compile(r"^impuls_([0-9a-f]{12})_[A-Za-z0-9_-]{43}$")
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
ENV_ADMIN = "IMPULS_ADMIN_KEY"


@dataclass(frozen=True)
class NewKey:
    """A key as made: the only time its secrets exist outside the caller's hands."""

    name: str
    scope: Scope
    functions: str
    key: str
    access_key_id: str
    secret_access_key: str
    created_at: datetime

    def to_api(self) -> dict[str, Any]:
        return {"name": self.name, "scope": self.scope.label, "functions": self.functions,
                "key": self.key, "access_key_id": self.access_key_id,
                "secret_access_key": self.secret_access_key, "created_at": _rfc3339(self.created_at)}


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _rfc3339(ts: datetime) -> str:
    ts = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def load_server_secret(data_dir: Path, configured: str) -> bytes:
    """``configured`` (shared by the nodes of a cluster), else ``<data dir>/server-secret``,
    made at first start with mode 0600."""
    if configured:
        return configured.encode()
    path = data_dir / "server-secret"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    value = secrets.token_hex(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it meanwhile
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(value + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    return value


class KeyStore:
    """Create, list, revoke and check keys (see module doc); thread-safe."""

    def __init__(self, db: Engine, server_secret: bytes, env_admin_key: str = "") -> None:
        self.db = db
        self._server_secret = server_secret
        self._env_admin_hash = _hash(env_admin_key) if env_admin_key else ""
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._credential_cache: dict[str, tuple[tuple[Principal, str], float]] = {}
        self._valid_cache: dict[Principal, float] = {}
        self._lock = threading.Lock()

    # --- making and revoking ---------------------------------------------------

    def create(self, name: object, scope: object, functions: object = "*",
               actor: Actor = audit.SERVER) -> NewKey:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidInput("name: 1-64 characters: letters, digits, '_', '.', '-' "
                               "(starting with a letter or digit)")
        parsed_scope = Scope.parse(scope)
        pattern = check_pattern(functions)
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        access_key_id = "AKIA" + "".join(secrets.choice(_BASE32) for _ in range(16))
        now = datetime.now(UTC)
        try:
            with self.db.begin() as conn:
                conn.execute(insert(api_keys).values(
                    name=name, key_id=key_id, key_hash=_hash(key), access_key_id=access_key_id,
                    scope=parsed_scope.label, functions=pattern, created_at=now, revoked_at=None))
                audit.record(conn, actor, "key.create", name,
                             {"scope": parsed_scope.label, "functions": pattern})
        except IntegrityError as exc:
            raise KeyExists(name) from exc
        return NewKey(name, parsed_scope, pattern, key, access_key_id,
                      self.secret_access_key(access_key_id), now)

    def revoke(self, name: str, actor: Actor) -> dict[str, Any]:
        now = datetime.now(UTC)
        with self.db.begin() as conn:
            done = conn.execute(update(api_keys).where(api_keys.c.name == name,
                                                       api_keys.c.revoked_at.is_(None))
                                .values(revoked_at=now)).rowcount
            if not done:
                exists = conn.execute(select(api_keys.c.name).where(api_keys.c.name == name)).first()
                if exists is None:
                    raise KeyNotFound(name)
                raise InvalidInput(f"key '{name}' is already revoked")
            audit.record(conn, actor, "key.revoke", name)
        with self._lock:
            self._cache.clear()
            self._credential_cache.clear()
            self._valid_cache.clear()
        return {"name": name, "revoked_at": _rfc3339(now)}

    def list(self) -> list[dict[str, Any]]:
        """Every key without its secrets, in name order."""
        with self.db.connect() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.name)).all()
        return [{"name": r.name, "scope": r.scope, "functions": r.functions,
                 "access_key_id": r.access_key_id, "created_at": _rfc3339(r.created_at),
                 "revoked_at": _rfc3339(r.revoked_at) if r.revoked_at else None} for r in rows]

    def count(self) -> int:
        with self.db.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(api_keys)).scalar_one())

    # --- checking ----------------------------------------------------------------

    def cached(self, key: str) -> Principal | None:
        """The principal of ``key`` if it was checked less than CACHE_SECONDS ago, or if it is
        the admin key given in the environment (which no revoke can end): no database."""
        digest = _hash(key)
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        if self._env_admin_hash and hmac.compare_digest(digest, self._env_admin_hash):
            return Principal(ENV_ADMIN, Scope.ADMIN)
        return None

    def authenticate(self, key: str) -> Principal | None:
        """The principal of a valid key, None for an unknown or revoked one (blocking)."""
        digest = _hash(key)
        if self._env_admin_hash and hmac.compare_digest(digest, self._env_admin_hash):
            return Principal(ENV_ADMIN, Scope.ADMIN)
        match = _KEY_RE.match(key)
        if match is None:
            return None
        with self.db.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == match[1])).first()
        if row is None or row.revoked_at is not None or not hmac.compare_digest(digest, row.key_hash):
            return None
        principal = Principal(row.name, Scope.parse(row.scope), row.functions)
        with self._lock:
            self._cache[digest] = (principal, time.monotonic() + CACHE_SECONDS)
        return principal

    def credentials(self, access_key_id: str) -> tuple[Principal, str] | None:
        """The principal and secret access key for SigV4 verification (None: unknown or
        revoked); a found one is cached like a key (see :meth:`cached_credentials`)."""
        with self.db.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.access_key_id == access_key_id)).first()
        if row is None or row.revoked_at is not None:
            return None
        found = (Principal(row.name, Scope.parse(row.scope), row.functions),
                 self.secret_access_key(access_key_id))
        with self._lock:
            self._credential_cache[access_key_id] = (found, time.monotonic() + CACHE_SECONDS)
        return found

    def cached_credentials(self, access_key_id: str) -> tuple[Principal, str] | None:
        """What :meth:`credentials` found less than CACHE_SECONDS ago, else None (no database)."""
        hit = self._credential_cache.get(access_key_id)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        return None

    def still_valid(self, principal: Principal) -> bool:
        """Whether the key ``principal`` came from is still valid (not revoked), for those who
        keep the principal instead of the key (the console's sessions).  A yes is cached like a
        lookup; a revoke on this node empties the cache at once."""
        hit = self._valid_cache.get(principal)
        if hit is not None and hit > time.monotonic():
            return True
        if principal == Principal(ENV_ADMIN, Scope.ADMIN) and self._env_admin_hash:
            return True
        with self.db.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.name == principal.name)).first()
        valid = (row is not None and row.revoked_at is None and row.scope == principal.scope.label
                 and row.functions == principal.functions)
        if valid:
            with self._lock:
                self._valid_cache[principal] = time.monotonic() + CACHE_SECONDS
        return valid

    def secret_access_key(self, access_key_id: str) -> str:
        return base64.b64encode(self.mac(b"aws-secret:" + access_key_id.encode())).decode()[:40]

    def mac(self, message: bytes) -> bytes:
        """HMAC-SHA256 of ``message`` under the server secret (for links that need no key)."""
        return hmac.new(self._server_secret, message, hashlib.sha256).digest()

    # --- the first admin key -------------------------------------------------------

    def bootstrap(self, key_file: Path) -> Path | None:
        """At the first start (no key was ever made, no IMPULS_ADMIN_KEY): make an admin key
        and write it to ``key_file`` (mode 0600).  Returns the file when it made one."""
        if self._env_admin_hash or self.count():
            return None
        new = self.create("admin", Scope.ADMIN)
        tmp = key_file.with_name(f".{key_file.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(new.key + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, key_file)
        return key_file
