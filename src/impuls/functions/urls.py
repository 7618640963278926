"""Function URL configurations: an HTTP endpoint for $LATEST or an alias (stored and
validated; serving them is a later step).  Each has a random ``url_id`` that names it.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, delete, insert, select, update

from impuls.auth import audit
from impuls.auth.audit import Actor
from impuls.errors import InvalidInput, UrlConfigExists, UrlConfigNotFound
from impuls.functions.base import URL_PREFIX, RegistryBase, now, utc
from impuls.functions.models import rfc3339
from impuls.store.schema import function_urls

AUTH_TYPES = ("NONE", "KEY", "AWS_IAM")
INVOKE_MODES = ("BUFFERED", "RESPONSE_STREAM")
CORS_METHODS = ("GET", "PUT", "HEAD", "POST", "PATCH", "DELETE", "*")
#: cors field → (items at most, characters per item at most); max_age and allow_credentials apart
CORS_LISTS = {"allow_origins": (100, 253), "allow_methods": (6, 6), "allow_headers": (100, 1024),
              "expose_headers": (100, 1024)}
FIELDS = ("auth_type", "cors", "invoke_mode")
URL_ID_ALPHABET = string.ascii_lowercase + string.digits


@dataclass(frozen=True)
class UrlConfig:
    function_name: str
    #: "$LATEST" or an alias
    qualifier: str
    url_id: str
    auth_type: str
    #: allow_origins, allow_methods, allow_headers, expose_headers (lists of strings),
    #: allow_credentials (bool), max_age (seconds); only the keys that were set
    cors: dict[str, Any]
    invoke_mode: str
    created_at: datetime
    updated_at: datetime

    def to_api(self) -> dict[str, Any]:
        return {"function_name": self.function_name, "qualifier": self.qualifier, "url_id": self.url_id,
                "auth_type": self.auth_type, "cors": dict(self.cors), "invoke_mode": self.invoke_mode,
                "created_at": rfc3339(self.created_at), "updated_at": rfc3339(self.updated_at)}


def _row_to_url(row: Row[Any]) -> UrlConfig:
    m = row._mapping
    return UrlConfig(m["function_name"], m["qualifier"], m["url_id"], m["auth_type"], json.loads(m["cors"]),
                     m["invoke_mode"], utc(m["created_at"]), utc(m["updated_at"]))


def check_cors(cors: Any) -> dict[str, Any]:
    if cors is None:
        return {}
    if not isinstance(cors, dict):
        raise InvalidInput("cors: must be an object")
    for key, value in cors.items():
        if key in CORS_LISTS:
            most, length = CORS_LISTS[key]
            if (not isinstance(value, list) or len(value) > most
                    or not all(isinstance(v, str) and 1 <= len(v) <= length for v in value)):
                raise InvalidInput(f"cors.{key}: a list of at most {most} strings of 1-{length} characters")
            if key == "allow_methods" and not all(v.upper() in CORS_METHODS for v in value):
                raise InvalidInput(f"cors.allow_methods: each one of {', '.join(CORS_METHODS)}")
        elif key == "allow_credentials":
            if not isinstance(value, bool):
                raise InvalidInput("cors.allow_credentials: true or false")
        elif key == "max_age":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 86400:
                raise InvalidInput("cors.max_age: a whole number of seconds from 0 to 86400")
        else:
            raise InvalidInput(f"cors.{key}: unknown field")
    return dict(cors)


def check_url_fields(fields: Any) -> dict[str, Any]:
    if not isinstance(fields, dict):
        raise InvalidInput("body: must be an object")
    for key in fields:
        if key not in FIELDS:
            raise InvalidInput(f"{key}: unknown field")
    out = dict(fields)
    if "auth_type" in out and out["auth_type"] not in AUTH_TYPES:
        raise InvalidInput(f"auth_type: one of {', '.join(AUTH_TYPES)}")
    if "invoke_mode" in out and out["invoke_mode"] not in INVOKE_MODES:
        raise InvalidInput(f"invoke_mode: one of {', '.join(INVOKE_MODES)}")
    if "cors" in out:
        out["cors"] = check_cors(out["cors"])
    return out


class UrlConfigsMixin(RegistryBase):
    def put_url_config(self, name: str, qualifier: str, fields: dict[str, Any], actor: Actor = audit.SERVER,
                       create: bool | None = None) -> UrlConfig:
        """Set the URL configuration of ``name:qualifier`` ($LATEST or an existing alias; a
        version number is InvalidInput).  ``fields``: ``auth_type`` (NONE|KEY|AWS_IAM, needed
        for a new one), ``cors``, ``invoke_mode`` (BUFFERED|RESPONSE_STREAM, default
        BUFFERED); fields not given keep their values.  ``create=True`` refuses an existing
        one (UrlConfigExists), ``create=False`` a missing one (UrlConfigNotFound), None does
        either.  Audited as ``url.put``."""
        given = check_url_fields(fields)
        stamp = now()
        with self._write_lock, self.db.begin() as conn:
            self._function_row(conn, name, lock=True)
            qualifier = self._check_qualifier(conn, name, qualifier, versions=False)
            where = (function_urls.c.function_name == name, function_urls.c.qualifier == qualifier)
            row = conn.execute(select(function_urls).where(*where)).first()
            if row is not None and create is True:
                raise UrlConfigExists(f"{name}:{qualifier}")
            if row is None and create is False:
                raise UrlConfigNotFound(f"{name}:{qualifier}")
            values: dict[str, Any] = {"updated_at": stamp}
            if "cors" in given:
                values["cors"] = json.dumps(given["cors"])
            values.update({k: given[k] for k in ("auth_type", "invoke_mode") if k in given})
            if row is None:
                if "auth_type" not in given:
                    raise InvalidInput(f"auth_type: required, one of {', '.join(AUTH_TYPES)}")
                conn.execute(insert(function_urls).values(
                    function_name=name, qualifier=qualifier,
                    url_id="".join(secrets.choice(URL_ID_ALPHABET) for _ in range(32)),
                    cors=values.pop("cors", "{}"), invoke_mode=values.pop("invoke_mode", "BUFFERED"),
                    created_at=stamp, **values))
            else:
                conn.execute(update(function_urls).where(*where).values(**values))
            audit.record(conn, actor, "url.put", f"{name}:{qualifier}",
                         {k: given[k] for k in ("auth_type", "invoke_mode") if k in given})
        self._changed(name, URL_PREFIX + qualifier)
        return self.get_url_config(name, qualifier)

    def get_url_config(self, name: str, qualifier: str) -> UrlConfig:
        """FunctionNotFound, UrlConfigNotFound."""
        with self.db.connect() as conn:
            self._function_row(conn, name)
            row = conn.execute(select(function_urls).where(function_urls.c.function_name == name,
                                                           function_urls.c.qualifier == qualifier)).first()
        if row is None:
            raise UrlConfigNotFound(f"{name}:{qualifier}")
        return _row_to_url(row)

    def find_url(self, url_id: str) -> UrlConfig:
        """The URL configuration called ``url_id`` (UrlConfigNotFound)."""
        with self.db.connect() as conn:
            row = conn.execute(select(function_urls).where(function_urls.c.url_id == url_id)).first()
        if row is None:
            raise UrlConfigNotFound(url_id)
        return _row_to_url(row)

    def delete_url_config(self, name: str, qualifier: str, actor: Actor = audit.SERVER) -> None:
        """UrlConfigNotFound when there is none.  Audited as ``url.delete``."""
        with self._write_lock, self.db.begin() as conn:
            self._function_row(conn, name, lock=True)
            deleted = conn.execute(delete(function_urls).where(
                function_urls.c.function_name == name, function_urls.c.qualifier == qualifier)).rowcount
            if not deleted:
                raise UrlConfigNotFound(f"{name}:{qualifier}")
            audit.record(conn, actor, "url.delete", f"{name}:{qualifier}")
        self._changed(name, URL_PREFIX + qualifier)

    def list_url_configs(self, name: str) -> list[UrlConfig]:
        """Every URL configuration of the function, by qualifier."""
        with self.db.connect() as conn:
            self._function_row(conn, name)
            rows = conn.execute(select(function_urls).where(function_urls.c.function_name == name)
                                .order_by(function_urls.c.qualifier)).all()
        return [_row_to_url(r) for r in rows]
