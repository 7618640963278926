"""The ``impuls images build|ls`` commands' work; ``impuls.cli`` only parses options.

``build`` prints one plain line per step (with elapsed time), so that CI logs
and terminals both read well; ``ls`` prints a table with sizes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from impuls.config import Settings
from impuls.errors import ConfigError
from impuls.images.builder import Builder, BuildReport, ImageBuildFailed
from impuls.sandbox.microvm.images import ImageStore
from impuls.sandbox.microvm.qemu import choose_accel, qemu_binary


def build(console: Console, settings: Settings, runtimes: Sequence[str] = (), force: bool = False,
          probe: bool = True) -> BuildReport:
    """Build (or confirm up to date) every image in ``settings.images_path``; then settle
    the acceleration verdict.

    Raises ImageBuildFailed with a message meant for the user.
    """
    root = settings.images_path
    store = ImageStore(root)
    started = time.monotonic()

    def progress(line: str) -> None:
        console.print(f"[dim]{time.monotonic() - started:6.1f}s[/dim] {line}", highlight=False)

    console.print(f"building microVM guest images in {root}", highlight=False)
    report = Builder(store, progress, settings.images_mirror or None).build(list(runtimes) or None,
                                                                           force=force)
    if probe and qemu_binary() is not None:
        try:
            choice = choose_accel(store, settings.microvm_accel)
        except ConfigError as exc:
            raise ImageBuildFailed(exc.message) from exc
        progress(f"acceleration: {choice.accel} ({choice.reason})")
    summary = f"built {', '.join(report.built)}" if report.built else "nothing to do, everything up to date"
    console.print(f"done in {report.seconds:.1f} s: {summary}", highlight=False)
    return report


def listing(console: Console, root: Path) -> int:
    """Print what is built; returns the number of missing required images."""
    store = ImageStore(root)
    table = Table(title=f"guest images in {root}", title_justify="left")
    table.add_column("image")
    table.add_column("size", justify="right")
    table.add_column("details")
    table.add_column("path")
    for name, path, size, desc in store.listing():
        table.add_row(name, f"{size / 2**20:.1f} MB" if size else "-", desc, str(path))
    console.print(table)
    missing = store.missing()
    if missing:
        console.print(f"missing: {', '.join(missing)} — run `impuls images build`", highlight=False)
    return len(missing)
