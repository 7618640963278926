"""Event-invoke configurations: how asynchronous calls of a function, version or alias are
retried and where their outcome goes (stored and validated; the engine does not use them yet).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, delete, insert, select, update

from impuls.auth import audit
from impuls.auth.audit import Actor
from impuls.errors import EventConfigNotFound, InvalidInput
from impuls.functions.base import EVENT_CONFIG_PREFIX, RegistryBase, now, utc
from impuls.functions.models import rfc3339
from impuls.store.schema import event_invoke_configs

DEFAULTS: dict[str, Any] = {"maximum_retry_attempts": 2, "maximum_event_age_seconds": 21600,
                            "on_success": None, "on_failure": None}
#: a destination: a function (invoked asynchronously with the destination record) ...
FUNCTION_ARN_RE = re.compile(r"^arn:aws[a-zA-Z0-9-]*:lambda:[a-z0-9-]*:\d{12}:function:"
                             r"(?P<name>[A-Za-z0-9_-]{1,64})(?::(?P<qualifier>\$LATEST|[A-Za-z0-9_-]+))?$")
#: ... or Impuls' dead-letter list of the function whose event failed
DEAD_LETTERS = "arn:aws:impuls:::dead-letters"
MAX_DESTINATION = 350


@dataclass(frozen=True)
class EventInvokeConfig:
    function_name: str
    #: "$LATEST", a version number or an alias
    qualifier: str
    maximum_retry_attempts: int
    maximum_event_age_seconds: int
    on_success: str | None
    on_failure: str | None
    updated_at: datetime

    def to_api(self) -> dict[str, Any]:
        return {"function_name": self.function_name, "qualifier": self.qualifier,
                "maximum_retry_attempts": self.maximum_retry_attempts,
                "maximum_event_age_seconds": self.maximum_event_age_seconds,
                "on_success": self.on_success, "on_failure": self.on_failure,
                "updated_at": rfc3339(self.updated_at)}


def _row_to_config(row: Row[Any]) -> EventInvokeConfig:
    m = row._mapping
    return EventInvokeConfig(m["function_name"], m["qualifier"], m["maximum_retry_attempts"],
                             m["maximum_event_age_seconds"], m["on_success"], m["on_failure"],
                             utc(m["updated_at"]))


def check_event_fields(fields: Any, min_age: int = 60) -> dict[str, Any]:
    """The given fields, checked (InvalidInput names the field).  Destinations are a
    function's ARN or Impuls' dead-letter list (:data:`DEAD_LETTERS`)."""
    if not isinstance(fields, dict):
        raise InvalidInput("body: must be an object")
    for key in fields:
        if key not in DEFAULTS:
            raise InvalidInput(f"{key}: unknown field")
    out = dict(fields)
    for key, low, high in (("maximum_retry_attempts", 0, 2), ("maximum_event_age_seconds", min_age, 21600)):
        value = out.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidInput(f"{key}: a whole number from {low} to {high}")
    for key in ("on_success", "on_failure"):
        value = out.get(key)
        if value == "":
            out[key] = None
        elif value is not None and (not isinstance(value, str) or len(value) > MAX_DESTINATION
                                    or not (FUNCTION_ARN_RE.match(value) or value == DEAD_LETTERS)):
            raise InvalidInput(f"{key}: a function's ARN (arn:aws:lambda:<region>:<account>:function:"
                               f"<name>[:<qualifier>]) or Impuls' dead-letter list ({DEAD_LETTERS})")
    return out


class EventConfigsMixin(RegistryBase):
    def put_event_config(self, name: str, qualifier: str, fields: dict[str, Any],
                         actor: Actor = audit.SERVER, replace: bool = True) -> EventInvokeConfig:
        """Set the event-invoke configuration of ``name:qualifier`` ("$LATEST", a version or
        an alias, which must exist).  ``replace=True`` (Lambda's Put): fields not given take
        their defaults (2 retries, 21600 s, no destinations).  ``replace=False`` (Update):
        fields not given keep their values, and the configuration must exist
        (EventConfigNotFound).  Audited as ``event_config.put``."""
        given = check_event_fields(fields, self.min_event_age)
        with self._write_lock, self.db.begin() as conn:
            self._function_row(conn, name, lock=True)
            qualifier = self._check_qualifier(conn, name, qualifier)
            where = (event_invoke_configs.c.function_name == name,
                     event_invoke_configs.c.qualifier == qualifier)
            row = conn.execute(select(event_invoke_configs).where(*where)).first()
            if row is None and not replace:
                raise EventConfigNotFound(f"{name}:{qualifier}")
            base = DEFAULTS if replace or row is None else {k: row._mapping[k] for k in DEFAULTS}
            values = {**base, **given, "updated_at": now()}
            if row is None:
                conn.execute(insert(event_invoke_configs).values(function_name=name, qualifier=qualifier,
                                                                 **values))
            else:
                conn.execute(update(event_invoke_configs).where(*where).values(**values))
            audit.record(conn, actor, "event_config.put", f"{name}:{qualifier}",
                         {k: values[k] for k in DEFAULTS})
        self._changed(name, EVENT_CONFIG_PREFIX + qualifier)
        return self.get_event_config(name, qualifier)

    def get_event_config(self, name: str, qualifier: str) -> EventInvokeConfig:
        """FunctionNotFound, EventConfigNotFound."""
        with self.db.connect() as conn:
            self._function_row(conn, name)
            row = conn.execute(select(event_invoke_configs).where(
                event_invoke_configs.c.function_name == name,
                event_invoke_configs.c.qualifier == qualifier)).first()
        if row is None:
            raise EventConfigNotFound(f"{name}:{qualifier}")
        return _row_to_config(row)

    def delete_event_config(self, name: str, qualifier: str, actor: Actor = audit.SERVER) -> None:
        """EventConfigNotFound when there is none.  Audited as ``event_config.delete``."""
        with self._write_lock, self.db.begin() as conn:
            self._function_row(conn, name, lock=True)
            deleted = conn.execute(delete(event_invoke_configs).where(
                event_invoke_configs.c.function_name == name,
                event_invoke_configs.c.qualifier == qualifier)).rowcount
            if not deleted:
                raise EventConfigNotFound(f"{name}:{qualifier}")
            audit.record(conn, actor, "event_config.delete", f"{name}:{qualifier}")
        self._changed(name, EVENT_CONFIG_PREFIX + qualifier)

    def list_event_configs(self, name: str) -> list[EventInvokeConfig]:
        """Every event-invoke configuration of the function, by qualifier."""
        with self.db.connect() as conn:
            self._function_row(conn, name)
            rows = conn.execute(select(event_invoke_configs)
                                .where(event_invoke_configs.c.function_name == name)
                                .order_by(event_invoke_configs.c.qualifier)).all()
        return [_row_to_config(r) for r in rows]
