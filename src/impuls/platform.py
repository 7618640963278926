"""Wires the parts together: store, registry, sandbox drivers and the engine.

One :class:`Platform` per server process.  The constructor prepares what
must exist before the first request (database migrated, blobs checked,
drivers chosen); :meth:`start` and :meth:`stop` run inside the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import socket
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine as DBEngine

from impuls import __version__
from impuls.auth.keys import KeyStore, load_server_secret
from impuls.auth.links import CodeLinks
from impuls.cluster import Member
from impuls.cluster.nodes import NodeBeat
from impuls.config import Settings
from impuls.engine.invoker import Invoker
from impuls.engine.record_writer import RecordWriterProcess
from impuls.engine.records import InvocationRecorder, LogHub
from impuls.engine.results import InvocationResult
from impuls.errors import Throttled
from impuls.events.dispatcher import Dispatcher
from impuls.events.scheduler import Scheduler
from impuls.functions.builds import CountedPackageBuilder
from impuls.functions.models import DEFAULT_REGION
from impuls.functions.registry import FunctionRegistry
from impuls.metrics import Metrics
from impuls.runtimes import RuntimeRegistry, default_registry
from impuls.sandbox import make_driver
from impuls.sandbox.process import ProcessDriver
from impuls.store.blobs import BlobStore, SharedBlobStore
from impuls.store.db import open_engine
from impuls.store.package_archives import PackageArchives
from impuls.tracing import Tracer
from impuls.tracing import start as start_tracing

log = logging.getLogger("impuls")
#: How long a thread may keep the GIL while another waits for it (CPython's default: 5 ms).
#: The server's worker threads (the /tmp disk makers, cgroup moves, store reads) run Python
#: code now and then; at the default the event loop waits up to 5 ms for
#: each such slice, which shows as the warm calls' tail.
GIL_SWITCH_INTERVAL = 0.0005


def node_id(settings: Settings) -> str:
    """This server's name among the nodes sharing a store: the host and its data directory
    (the same after a restart, so it takes back the events it had leased)."""
    digest = hashlib.sha256(str(settings.data_dir.resolve()).encode()).hexdigest()[:10]
    return f"{socket.gethostname()}:{digest}"


class MeteredInvoker(Invoker):
    """The engine, with the one count the invocation records cannot give the metrics: calls
    refused as throttled (reserved concurrency 0, a full or timed-out wait queue) never reach
    an instance, so no record is made.  Every door's 429 and every throttled asynchronous
    delivery passes here."""

    on_throttled: Callable[[str], None] = staticmethod(lambda name: None)

    async def invoke(self, name: str, *args: Any, **kwargs: Any) -> InvocationResult:
        try:
            return await super().invoke(name, *args, **kwargs)
        except Throttled:
            self.on_throttled(name)
            raise


class Platform:
    def __init__(self, settings: Settings, runtimes: RuntimeRegistry | None = None) -> None:
        self.settings = settings
        #: this node's name among those sharing the store
        self.node = node_id(settings)
        self.started_at = datetime.now(UTC)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db: DBEngine = open_engine(settings.db_url)
        #: other nodes may share the store (PostgreSQL): code blobs and changes go through it
        self.shared = settings.store_kind == "postgresql"
        blob_dir = settings.data_dir / "blobs"
        self.blobs = SharedBlobStore(blob_dir, self.db) if self.shared else BlobStore(blob_dir)
        self.metrics = Metrics()
        archives = PackageArchives(self.db) if self.shared else None
        packages = CountedPackageBuilder(settings.data_dir / "packages", settings.data_dir / "build-cache",
                                         self.metrics.built, archives)
        self.registry = FunctionRegistry(self.db, self.blobs, runtimes or default_registry(), packages,
                                         max_reserved_concurrency=settings.max_concurrency,
                                         min_event_age=settings.event_min_age_seconds)
        self.keys = KeyStore(self.db, load_server_secret(settings.data_dir, settings.server_secret),
                             settings.admin_key)
        self.code_links = CodeLinks(self.keys.mac)
        removed = self.registry.collect_garbage()
        if removed:
            log.info("removed %d unreferenced code blobs", removed)
        self.driver = make_driver(settings, self.registry.runtimes)
        local = None
        if settings.allow_local:
            local = self.driver if isinstance(self.driver, ProcessDriver) else ProcessDriver(
                settings.data_dir / "sandbox" / "process")
        #: spans, exported over OTLP (None: IMPULS_OTLP_ENDPOINT is not set, no tracing at all)
        self.tracer: Tracer | None = start_tracing(settings, self.node, self.driver.name)
        self.hub = LogHub()
        #: writes the invocation records from a process of its own (off the event loop's GIL)
        self.record_writer = RecordWriterProcess(self.db.url.render_as_string(hide_password=False))
        self.recorder = InvocationRecorder(
            self.db, timedelta(days=settings.invocation_retention_days), writer=self.record_writer)
        self.recorder.listen(self.metrics.record)
        self.invoker = MeteredInvoker(settings, self.registry, self.driver, local, self.recorder, self.hub,
                                      tracer=self.tracer)
        self.invoker.on_throttled = self.metrics.throttled
        self.events = Dispatcher(self.registry, self.invoker, settings, self.node, tracer=self.tracer)
        self.scheduler = Scheduler(self.db, self.node, settings.account_id, DEFAULT_REGION)
        self.scheduler.on_fired = self.events.wake
        self.member = Member(self.db, self.registry, self.node, self._beat, self.shared,
                             settings.heartbeat_seconds)
        self.metrics.watch(self.invoker, self.events, self.db, {
            "version": __version__, "sandbox": self.driver.name, "store": settings.store_kind})
        self.registry.on_change(self.metrics.function_changed)

    @property
    def admin_key_file(self) -> Path:
        return self.settings.data_dir / "admin-key"

    async def start(self) -> None:
        await self.invoker.start()
        await self.member.start()  # the change feed, before anything is cached
        await self.events.start()
        await self.scheduler.start()
        resumed = self.registry.resume_builds()  # after the engine listens: it hears their end
        if resumed:
            log.info("resumed %d background builds left unfinished", resumed)
        if self.driver.unsafe:
            log.warning("sandbox 'process' runs functions as host processes: "
                        "UNSAFE for untrusted code, development only")
        if self.settings.allow_local:
            log.warning("local=true is allowed: callers may run code unsandboxed (unsafe)")
        # Everything made so far (modules, the app, the drivers) lives as long as the server:
        # out of the collector's sight, a full collection scans only what calls create (a
        # full collection of the whole heap stalls the event loop for tens of milliseconds).
        gc.collect()
        gc.freeze()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)

    async def stop(self) -> None:
        await self.scheduler.close()
        await self.events.close()
        self.registry.close()
        await self.invoker.close()
        await self.member.close()
        if self.tracer is not None:  # the spans of the last calls, before the server exits
            await asyncio.to_thread(self.tracer.shutdown)

    def _beat(self) -> NodeBeat:
        """This node's heartbeat (called on the event loop's thread)."""
        engine = self.invoker.stats()
        stats = {"instances": engine["instances"], "inflight": engine["inflight"], "queued": engine["queued"],
                 "events_held": self.events.held, **self.member.stats()}
        return NodeBeat(self.node, self.settings.address, __version__, self.driver.name, self.started_at,
                        stats)

    def describe(self) -> dict[str, Any]:
        """What /health and the start-up line report."""
        return {"store": self.settings.store_kind, **self.driver.describe(),
                "runtimes": [rt.id for rt in self.registry.runtimes.available()]}

    def health(self) -> dict[str, Any]:
        return {**self.describe(), "engine": self.invoker.stats()}

    def store_description(self) -> str:
        url = self.db.url
        if url.get_backend_name() == "sqlite":
            return f"sqlite at {url.database}"
        return f"{url.get_backend_name()} at {url.render_as_string(hide_password=True)}"

    def close(self) -> None:
        self.db.dispose()
