"""Wires the parts together: store, registry and (later) the engine.

One :class:`Platform` per server process.  ``open`` prepares everything that
must exist before the first request; ``close`` releases it.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Engine

from impuls.config import Settings
from impuls.registry import FunctionRegistry
from impuls.runtimes import RuntimeRegistry, default_registry
from impuls.store.blobs import BlobStore
from impuls.store.db import open_engine

log = logging.getLogger("impuls")


class Platform:
    def __init__(self, settings: Settings, runtimes: RuntimeRegistry | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db: Engine = open_engine(settings.db_url)
        self.blobs = BlobStore(settings.data_dir / "blobs")
        self.registry = FunctionRegistry(self.db, self.blobs, runtimes or default_registry())
        removed = self.registry.collect_garbage()
        if removed:
            log.info("removed %d unreferenced code blobs", removed)

    def describe(self) -> dict[str, Any]:
        """What /health and the start-up line report."""
        return {"store": self.settings.store_kind}

    def store_description(self) -> str:
        url = self.db.url
        if url.get_backend_name() == "sqlite":
            return f"sqlite at {url.database}"
        return f"{url.get_backend_name()} at {url.render_as_string(hide_password=True)}"

    def close(self) -> None:
        self.db.dispose()
