"""Asynchronous invocation: accepting events durably, delivering them with Lambda's retry
rules, and sending outcomes to destinations.

Accept.  ``accept`` answers once the event's row is committed.  Concurrent accepts share
a commit (a writer task inserts every event waiting for it in one transaction), which is
what lets SQLite's durable commits keep up with many callers.  An event accepted here is
leased to this node and handed to its workers at once, so delivery starts without a
further read.

Deliver.  Workers (``async_concurrency`` of them) run one event each.  A function gets at
most half of its concurrency limit (at least one) for asynchronous deliveries on this node,
so synchronous calls always keep the other half; an event waiting for that share waits
here, in memory, with its lease renewed.  Outcomes, as on Lambda:

* success → ``succeeded``, then the ``on_success`` destination;
* a function error (exception, timeout, out of memory, crash) → a retry after base and
  2 * base seconds while ``maximum_retry_attempts`` allows, else ``failed`` and ``on_failure``
  (``RetriesExhausted``);
* throttled, or the sandbox could not start → retried after 1 s, doubling up to the
  backoff cap, without spending a retry;
* older than ``maximum_event_age_seconds`` → ``expired`` and ``on_failure`` (``EventAgeExceeded``).

Times (due, leases, ages) are the wall clock's (``clock``), kept in the database for every
node.  When it jumps (see docs/reliability.md, "When the clock jumps"): forward, retries
waiting fall due at once and an event expires only if the clock now says it is older than
its maximum age; back, a retry or lease further ahead than any this dispatcher sets
(:attr:`Dispatcher.ahead`) is due at once instead of when the clock catches up.

A destination is a function (it gets Lambda's destination record as a new event, in the
same transaction as the outcome) or the dead-letter list.  Delivery is at-least-once:
a node that dies mid-delivery leaves its lease to run out; the event is delivered again
and counted as a possible duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from impuls.engine.results import InvocationResult, Outcome
from impuls.errors import (
    FunctionChanging,
    ImpulsError,
    NotFound,
    SandboxStartFailed,
    ShuttingDown,
    Throttled,
)
from impuls.events import store
from impuls.events.store import Event
from impuls.events.writer import Batch, Writer
from impuls.functions.base import ALIAS_PREFIX, URL_PREFIX
from impuls.functions.event_configs import DEAD_LETTERS, DEFAULTS, FUNCTION_ARN_RE
from impuls.functions.models import function_arn
from impuls.store.schema import events

if TYPE_CHECKING:
    from impuls.config import Settings
    from impuls.engine.invoker import Invoker
    from impuls.functions.registry import FunctionRegistry
    from impuls.tracing import Tracer

log = logging.getLogger("impuls.events")

#: the largest accepted event (Lambda: 256 KB; Impuls allows more)
MAX_EVENT_BYTES = 1024 * 1024
POLL_SECONDS = 0.5
BACKOFF_FIRST = 1.0
#: the most retries an event config allows, and the longest a function may run (seconds)
MAX_RETRIES, MAX_TIMEOUT = 2, 900
#: conditions that are not the function's fault: retried with backoff, no retry spent
_SYSTEM = (Throttled, ShuttingDown, FunctionChanging, SandboxStartFailed)
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Policy:
    """What the event-invoke config of the event's qualifier says (defaults without one)."""

    maximum_retry_attempts: int
    maximum_event_age_seconds: int
    on_success: str | None
    on_failure: str | None


class Dispatcher:
    def __init__(self, registry: FunctionRegistry, invoker: Invoker, settings: Settings, node: str,
                 clock: Clock = utcnow, tracer: Tracer | None = None) -> None:
        self.registry = registry
        self.db = registry.db
        self.invoker = invoker
        self.settings = settings
        self.node = node
        self.clock = clock
        #: spans of accepts and deliveries (None: tracing is off)
        self.tracer = tracer
        self.lease = timedelta(seconds=settings.event_lease_margin_seconds)
        #: the longest retry delay and the longest lease this dispatcher sets (see store.claim)
        self.ahead = (timedelta(seconds=max(settings.event_backoff_max_seconds,
                                            MAX_RETRIES * settings.event_retry_base_seconds)),
                      timedelta(seconds=MAX_TIMEOUT) + self.lease)
        self._ready: asyncio.Queue[Event] = asyncio.Queue()
        self._held: set[str] = set()  # leased here: waiting or running
        self.writer = Writer(self.db)
        self._claim_wake = asyncio.Event()
        self._policies: dict[tuple[str, str], Policy] = {}
        self._gates: dict[str, asyncio.Semaphore] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._delivering = 0
        self.duplicates = 0  # taken over from lapsed leases since start (a metric)
        registry.on_change(self._changed_threadsafe)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Take back what this node leased before a crash, then run the writer, the claimer
        and the workers."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._recover)
        self.writer.start()
        self._tasks = [self._loop.create_task(self._claim()), self._loop.create_task(self._renew())]
        self._tasks += [self._loop.create_task(self._work()) for _ in range(self.settings.async_concurrency)]

    def _recover(self) -> None:
        """Events this node (the same data directory) leased before it died are due again now;
        those it had started may have run: a possible duplicate each."""
        now = self.clock()
        with self.db.begin() as conn:
            found = conn.execute(update(events).where(
                events.c.lease_owner == self.node, events.c.state == store.RUNNING).values(
                duplicates=events.c.duplicates + 1, lease_until=None, lease_owner=None,
                updated_at=now)).rowcount
            conn.execute(update(events).where(events.c.lease_owner == self.node).values(
                lease_until=None, lease_owner=None, updated_at=now))
        if found:
            self.duplicates += found
            log.warning("%d asynchronous deliveries were cut short by a restart: delivering them again",
                        found)

    async def close(self) -> None:
        """Stop taking events, let deliveries in flight end (up to the shutdown grace), then
        stop.  Events taken but not started stay leased to this node: it takes them back when
        it restarts (another node, once the lease runs out)."""
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_grace
        while self._delivering and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.writer.close()

    @property
    def held(self) -> int:
        """Events leased to this node: waiting for their function's share or being delivered."""
        return len(self._held)

    def wake(self) -> None:
        """Something became due now (a schedule fired): look at the queue."""
        self._claim_wake.set()

    # --- accepting -----------------------------------------------------------------------

    async def accept(self, name: str, qualifier: str | None, payload: bytes, source: str,
                     traceparent: str | None = None, tracestate: str | None = None) -> str:
        """Queue an event for ``name[:qualifier]`` and return its request id once it is
        committed.  The caller has checked the function (``Invoker.check``) and the size.
        With tracing on, the accept is a span (the child of the caller's ``traceparent``),
        kept with the event as the parent of its deliveries."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        assert self._loop is not None, "start() first"
        now = self.clock()
        local = len(self._held) < 2 * self.settings.async_concurrency  # else another poll takes it
        trace = None if self.tracer is None else self.tracer.start(
            f"accept {name}", "producer", traceparent, tracestate,
            {"faas.name": name, "impuls.qualifier": qualifier or "$LATEST", "impuls.event.source": source})
        values = store.event_values(name, qualifier or "$LATEST", payload, source, now,
                                    lease=(self.node, now + self.lease) if local else None,
                                    traceparent=None if trace is None else trace.traceparent)
        batch = Batch()
        batch.insert(events, values)
        if trace is None:
            await self.writer.submit(batch)
        else:
            trace.set("faas.invocation_id", values["request_id"])
            try:
                await self.writer.submit(batch)
            except BaseException as exc:
                trace.fail(exc)
                raise
            trace.finish({"impuls.outcome": "accepted"})
        if local:
            self._held.add(values["request_id"])
            self._ready.put_nowait(Event.from_values(values))
        return str(values["request_id"])

    # --- taking due events -----------------------------------------------------------------

    async def _claim(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._claim_wake.wait(), POLL_SECONDS)
            self._claim_wake.clear()
            room = 2 * self.settings.async_concurrency - len(self._held)
            if room <= 0:
                continue
            try:
                found = await asyncio.to_thread(store.claim, self.db, self.node, room, self.clock(),
                                                self.lease, self.ahead, frozenset(self._held))
            except Exception:
                log.exception("taking due events failed; trying again")
                continue
            for event in found:
                if event.request_id not in self._held:
                    self._held.add(event.request_id)
                    self._ready.put_nowait(event)

    async def _renew(self) -> None:
        """Keep the leases of events held here (waiting for their function's share) alive."""
        while True:
            await asyncio.sleep(max(POLL_SECONDS, self.lease.total_seconds() / 3))
            held = list(self._held)
            if held:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._extend, held)

    def _extend(self, request_ids: list[str]) -> None:
        now = self.clock()
        with self.db.begin() as conn:
            conn.execute(update(events).where(
                events.c.request_id.in_(request_ids), events.c.lease_owner == self.node,
                events.c.state != store.RUNNING).values(lease_until=now + self.lease))

    # --- delivering ------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            event = await self._ready.get()
            if self._closing:
                continue  # left leased here (see close)
            self._delivering += 1
            try:
                await self._deliver(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("delivering event %s failed; it will be retried", event.request_id)
            finally:
                self._delivering -= 1
                self._held.discard(event.request_id)

    async def _deliver(self, event: Event) -> None:
        if self.tracer is None:
            await self._attempt(event, None)
            return
        trace = self.tracer.start(f"deliver {event.function_name}", "consumer", event.traceparent, None, {
            "faas.name": event.function_name, "faas.invocation_id": event.request_id,
            "impuls.qualifier": event.qualifier, "impuls.event.source": event.source,
            "impuls.event.attempt": event.attempts + 1, "impuls.event.duplicates": event.duplicates,
            "impuls.event.age_ms": (self.clock() - event.created_at).total_seconds() * 1000})
        try:
            outcome = await self._attempt(event, trace.traceparent)
        except BaseException as exc:
            trace.fail(exc)
            raise
        trace.finish({"impuls.outcome": outcome},
                     None if outcome in ("success", "throttled", "not_started") else outcome)

    async def _attempt(self, event: Event, traceparent: str | None) -> str:
        """One delivery of ``event``; how it ended: an invocation outcome, ``expired``,
        ``throttled``/``not_started`` (to be retried) or ``refused``."""
        policy = await self._policy(event.function_name, event.qualifier)
        now = self.clock()
        if now - event.created_at > timedelta(seconds=policy.maximum_event_age_seconds):
            await self._write(self._end, event, now, policy, "EventAgeExceeded")
            return "expired"
        try:
            fn = await self.invoker.check(event.function_name, event.qualifier)
        except _SYSTEM as exc:
            await self._write(self._system_retry, event, now, policy, exc)
            return _system_outcome(exc)
        except ImpulsError as exc:  # gone, not ready, inactive: no point retrying
            await self._write(self._refused, event, now, policy, exc)
            return "refused"
        async with self._gate(event.function_name, fn.concurrency_limit):
            started = self.clock()
            until = started + timedelta(seconds=fn.timeout_sec) + self.lease
            # marked running (and its lease stretched past the timeout) before it runs: a node
            # that dies after the function started leaves it running, so that the node taking
            # it over counts the possible duplicate (one group-committed write, ~1 ms)
            await self._write(store.running, event, self.node, started, until)
            try:
                result = await self.invoker.invoke(event.function_name, event.payload,
                                                   qualifier=event.qualifier, request_id=event.request_id,
                                                   traceparent=traceparent)
            except _SYSTEM as exc:
                await self._write(self._system_retry, event, started, policy, exc)
                return _system_outcome(exc)
            except ImpulsError as exc:
                await self._write(self._refused, event, started, policy, exc)
                return "refused"
        await self._write(self._outcome, event, started, policy, result)
        return result.outcome.value

    async def _write(self, step: Callable[..., None], *args: Any) -> None:
        """``step(batch, *args)``, committed with whatever else is being written."""
        batch = Batch()
        step(batch, *args)
        await self.writer.submit(batch)

    def _gate(self, name: str, limit: int) -> asyncio.Semaphore:
        """A function's share of asynchronous deliveries on this node (see module doc)."""
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = asyncio.Semaphore(max(1, limit // 2))
        return gate

    # --- outcomes (each inside one transaction: the event's end, its attempt, its destination) ---

    def _outcome(self, batch: Batch, event: Event, started: datetime, policy: Policy,
                 result: InvocationResult) -> None:
        now = self.clock()
        attempt = event.attempts + 1
        if result.error_type == SandboxStartFailed.error_type:
            self._system_retry(batch, event, started, policy, SandboxStartFailed(result.error_message))
            return
        text = result.payload.decode("utf-8", "replace") if result.outcome is Outcome.SUCCESS else None
        store.record_attempt(batch, event, attempt, started, now, result.outcome.value,
                             self.node, result.error_type, result.error_message or None, text)
        if result.outcome is Outcome.SUCCESS:
            store.finish(batch, event, now, store.SUCCEEDED, attempts=attempt, result=text,
                         version=result.executed_version)
            self._destination(batch, event, attempt, policy.on_success, "Success", result, now)
            return
        error = {"errorMessage": result.error_message, "errorType": result.error_type,
                 "stackTrace": result.stack}
        retries = event.retries_used + 1
        if retries <= policy.maximum_retry_attempts:
            delay = self.settings.event_retry_base_seconds * retries
            store.finish(batch, event, now, store.RETRYING, attempts=attempt,
                         retries_used=retries, next_at=now + timedelta(seconds=delay),
                         error_type=result.error_type,
                         error=result.error_message, version=result.executed_version)
            return
        store.finish(batch, event, now, store.FAILED, attempts=attempt,
                     error_type=result.error_type, error=result.error_message,
                     result=json.dumps(error), version=result.executed_version)
        self._destination(batch, event, attempt, policy.on_failure, "RetriesExhausted", result, now)

    def _system_retry(self, batch: Batch, event: Event, started: datetime, policy: Policy,
                      exc: ImpulsError) -> None:
        """Throttled or not started: back off (1 s, doubling, capped) without spending a
        retry or counting an attempt, unless the event's age runs out first."""
        now = self.clock()
        delay = min(self.settings.event_backoff_max_seconds, max(BACKOFF_FIRST, event.backoff * 2))
        outcome = _system_outcome(exc)
        store.record_attempt(batch, event, event.attempts, started, now, outcome, self.node,
                             type(exc).__name__, exc.message)
        if now + timedelta(seconds=delay) - event.created_at > timedelta(
                seconds=policy.maximum_event_age_seconds):
            store.finish(batch, event, now, store.EXPIRED, error_type=type(exc).__name__,
                         error=exc.message)
            self._destination(batch, event, event.attempts, policy.on_failure, "EventAgeExceeded", None,
                              now)
            return
        store.finish(batch, event, now, store.RETRYING, next_at=now + timedelta(seconds=delay),
                     backoff=delay, error_type=type(exc).__name__, error=exc.message)

    def _refused(self, batch: Batch, event: Event, started: datetime, policy: Policy,
                 exc: ImpulsError) -> None:
        now = self.clock()
        store.record_attempt(batch, event, event.attempts, started, now, "refused", self.node,
                             type(exc).__name__, exc.message)
        store.finish(batch, event, now, store.FAILED, error_type=type(exc).__name__,
                     error=exc.message)
        self._destination(batch, event, event.attempts, policy.on_failure, "RetriesExhausted", None, now)

    def _end(self, batch: Batch, event: Event, now: datetime, policy: Policy, condition: str) -> None:
        """Too old to deliver: expired, and ``on_failure`` hears it."""
        store.finish(batch, event, now, store.EXPIRED)
        self._destination(batch, event, event.attempts, policy.on_failure, condition, None, now)

    def _destination(self, batch: Batch, event: Event, invocations: int, destination: str | None,
                     condition: str, result: InvocationResult | None, now: datetime) -> None:
        """Send Lambda's destination record to a function, or to the dead-letter list."""
        if destination is None:
            return
        record = destination_record(event, invocations, condition, result, now, self.settings.account_id)
        if destination == DEAD_LETTERS:
            store.add_dead_letter(batch, event, condition, record, now)
            return
        m = FUNCTION_ARN_RE.match(destination)
        if m is None:  # refused when the config was written; an old row, say
            log.warning("event %s: destination %s is not a function", event.request_id, destination)
            return
        batch.insert(events, store.event_values(m["name"], m["qualifier"] or "$LATEST",
                                                json.dumps(record).encode(), "destination", now))
        self.wake_soon()

    def wake_soon(self) -> None:
        """From a worker thread: have the claimer look now (a destination event was queued)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._claim_wake.set)

    # --- policies, kept until the registry announces a change ------------------------------

    def _changed_threadsafe(self, name: str, qualifier: str | None) -> None:
        if qualifier is not None and qualifier.startswith((URL_PREFIX, ALIAS_PREFIX)):
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._forget, name)

    def _forget(self, name: str) -> None:
        for key in [k for k in self._policies if k[0] == name]:
            del self._policies[key]
        self._gates.pop(name, None)

    async def _policy(self, name: str, qualifier: str) -> Policy:
        key = (name, qualifier)
        policy = self._policies.get(key)
        if policy is None:
            policy = self._policies[key] = await asyncio.to_thread(self._load_policy, name, qualifier)
        return policy

    def _load_policy(self, name: str, qualifier: str) -> Policy:
        try:
            config = self.registry.get_event_config(name, qualifier)
        except NotFound:
            return Policy(**{k: DEFAULTS[k] for k in ("maximum_retry_attempts", "maximum_event_age_seconds",
                                                      "on_success", "on_failure")})
        return Policy(config.maximum_retry_attempts, config.maximum_event_age_seconds,
                      config.on_success, config.on_failure)


def _system_outcome(exc: ImpulsError) -> str:
    return "throttled" if isinstance(exc, Throttled) else "not_started"


def destination_record(event: Event, invocations: int, condition: str, result: InvocationResult | None,
                       now: datetime, account: str) -> dict[str, Any]:
    """Lambda's destination record for an event's outcome."""
    qualifier = None if event.qualifier == "$LATEST" else event.qualifier
    record: dict[str, Any] = {
        "version": "1.0",
        "timestamp": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "requestContext": {
            "requestId": event.request_id,
            "functionArn": function_arn(event.function_name, qualifier or "$LATEST", account=account),
            "condition": condition,
            "approximateInvokeCount": invocations,
        },
        "requestPayload": _decoded(event.payload),
    }
    if result is not None:
        context: dict[str, Any] = {"statusCode": 200, "executedVersion": result.executed_version}
        if result.outcome is Outcome.SUCCESS:
            record["responsePayload"] = _decoded(result.payload)
        else:
            context["functionError"] = "Unhandled"
            record["responsePayload"] = {"errorMessage": result.error_message,
                                         "errorType": result.error_type, "stackTrace": result.stack}
        record["responseContext"] = context
    return record


def _decoded(payload: bytes) -> Any:
    try:
        return json.loads(payload) if payload else None
    except (ValueError, UnicodeDecodeError):
        return payload.decode("utf-8", "replace")
