"""Operators' metrics, in Prometheus' text exposition format (``GET /metrics``).

Layer: wiring, beside :mod:`impuls.platform` (which makes one :class:`Metrics` per server, with
a registry of its own: never prometheus_client's global one, so tests and several servers in
one process do not collide).  It reads the engine and the event store; nothing below the doors
imports it, and the layers below know it only as plain callbacks.

Fed three ways:

* per invocation, from the invocation records (a listener of
  :class:`~impuls.engine.records.InvocationRecorder`): counts by outcome, durations, cold
  starts.  This is the hot path: two dict look-ups, a counter increment and a histogram
  observe per call (:meth:`Metrics.record`);
* by small hooks where no record is made: calls refused as throttled (the platform's invoker),
  package builds (:mod:`impuls.functions.builds`), HTTP requests (the middleware in
  :mod:`impuls.api.metrics`);
* at scrape time (:meth:`Metrics.exposition`): instances by state and sandbox, calls in
  flight and waiting, the asynchronous queue and the dead letters (a query of the store,
  off the event loop).

Every label is bounded: function names (deployed functions only: a series is made by a
record, a throttle or a dead letter, which an unknown name never produces, and dropped when
its function is deleted), outcomes, sandboxes, route templates, HTTP statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from impuls.engine.records import InvocationRecord
from impuls.errors import StorageFull, StoreUnavailable
from impuls.events import store

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from impuls.engine.invoker import Invoker
    from impuls.events.dispatcher import Dispatcher

log = logging.getLogger("impuls.metrics")

#: what the server answers ``/metrics`` with (Prometheus' text format 0.0.4)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: invocation durations: a warm call of a trivial handler takes well under a millisecond
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
#: cold starts: from a forked template (milliseconds) to a booted microVM (seconds)
COLD_START_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                      30.0, 60.0)
INSTANCE_STATES = ("busy", "idle")
BUILD_RESULTS = ("success", "failure")


class _FunctionSeries:
    """One function's children of the per-function metrics, looked up once per call."""

    __slots__ = ("cold", "cold_duration", "duration", "name", "outcomes", "throttles")

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.name = name
        self.outcomes: dict[str, Counter] = {}
        self.duration = metrics.duration.labels(name)
        self.cold = metrics.cold_starts.labels(name)
        self.cold_duration = metrics.cold_duration.labels(name)
        self.throttles: Counter | None = None


class Metrics:
    """The registry and its metrics (see the module doc); :meth:`watch` adds what is read at
    scrape time."""

    def __init__(self) -> None:
        # no ``*_created`` series beside every counter and histogram (a switch of the process's
        # prometheus_client, the same for every server in it): they would double the output
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        r = self.registry
        self.invocations = Counter(
            "impuls_invocations_total", "Invocations that ran (reached the engine's pools), by outcome: "
            "success, error, init_error, timeout, oom, crash", ["function", "outcome"], registry=r)
        self.duration = Histogram(
            "impuls_invocation_duration_seconds", "Duration of invocations as the engine measured "
            "them (instance start included on a cold start)", ["function"], registry=r,
            buckets=DURATION_BUCKETS)
        self.cold_starts = Counter(
            "impuls_cold_starts_total", "Invocations that started an instance (or replayed a failed "
            "init)", ["function"], registry=r)
        self.cold_duration = Histogram(
            "impuls_cold_start_duration_seconds", "Duration of the invocations that started an "
            "instance: the instance's init and the call", ["function"], registry=r,
            buckets=COLD_START_BUCKETS)
        self.throttles = Counter(
            "impuls_throttles_total", "Invocations refused as throttled (HTTP 429; asynchronous "
            "deliveries retried later)", ["function"], registry=r)
        self.builds = Counter(
            "impuls_builds_total", "Package builds (unpacking and the runtime's build step) by "
            "result", ["result"], registry=r)
        self.http_requests = Counter(
            "impuls_http_requests_total", "HTTP requests answered, by route template and status",
            ["route", "status"], registry=r)
        for result in BUILD_RESULTS:
            self.builds.labels(result)
        self._functions: dict[str, _FunctionSeries] = {}
        self._http: dict[tuple[str, int], Counter] = {}
        self._lock = threading.Lock()  # making and dropping series: the loop and registry threads
        self._scrape: _Scraped | None = None
        self._scrape_lock: asyncio.Lock | None = None

    # --- fed per invocation and by hooks (cheap: any thread) ------------------------------

    def _series(self, name: str) -> _FunctionSeries:
        series = self._functions.get(name)
        if series is None:
            with self._lock:
                series = self._functions.get(name)
                if series is None:
                    series = self._functions[name] = _FunctionSeries(self, name)
        return series

    def record(self, record: InvocationRecord) -> None:
        """An invocation ended (an :class:`~impuls.engine.records.InvocationRecorder` listener)."""
        series = self._functions.get(record.function_name) or self._series(record.function_name)
        counter = series.outcomes.get(record.outcome)
        if counter is None:
            counter = series.outcomes[record.outcome] = self.invocations.labels(
                record.function_name, record.outcome)
        counter.inc()
        seconds = record.duration_ms / 1000.0
        series.duration.observe(seconds)
        if record.cold_start:
            series.cold.inc()
            series.cold_duration.observe(seconds)

    def throttled(self, function: str) -> None:
        """A call of ``function`` was refused as throttled (no record is made for it)."""
        series = self._series(function)
        if series.throttles is None:
            series.throttles = self.throttles.labels(function)
        series.throttles.inc()

    def built(self, result: str) -> None:
        """A package build ended: ``success`` or ``failure`` (called from build threads)."""
        self.builds.labels(result).inc()

    def http_request(self, route: str, status: int) -> None:
        """An HTTP request was answered (``route``: a bounded template, never a raw path)."""
        key = (route, status)
        counter = self._http.get(key)
        if counter is None:
            counter = self._http[key] = self.http_requests.labels(route, str(status))
        counter.inc()

    def function_changed(self, name: str, qualifier: str | None) -> None:
        """A registry listener: a deleted function's series go (its name may come back as a
        new function, whose counts start at 0)."""
        if qualifier is not None:
            return
        with self._lock:
            series = self._functions.pop(name, None)
        if series is None:
            return
        for outcome in list(series.outcomes):
            _remove(self.invocations, name, outcome)
        for metric in (self.duration, self.cold_starts, self.cold_duration, self.throttles):
            _remove(metric, name)

    # --- read at scrape time ------------------------------------------------------------

    def watch(self, invoker: Invoker, dispatcher: Dispatcher, db: Engine, info: dict[str, str]) -> None:
        """Collect the engine's instances and the store's queue at every scrape; ``info``: facts
        about the server (``impuls_server_info``'s labels)."""
        Gauge("impuls_server_info", "Facts about this server (always 1)", list(info),
              registry=self.registry).labels(**info).set(1)
        self._scrape = _Scraped(invoker, dispatcher, db)
        self.registry.register(self._scrape)

    async def exposition(self) -> bytes:
        """The text exposition: the engine is read on the loop (where it lives), the store and
        the formatting in a worker thread."""
        if self._scrape_lock is None:
            self._scrape_lock = asyncio.Lock()
        async with self._scrape_lock:
            if self._scrape is not None:
                self._scrape.engine = self._scrape.read_engine()
            return await asyncio.to_thread(self._render)

    def _render(self) -> bytes:
        if self._scrape is not None:
            try:
                self._scrape.queue = store.queue_summary(self._scrape.db)
            except (StoreUnavailable, StorageFull):  # the rest still counts (records pending, ...)
                self._scrape.queue = None
        return generate_latest(self.registry)


def _remove(metric: Counter | Histogram, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never made, or already gone
        metric.remove(*labels)


class _Scraped(Collector):
    """The gauges read at scrape time, from snapshots :meth:`Metrics.exposition` takes."""

    def __init__(self, invoker: Invoker, dispatcher: Dispatcher, db: Engine) -> None:
        self.invoker = invoker
        self.dispatcher = dispatcher
        self.db = db
        self.engine: _EngineSnapshot | None = None
        self.queue: store.QueueSummary | None = None

    def read_engine(self) -> _EngineSnapshot:
        """Instances by (sandbox, state), from the pools (on the event loop)."""
        instances: dict[tuple[str, str], int] = {}
        for driver in (self.invoker.driver, self.invoker.local_driver):
            if driver is not None:
                for state in INSTANCE_STATES:
                    instances[(driver.name, state)] = 0
        for pool in list(self.invoker._pools.values()):
            idle = len(pool.idle)
            name = pool.driver.name
            instances[(name, "busy")] = instances.get((name, "busy"), 0) + pool.size - idle
            instances[(name, "idle")] = instances.get((name, "idle"), 0) + idle
        stats = self.invoker.stats()
        recorder = self.invoker.recorder
        return _EngineSnapshot(instances, stats["inflight"], stats["queued"], self.dispatcher.duplicates,
                               (recorder.pending, recorder.dropped, recorder.rejected))

    def describe(self) -> Iterable[Metric]:
        return self._families(None, None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self.engine, self.queue)

    @staticmethod
    def _families(engine: _EngineSnapshot | None, queue: store.QueueSummary | None) -> list[Metric]:
        instances = GaugeMetricFamily("impuls_instances", "Live instances by sandbox and state (busy: "
                                      "serving a call or starting; idle: warm)", labels=["sandbox", "state"])
        inflight = GaugeMetricFamily("impuls_invocations_in_flight", "Invocations running now")
        waiting = GaugeMetricFamily("impuls_invocations_waiting", "Calls waiting in a function's queue "
                                    "for an instance")
        duplicates = CounterMetricFamily(
            "impuls_async_duplicate_deliveries", "Asynchronous deliveries this node took back at start "
            "after they were cut short (delivered again: possible duplicates)")
        depth = GaugeMetricFamily("impuls_async_queue_depth", "Asynchronous events not finished, by "
                                  "state (the store's, shared by every node)", labels=["state"])
        oldest = GaugeMetricFamily("impuls_async_queue_oldest_age_seconds", "Age of the oldest "
                                   "asynchronous event not finished (0: none)")
        dead = GaugeMetricFamily("impuls_async_dead_letters", "Dead letters kept, by function",
                                 labels=["function"])
        records_pending = GaugeMetricFamily("impuls_records_pending", "Invocation records waiting to be "
                                            "written to the store (more while it is unavailable)")
        records_dropped = CounterMetricFamily("impuls_records_dropped", "Invocation records dropped "
                                              "because too many waited for an unavailable store")
        records_rejected = CounterMetricFamily("impuls_records_rejected", "Invocation records the store "
                                               "refused")
        if engine is not None:
            for (sandbox, state), count in sorted(engine.instances.items()):
                instances.add_metric([sandbox, state], count)
            inflight.add_metric([], engine.inflight)
            waiting.add_metric([], engine.waiting)
            duplicates.add_metric([], engine.duplicates)
            pending, dropped, rejected = engine.records
            records_pending.add_metric([], pending)
            records_dropped.add_metric([], dropped)
            records_rejected.add_metric([], rejected)
        if queue is not None:
            for state in store.PENDING_STATES:
                depth.add_metric([state], queue.pending.get(state, 0))
            age = 0.0
            if queue.oldest is not None:
                age = max(0.0, (datetime.now(UTC) - queue.oldest).total_seconds())
            oldest.add_metric([], age)
            for function, count in sorted(queue.dead_letters.items()):
                dead.add_metric([function], count)
        return [instances, inflight, waiting, duplicates, depth, oldest, dead, records_pending,
                records_dropped, records_rejected]


class _EngineSnapshot:
    __slots__ = ("duplicates", "inflight", "instances", "records", "waiting")

    def __init__(self, instances: dict[tuple[str, str], int], inflight: int, waiting: int,
                 duplicates: int, records: tuple[int, int, int]) -> None:
        #: invocation records: pending, dropped, rejected
        self.records = records
        self.instances = instances
        self.inflight = inflight
        self.waiting = waiting
        self.duplicates = duplicates
