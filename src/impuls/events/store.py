"""The event queue's rows: inserting, claiming with a lease, recording attempts and ends.

Accepted means durable: an event is answered 202 only once its row is committed.  A
node leases the events it delivers (``lease_owner``, ``lease_until``); an event whose
lease ran out is claimed again by any node (PostgreSQL: ``FOR UPDATE SKIP LOCKED``),
and counted as a possible duplicate: the lost delivery may have run.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam, delete, func, insert, or_, select, update

from impuls.engine.records import new_request_id
from impuls.errors import DeadLetterNotFound, EventNotFound
from impuls.events.writer import Batch
from impuls.store.schema import dead_letters, event_attempts, events

#: how many characters of a result or error an event keeps
KEEP_CHARS = 4096
#: event states
QUEUED, RUNNING, RETRYING = "queued", "running", "retrying"
SUCCEEDED, FAILED, EXPIRED = "succeeded", "failed", "expired"
PENDING_STATES = (QUEUED, RUNNING, RETRYING)


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


@dataclass(frozen=True)
class Event:
    request_id: str
    function_name: str
    qualifier: str
    payload: bytes
    source: str
    state: str
    attempts: int
    retries_used: int
    duplicates: int
    next_at: datetime
    created_at: datetime
    #: the last throttle/start-failure backoff, seconds (0: none yet)
    backoff: float
    #: the W3C traceparent of the span that accepted it (tracing on), the parent of its deliveries
    traceparent: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> Event:
        return cls.from_values(row._mapping)

    @classmethod
    def from_values(cls, m: Any) -> Event:
        return cls(m["request_id"], m["function_name"], m["qualifier"], bytes(m["payload"]), m["source"],
                   m["state"], m["attempts"], m["retries_used"], m["duplicates"], _utc(m["next_at"]),
                   _utc(m["created_at"]), float(m["backoff"]), m.get("traceparent"))


def event_values(function_name: str, qualifier: str, payload: bytes, source: str, now: datetime,
                 request_id: str | None = None, lease: tuple[str, datetime] | None = None,
                 traceparent: str | None = None) -> dict[str, Any]:
    """A new event's row (leased to ``lease`` = (node, until) when its node delivers it at once;
    ``traceparent``: the span that accepted it, with tracing on)."""
    return {"request_id": request_id or new_request_id(), "function_name": function_name,
            "qualifier": qualifier, "payload": payload, "source": source, "state": QUEUED, "attempts": 0,
            "retries_used": 0, "duplicates": 0, "backoff": 0.0, "next_at": now,
            "lease_owner": lease[0] if lease else None, "lease_until": lease[1] if lease else None,
            "created_at": now, "updated_at": now, "traceparent": traceparent}


def insert_event(conn: Connection, function_name: str, qualifier: str, payload: bytes, source: str,
                 now: datetime, request_id: str | None = None) -> str:
    """Queue an event inside the caller's transaction (schedules, destinations); its id."""
    values = event_values(function_name, qualifier, payload, source, now, request_id)
    conn.execute(insert(events).values(**values))
    return str(values["request_id"])


def claim(db: Engine, node: str, limit: int, now: datetime, lease: timedelta,
          ahead: tuple[timedelta, timedelta], held: Collection[str] = ()) -> list[Event]:
    """Up to ``limit`` due events, leased to ``node`` until ``now + lease``.  An event taken
    over from a lapsed lease counts one possible duplicate.  Events in ``held`` (the ones
    ``node`` is delivering or about to) are left alone, whatever their lease says.

    ``ahead`` = (the longest retry delay, the longest lease) the dispatchers set: a retry due,
    or a lease running, further ahead of ``now`` than that was set by a clock that has since
    gone back, and is due (lapsed) now rather than when the clock catches up again."""
    retry_ahead, lease_ahead = ahead
    due = and_(events.c.state.in_(PENDING_STATES),
               or_(events.c.next_at <= now, events.c.next_at > now + retry_ahead),
               or_(events.c.lease_until.is_(None), events.c.lease_until < now,
                   events.c.lease_until > now + lease_ahead))
    if held:
        due = and_(due, events.c.request_id.not_in(list(held)))
    query = select(events).where(due).order_by(events.c.next_at).limit(limit)
    with db.begin() as conn:
        if conn.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        rows = conn.execute(query).all()
        claimed = []
        for row in rows:
            lapsed = row.lease_until is not None
            done = conn.execute(update(events).where(events.c.request_id == row.request_id, due).values(
                lease_owner=node, lease_until=now + lease, updated_at=now,
                duplicates=events.c.duplicates + (1 if lapsed and row.state == RUNNING else 0),
            )).rowcount
            if done:
                claimed.append(Event.from_row(row))
    return claimed


# Writes a delivery makes go through a Batch (see :mod:`impuls.events.writer`): fixed
# statements with bound parameters, so that a shared transaction runs each as one executemany.

_RUNNING = update(events).where(events.c.request_id == bindparam("p_id")).values(
    state=RUNNING, lease_owner=bindparam("p_node"), lease_until=bindparam("p_until"),
    updated_at=bindparam("p_now"))
_FINISH = update(events).where(events.c.request_id == bindparam("p_id")).values(
    state=bindparam("p_state"), lease_owner=None, lease_until=None, updated_at=bindparam("p_now"),
    attempts=bindparam("p_attempts"), retries_used=bindparam("p_retries"), next_at=bindparam("p_next"),
    backoff=bindparam("p_backoff"), last_error_type=bindparam("p_error_type"),
    last_error=bindparam("p_error"), result=bindparam("p_result"), executed_version=bindparam("p_version"))


def running(batch: Batch, event: Event, node: str, now: datetime, until: datetime) -> None:
    """The delivery starts: state ``running``, the lease renewed to outlive the function's
    timeout (an attempt counts once it reached the function: see :func:`finish`)."""
    batch.execute(_RUNNING, {"p_id": event.request_id, "p_node": node, "p_until": until, "p_now": now})


def finish(batch: Batch, event: Event, now: datetime, state: str, *, attempts: int | None = None,
           retries_used: int | None = None, next_at: datetime | None = None, backoff: float | None = None,
           error_type: str | None = None, error: str | None = None, result: str | None = None,
           version: str | None = None) -> None:
    """An end (succeeded, failed, expired) or a retry (``retrying`` with ``next_at``); what is
    not given keeps the event's value (errors and results are replaced)."""
    batch.execute(_FINISH, {
        "p_id": event.request_id, "p_state": state, "p_now": now,
        "p_attempts": event.attempts if attempts is None else attempts,
        "p_retries": event.retries_used if retries_used is None else retries_used,
        "p_next": event.next_at if next_at is None else next_at,
        "p_backoff": event.backoff if backoff is None else backoff,
        "p_error_type": error_type, "p_error": _kept(error), "p_result": _kept(result), "p_version": version})


def record_attempt(batch: Batch, event: Event, number: int, started: datetime, finished: datetime,
                   outcome: str, node: str, error_type: str | None = None, error: str | None = None,
                   result: str | None = None) -> None:
    batch.insert(event_attempts, {
        "request_id": event.request_id, "number": number, "started_at": started, "finished_at": finished,
        "outcome": outcome, "error_type": error_type, "error": _kept(error), "result": _kept(result),
        "node": node})


def add_dead_letter(batch: Batch, event: Event, condition: str, record: dict[str, Any],
                    now: datetime) -> None:
    batch.insert(dead_letters, {"id": str(uuid.uuid4()), "function_name": event.function_name,
                                "request_id": event.request_id, "condition": condition,
                                "record": json.dumps(record), "created_at": now})


def _kept(text: str | None) -> str | None:
    return text[:KEEP_CHARS] if text else None


def describe(db: Engine, function_name: str, request_id: str) -> dict[str, Any]:
    """An event's state and every attempt (EventNotFound when there is no such event)."""
    with db.connect() as conn:
        row = conn.execute(select(events).where(events.c.request_id == request_id,
                                                events.c.function_name == function_name)).first()
        if row is None:
            raise EventNotFound(request_id)
        tries = conn.execute(select(event_attempts).where(event_attempts.c.request_id == request_id)
                             .order_by(event_attempts.c.number)).all()
    m = row._mapping
    return {
        "request_id": m["request_id"], "function_name": m["function_name"], "qualifier": m["qualifier"],
        "source": m["source"], "state": m["state"], "attempts": m["attempts"],
        "retries_used": m["retries_used"], "duplicates": m["duplicates"],
        "created_at": _rfc3339(m["created_at"]), "updated_at": _rfc3339(m["updated_at"]),
        "next_attempt_at": _rfc3339(m["next_at"]) if m["state"] in PENDING_STATES else None,
        "executed_version": m["executed_version"], "error_type": m["last_error_type"],
        "error": m["last_error"], "result": _json_or_text(m["result"]),
        "history": [{"attempt": t.number, "started_at": _rfc3339(t.started_at),
                     "finished_at": _rfc3339(t.finished_at), "outcome": t.outcome,
                     "error_type": t.error_type, "error": t.error, "result": _json_or_text(t.result),
                     "node": t.node} for t in tries],
    }


def list_events(db: Engine, function_name: str, limit: int, offset: int) -> dict[str, Any]:
    """A page of a function's events, newest first (without their history), their total count,
    and how many are not finished yet."""
    mine = events.c.function_name == function_name
    with db.connect() as conn:
        rows = conn.execute(select(events.c.request_id).where(mine)
                            .order_by(events.c.created_at.desc()).limit(limit).offset(offset)).scalars().all()
        total = conn.execute(select(func.count()).select_from(events).where(mine)).scalar_one()
        pending = conn.execute(select(func.count()).select_from(events)
                               .where(mine, events.c.state.in_(PENDING_STATES))).scalar_one()
    found = [{k: v for k, v in describe(db, function_name, rid).items() if k != "history"} for rid in rows]
    return {"events": found, "count": len(found), "total": int(total), "pending": int(pending)}


def depth(db: Engine) -> int:
    """Events not finished yet (queued, running or waiting for a retry)."""
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(events)
                                .where(events.c.state.in_(PENDING_STATES))).scalar_one())


def _rfc3339(ts: datetime) -> str:
    return _utc(ts).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_or_text(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def dead_letters_of(db: Engine, function_name: str) -> list[dict[str, Any]]:
    """A function's dead letters, oldest first."""
    with db.connect() as conn:
        rows = conn.execute(select(dead_letters).where(dead_letters.c.function_name == function_name)
                            .order_by(dead_letters.c.created_at)).all()
    return [{"id": r.id, "request_id": r.request_id, "condition": r.condition, "record": json.loads(r.record),
             "created_at": _rfc3339(r.created_at)} for r in rows]


def redrive(db: Engine, function_name: str, letter: str, now: datetime) -> str:
    """Queue a dead letter's original event again (a new request id) and drop the letter, in one
    transaction; DeadLetterNotFound when there is no such letter."""
    with db.begin() as conn:
        row = conn.execute(select(dead_letters).where(dead_letters.c.id == letter,
                                                      dead_letters.c.function_name == function_name)).first()
        if row is None:
            raise DeadLetterNotFound(letter)
        payload = json.loads(row.record).get("requestPayload")
        original = conn.execute(select(events.c.qualifier)
                                .where(events.c.request_id == row.request_id)).first()
        request_id = insert_event(conn, function_name, original[0] if original else "$LATEST",
                                  json.dumps(payload).encode(), "redrive", now)
        conn.execute(delete(dead_letters).where(dead_letters.c.id == letter))
    return request_id


def delete_dead_letter(db: Engine, function_name: str, letter: str) -> None:
    with db.begin() as conn:
        gone = conn.execute(delete(dead_letters).where(
            dead_letters.c.id == letter, dead_letters.c.function_name == function_name)).rowcount
    if not gone:
        raise DeadLetterNotFound(letter)


@dataclass(frozen=True)
class QueueSummary:
    """What the metrics read of the queue at a scrape."""

    #: events not finished, by state (queued, running, retrying; a state without any is absent)
    pending: dict[str, int]
    #: when the oldest event not finished was accepted (None: there is none)
    oldest: datetime | None
    #: dead letters kept, by function
    dead_letters: dict[str, int]


def queue_summary(db: Engine) -> QueueSummary:
    """The queue at a glance, for the metrics: two grouped counts and a minimum."""
    with db.connect() as conn:
        pending = conn.execute(select(events.c.state, func.count(), func.min(events.c.created_at))
                               .where(events.c.state.in_(PENDING_STATES))
                               .group_by(events.c.state)).all()
        letters = conn.execute(select(dead_letters.c.function_name, func.count())
                               .group_by(dead_letters.c.function_name)).all()
    oldest = min((_utc(row[2]) for row in pending if row[2] is not None), default=None)
    return QueueSummary({row[0]: int(row[1]) for row in pending}, oldest,
                        {row[0]: int(row[1]) for row in letters})
