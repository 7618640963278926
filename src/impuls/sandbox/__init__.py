"""Sandbox drivers behind one interface (:mod:`impuls.sandbox.base`), and choosing one."""

from __future__ import annotations

import logging
from pathlib import Path

from impuls.errors import ConfigError
from impuls.sandbox.base import SandboxDriver
from impuls.sandbox.process import ProcessDriver

log = logging.getLogger("impuls.sandbox")


def make_driver(kind: str, work_dir: Path) -> SandboxDriver:
    """The driver for ``kind`` (``auto`` picks the strongest this host supports)."""
    if kind in ("auto", "process"):
        if kind == "auto":
            log.warning("no isolating sandbox is available on this host; using 'process'")
        return ProcessDriver(work_dir / "process")
    raise ConfigError(f"sandbox {kind!r} is not available on this host")
