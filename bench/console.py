"""The console row: the first contentful paint of the web console's function list with 1,000
functions in the registry, each with calls in the last hour (so every row has its counts,
percentiles and sparkline), measured by Debian's Chromium driven through Playwright.

The registry and the invocation records are written straight into a fresh data directory
before the server starts (fast); the server then serves them like any other.  The first
load warms the browser's cache (stylesheet, script); the row is the median of the loads
after it.  :func:`seed` is also what the console's browser test uses for its 1,000 functions.
"""

from __future__ import annotations

import statistics
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.loadgen import API_KEY
from bench.results import ConsoleRow, percentile
from bench.servers import ImpulsServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FUNCTIONS = 1000
CALLS_PER_FUNCTION = 30
HANDLER = 'def handler(event, context):\n    return {"message": "Hello"}\n'

#: the page's first contentful paint, in ms since its navigation started (waiting for it if needed)
FIRST_PAINT_JS = """() => new Promise((resolve) => {
  const found = performance.getEntriesByName("first-contentful-paint")[0];
  if (found) { resolve(found.startTime); return; }
  new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) {
      if (entry.name === "first-contentful-paint") resolve(entry.startTime);
    }
  }).observe({type: "paint", buffered: true});
})"""


def unavailable() -> str | None:
    """Why the row cannot be measured here, or None."""
    if not CHROMIUM.is_file():
        return "Chromium is not installed (scripts/setup installs the Debian package chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[dev]')"
    return None


def seed(data_dir: Path, functions: int = FUNCTIONS, calls: int = CALLS_PER_FUNCTION) -> None:
    """Create ``functions`` Python functions (``fn-0000`` ...) in a new data directory, each with
    ``calls`` invocation records spread over the last hour (one in ten an error, the first a cold
    start)."""
    from sqlalchemy import insert

    from impuls.functions.packages import PackageBuilder
    from impuls.functions.registry import FunctionRegistry
    from impuls.runtimes import default_registry
    from impuls.store.blobs import BlobStore
    from impuls.store.db import open_engine
    from impuls.store.schema import invocations

    db = open_engine(f"sqlite:///{(data_dir / 'impuls.db').resolve()}")
    registry = FunctionRegistry(db, BlobStore(data_dir / "blobs"), default_registry(),
                                PackageBuilder(data_dir / "packages", data_dir / "build-cache"))
    now = datetime.now(UTC)
    rows = []
    for i in range(functions):
        fn = registry.create({"name": f"fn-{i:04d}", "runtime": "python3.11", "handler": "handler.handler",
                              "code": HANDLER})
        rows += [{"request_id": str(uuid.uuid4()), "function_name": fn.name, "function_id": fn.id,
                  "started_at": now - timedelta(seconds=j * 113 % 3500), "duration_ms": 0.4 + (j * 7) % 40,
                  "outcome": "error" if j % 10 == 0 else "success", "error_type": None,
                  "cold_start": j == 0, "sandbox": "namespace", "logs": "", "logs_truncated": False,
                  "note": ""} for j in range(calls)]
    with db.begin() as conn:
        conn.execute(insert(invocations), rows)
    registry.close()
    db.dispose()


def first_paints(base_url: str, key: str, loads: int, profile_dir: Path) -> list[float]:
    """Sign in to the console at ``base_url`` with ``key``, load the function list once to warm
    the cache, then ``loads`` times more: each load's first contentful paint (ms)."""
    from playwright.sync_api import sync_playwright

    url = f"{base_url}/console/functions"
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile_dir, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.goto(f"{base_url}/console/login")
            page.fill("#key", key)
            page.click("#login-form button[type=submit]")
            page.wait_for_url(url)
            samples = []
            for _ in range(loads + 1):
                page.goto(url, wait_until="load")
                samples.append(float(page.evaluate(FIRST_PAINT_JS)))
            return samples[1:]
        finally:
            context.close()


def measure(sandbox: str, work: Path, loads: int) -> ConsoleRow:
    data = work / "data-console"
    data.mkdir(parents=True)
    seed(data)
    server = ImpulsServer(sandbox, data, work / "impuls-console.log")
    server.start()
    try:
        samples = first_paints(server.url, API_KEY, loads, work / "chromium-profile")
    finally:
        server.stop()
    return ConsoleRow(FUNCTIONS, len(samples), statistics.median(samples), percentile(samples, 99))
