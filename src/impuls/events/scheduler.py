"""Schedules: their records (:class:`ScheduleStore`) and the loop that fires them (:class:`Scheduler`).

A schedule belongs to a function and names an expression (:mod:`impuls.events.schedules`)
in a time zone.  Its row keeps ``next_slot`` (the slot it waits for) and ``last_slot`` (the
last slot it fired).  Firing a slot is one transaction: a conditional UPDATE moves
``next_slot`` on, only if the row is still as it was read, and the event is queued
(:func:`impuls.events.store.insert_event`) only if that UPDATE changed the row.  So a slot
fires once, whatever the number of nodes sharing the store and however often they restart;
the event's request id is derived from the schedule and the slot as well, so even a
second insert of the same slot could not commit.

Slots that passed while no server ran (or while the scheduler fell behind) fire as one
event for the newest of them (``catch_up`` ``one``, the default) or, with ``none``, not at
all when the newest is older than the server's start (by more than ``grace``: another node
may be about to fire it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from impuls.auth import audit
from impuls.auth.audit import Actor
from impuls.errors import FunctionNotFound, InvalidInput, ScheduleExists, ScheduleNotFound
from impuls.events.schedules import Timetable, newest_slot, next_slot, parse, parse_timezone
from impuls.events.store import insert_event
from impuls.store.schema import functions, schedules

__all__ = ["CATCH_UP", "Schedule", "ScheduleStore", "Scheduler"]

log = logging.getLogger("impuls.scheduler")

#: what happens to slots missed while no server ran
CATCH_UP = ("one", "none")
#: schedule names, as EventBridge Scheduler's
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: the largest payload, as JSON (an asynchronous invocation's limit)
MAX_PAYLOAD = 256 * 1024
FIELDS = ("name", "expression", "timezone", "payload", "enabled", "catch_up")
CHANGEABLE = FIELDS[1:]
LATEST = "$LATEST"
#: request ids of scheduled events: uuid5 of the schedule and the slot in this namespace
EVENT_NAMESPACE = uuid.UUID("6f1d3c38-56b7-4a4e-9a77-3c2f1d7e0b51")


def utc_now() -> datetime:
    return datetime.now(UTC)


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _rfc3339(ts: datetime | None) -> str | None:
    return None if ts is None else _utc(ts).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Schedule:
    function_name: str
    name: str
    expression: str
    timezone: str
    payload: str | None  # JSON text; None: EventBridge's scheduled-event shape
    enabled: bool
    catch_up: str
    created_at: datetime
    updated_at: datetime
    last_slot: datetime | None
    next_slot: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> Schedule:
        m = row._mapping
        return cls(m["function_name"], m["name"], m["expression"], m["timezone"], m["payload"],
                   bool(m["enabled"]), m["catch_up"], _utc(m["created_at"]), _utc(m["updated_at"]),
                   _utc(m["last_slot"]) if m["last_slot"] is not None else None,
                   _utc(m["next_slot"]) if m["next_slot"] is not None else None)

    @property
    def target(self) -> str:
        """How the audit log names it."""
        return f"{self.function_name}:{self.name}"

    def timetable(self) -> Timetable:
        return parse(self.expression, self.timezone, self.created_at)

    def to_api(self) -> dict[str, Any]:
        return {
            "function_name": self.function_name, "name": self.name, "expression": self.expression,
            "timezone": self.timezone, "payload": None if self.payload is None else json.loads(self.payload),
            "enabled": self.enabled, "catch_up": self.catch_up, "created_at": _rfc3339(self.created_at),
            "updated_at": _rfc3339(self.updated_at), "last_slot": _rfc3339(self.last_slot),
            "next_slot": _rfc3339(self.next_slot),
        }


# --- validation ------------------------------------------------------------------------


def _check_fields(body: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    if not isinstance(body, Mapping):
        raise InvalidInput("body: must be a JSON object")
    for key in body:
        if key not in allowed:
            if key == "name" and "name" not in allowed:
                raise InvalidInput("name: a schedule cannot be renamed; delete it and create another")
            raise InvalidInput(f"{key}: unknown field (allowed: {', '.join(allowed)})")


def _payload(value: Any) -> str | None:
    if value is None:
        return None
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        raise InvalidInput("payload: must be a JSON value") from None
    if len(text.encode()) > MAX_PAYLOAD:
        raise InvalidInput(f"payload: at most {MAX_PAYLOAD} bytes as JSON")
    return text


def _enabled(value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput("enabled: must be true or false")
    return value


def _catch_up(value: Any) -> str:
    if value not in CATCH_UP:
        raise InvalidInput(f"catch_up: must be one of {', '.join(CATCH_UP)}, not {value!r}")
    return str(value)


def _expression(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidInput("expression: a schedule expression such as rate(5 minutes) or cron(0 12 * * ? *)")
    return value.strip()


def _first_slot(expression: str, timezone: str, start: datetime, now: datetime) -> datetime:
    """The first slot after ``now``; InvalidInput when the expression has none left."""
    found = next_slot(parse(expression, timezone, start), now)
    if found is None:
        raise InvalidInput(f"expression: {expression} has no time left after now (its years are over)")
    return found


# --- the records -----------------------------------------------------------------------


class ScheduleStore:
    """Create, read, change and delete schedules; every change is audited in its transaction
    (``schedule.create``, ``schedule.update``, ``schedule.delete``, target ``function:name``)."""

    def __init__(self, db: Engine, clock: Callable[[], datetime] = utc_now) -> None:
        self.db = db
        self.clock = clock

    def create(self, function_name: str, body: Mapping[str, Any], actor: Actor = audit.SERVER) -> Schedule:
        """A new schedule from ``body`` (``name``, ``expression``; ``timezone`` "UTC",
        ``payload`` null, ``enabled`` true, ``catch_up`` "one")."""
        _check_fields(body, FIELDS)
        name = body.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidInput("name: 1 to 64 letters, digits, '-', '_' or '.'")
        if "expression" not in body:
            raise InvalidInput("expression: required, such as rate(5 minutes) or cron(0 12 * * ? *)")
        expression = _expression(body["expression"])
        timezone = body.get("timezone", "UTC")
        parse_timezone(timezone)
        payload = _payload(body.get("payload"))
        enabled = _enabled(body.get("enabled", True))
        catch_up = _catch_up(body.get("catch_up", "one"))
        now = _utc(self.clock())
        first = _first_slot(expression, timezone, now, now)
        values = {"function_name": function_name, "name": name, "expression": expression,
                  "timezone": timezone, "payload": payload, "enabled": enabled, "catch_up": catch_up,
                  "created_at": now, "updated_at": now, "last_slot": None,
                  "next_slot": first if enabled else None}
        try:
            with self.db.begin() as conn:
                conn.execute(insert(schedules).values(**values))
                # after the insert: a delete of the function either committed before (and
                # this fails) or deletes this schedule with it
                self._require_function(conn, function_name, lock=True)
                audit.record(conn, actor, "schedule.create", f"{function_name}:{name}",
                             {"expression": expression, "timezone": timezone, "enabled": enabled,
                              "catch_up": catch_up})
        except IntegrityError:
            raise ScheduleExists(function_name, name) from None
        return self.get(function_name, name)

    def get(self, function_name: str, name: str) -> Schedule:
        with self.db.connect() as conn:
            row = conn.execute(select(schedules).where(schedules.c.function_name == function_name,
                                                       schedules.c.name == name)).first()
            if row is None:
                self._require_function(conn, function_name)
                raise ScheduleNotFound(function_name, name)
        return Schedule.from_row(row)

    def list(self, function_name: str) -> list[Schedule]:
        """A function's schedules in name order (FunctionNotFound for an unknown function)."""
        with self.db.connect() as conn:
            self._require_function(conn, function_name)
            rows = conn.execute(select(schedules).where(schedules.c.function_name == function_name)
                                .order_by(schedules.c.name)).all()
        return [Schedule.from_row(r) for r in rows]

    def update(self, function_name: str, name: str, changes: Mapping[str, Any],
               actor: Actor = audit.SERVER) -> Schedule:
        """Change any of ``expression``, ``timezone``, ``payload``, ``enabled``, ``catch_up``.
        A new expression, time zone or enabling waits for the first slot after now (a rate
        still counts from the creation), and after the last slot fired (a clock that went
        back does not fire a slot again); disabling clears ``next_slot``."""
        _check_fields(changes, CHANGEABLE)
        current = self.get(function_name, name)
        values: dict[str, Any] = {}
        if "expression" in changes:
            values["expression"] = _expression(changes["expression"])
        if "timezone" in changes:
            parse_timezone(changes["timezone"])
            values["timezone"] = changes["timezone"]
        if "payload" in changes:
            values["payload"] = _payload(changes["payload"])
        if "enabled" in changes:
            values["enabled"] = _enabled(changes["enabled"])
        if "catch_up" in changes:
            values["catch_up"] = _catch_up(changes["catch_up"])
        expression = values.get("expression", current.expression)
        timezone = values.get("timezone", current.timezone)
        enabled = values.get("enabled", current.enabled)
        now = _utc(self.clock())
        if (expression, timezone, enabled) != (current.expression, current.timezone, current.enabled):
            parse(expression, timezone)
            after = max(now, current.last_slot) if current.last_slot is not None else now
            first = _first_slot(expression, timezone, current.created_at, after) if enabled else None
            values["next_slot"] = first
        values["updated_at"] = now
        with self.db.begin() as conn:
            done = conn.execute(update(schedules).values(**values).where(
                schedules.c.function_name == function_name, schedules.c.name == name)).rowcount
            if not done:
                raise ScheduleNotFound(function_name, name)
            detail = {k: v for k, v in values.items() if k in CHANGEABLE and k != "payload"}
            if "payload" in values:
                detail["payload"] = "changed"
            audit.record(conn, actor, "schedule.update", f"{function_name}:{name}", detail)
        return self.get(function_name, name)

    def delete(self, function_name: str, name: str, actor: Actor = audit.SERVER) -> None:
        with self.db.begin() as conn:
            done = conn.execute(delete(schedules).where(schedules.c.function_name == function_name,
                                                        schedules.c.name == name)).rowcount
            if not done:
                self._require_function(conn, function_name)
                raise ScheduleNotFound(function_name, name)
            audit.record(conn, actor, "schedule.delete", f"{function_name}:{name}")

    @staticmethod
    def _require_function(conn: Connection, function_name: str, lock: bool = False) -> None:
        query = select(functions.c.name).where(functions.c.name == function_name)
        if lock and conn.dialect.name == "postgresql":
            query = query.with_for_update()
        if conn.execute(query).first() is None:
            raise FunctionNotFound(function_name)


# --- firing ----------------------------------------------------------------------------


class Scheduler:
    """Fires the schedules of every function: :meth:`fire_due` does one round, the loop
    started by :meth:`start` runs a round whenever a slot is due (at least once a second).

    ``node`` names this server in logs; ``account`` and ``region`` go into the scheduled
    events and their ARNs.  ``on_fired`` (set it before :meth:`start`) is called on the
    event loop's thread after a round that queued events (their transactions committed).
    """

    def __init__(self, db: Engine, node: str, account: str, region: str,
                 clock: Callable[[], datetime] = utc_now, grace: timedelta = timedelta(seconds=5)) -> None:
        self.db = db
        self.node = node
        self.account = account
        self.region = region
        self.clock = clock
        self.grace = grace
        self.on_fired: Callable[[], None] | None = None
        #: when this scheduler started (its first round, without :meth:`start`)
        self.started_at: datetime | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reported: set[tuple[str, str, str, str]] = set()

    # --- the loop ----------------------------------------------------------------------

    async def start(self) -> None:
        self.started_at = _utc(self.clock())
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="impuls-scheduler")

    async def close(self) -> None:
        """Stop the loop (after the round in progress, if any)."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stopping.is_set():
            delay = 1.0
            try:
                now = _utc(self.clock())
                fired = await asyncio.to_thread(self.fire_due, now)
                if fired and self.on_fired is not None:
                    self.on_fired()
                following = await asyncio.to_thread(self.next_due, now)
                if following is not None:
                    delay = min(1.0, max(0.0, (following - _utc(self.clock())).total_seconds()))
            except Exception:
                log.exception("scheduler round failed on %s; trying again in 1 s", self.node)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    def next_due(self, after: datetime) -> datetime | None:
        """The earliest slot after ``after`` that an enabled schedule waits for."""
        with self.db.connect() as conn:
            found = conn.execute(select(func.min(schedules.c.next_slot)).where(
                schedules.c.enabled.is_(True), schedules.c.next_slot > _utc(after))).scalar()
        return None if found is None else _utc(found)

    # --- one round -----------------------------------------------------------------------

    def fire_due(self, now: datetime) -> int:
        """Fire every enabled schedule whose next slot is at or before ``now``; the number
        of events queued.  A schedule that cannot be fired (say its time zone vanished from
        the system) is logged and left for the next round; the others fire."""
        now = _utc(now)
        if self.started_at is None:
            self.started_at = now
        with self.db.connect() as conn:
            rows = conn.execute(select(schedules).where(
                schedules.c.enabled.is_(True), schedules.c.next_slot.is_not(None),
                schedules.c.next_slot <= now).order_by(schedules.c.next_slot)).all()
        fired = 0
        for row in rows:
            try:
                fired += self._fire(row, now)
            except Exception as exc:
                key = (row.function_name, row.name, row.expression, row.timezone)
                if key not in self._reported:
                    self._reported.add(key)
                    log.error("schedule %s:%s (%s, %s) cannot fire: %s", row.function_name, row.name,
                              row.expression, row.timezone, exc, exc_info=True)
        return fired

    def _fire(self, row: Any, now: datetime) -> int:
        schedule = Schedule.from_row(row)
        due = schedule.next_slot
        assert due is not None and self.started_at is not None
        timetable = schedule.timetable()
        slot = newest_slot(timetable, due, now) or due
        skip = schedule.catch_up == "none" and slot < self.started_at - self.grace
        following = next_slot(timetable, slot)
        values: dict[str, Any] = {"next_slot": following}
        if not skip:
            values["last_slot"] = slot
        unchanged = [schedules.c.function_name == row.function_name, schedules.c.name == row.name,
                     schedules.c.enabled.is_(True), schedules.c.next_slot == row.next_slot,
                     schedules.c.updated_at == row.updated_at,
                     schedules.c.last_slot.is_(None) if row.last_slot is None
                     else schedules.c.last_slot == row.last_slot]
        with self.db.begin() as conn:
            if not conn.execute(update(schedules).where(*unchanged).values(**values)).rowcount:
                return 0  # another node fired it, or the schedule changed meanwhile
            if skip:
                log.info("schedule %s skipped missed slot %s (catch_up none)", schedule.target,
                         _rfc3339(slot))
                return 0
            request_id = str(uuid.uuid5(EVENT_NAMESPACE, f"{schedule.function_name}/{schedule.name}/"
                                                         f"{schedule.created_at.isoformat()}/{slot.isoformat()}"))
            insert_event(conn, schedule.function_name, qualifier=LATEST,
                         payload=self.payload(schedule, slot, request_id), source="schedule", now=now,
                         request_id=request_id)
        return 1

    # --- the event -----------------------------------------------------------------------

    def arn(self, schedule: Schedule) -> str:
        """The schedule's ARN: EventBridge Scheduler's, with the function as the group."""
        return (f"arn:aws:scheduler:{self.region}:{self.account}:schedule/"
                f"{schedule.function_name}/{schedule.name}")

    def payload(self, schedule: Schedule, slot: datetime, event_id: str) -> bytes:
        """The schedule's payload, or EventBridge's scheduled event for ``slot``."""
        if schedule.payload is not None:
            return schedule.payload.encode()
        return json.dumps({
            "version": "0", "id": event_id, "detail-type": "Scheduled Event", "source": "aws.events",
            "account": self.account, "time": _utc(slot).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": self.region, "resources": [self.arn(schedule)], "detail": {},
        }).encode()
