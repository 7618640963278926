"""``--profile``: sample the Impuls server with py-spy during an extra warm run and group the samples.

py-spy (PyPI ``py-spy``, not a project dependency: install it yourself) is
attached with ``--nonblocking`` (the server is never paused) and ``--gil``
(only samples where a thread holds the GIL: CPU work, not idle waits, which
py-spy's idle detection misses on uvloop at some rates) while wrk drives
the Python no-op function at concurrency 1 for the row duration; this run
is not one of the measured rows. Each sample is charged to its innermost
Python frame ("self time"), so time spent in C (a socket ``write``, uvloop's
loop) lands on the Python line that called into it; the components below
are groups of such frames.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.loadgen import run_wrk

RATE_HZ = 1000
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?):\d+\)$")

# (component, test on (function, file)); the first match wins
COMPONENTS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("Runtime API: socket writes to the runtime (event, 202 Accepted)",
     lambda fn, f: f.endswith("impuls/sandbox/runtime_api.py") and fn.endswith(".write")),
    ("Runtime API: parsing the runtime's requests",
     lambda fn, f: f.endswith("impuls/sandbox/runtime_api.py")),
    ("reply to the client: uvicorn send and its socket write",
     lambda fn, f: f.startswith("uvicorn/") and fn.startswith("RequestResponseCycle.send")),
    ("uvicorn/httptools: request parsing, ASGI glue", lambda fn, f: f.startswith("uvicorn/")),
    ("event loop internals (uvloop C code: epoll, reads, callbacks)",
     lambda fn, f: f == "asyncio/runners.py"),
    ("FastAPI/Starlette: middleware (incl. its AsyncExitStack and OpenTelemetry hooks), routing, "
     "parameters, responses",
     lambda fn, f: f.startswith(("fastapi/", "starlette/", "anyio/", "pydantic", "contextlib.py", "_logs/",
                                 "trace/", "opentelemetry/"))),
    ("Impuls API endpoint: body read, JSON check", lambda fn, f: f.startswith("impuls/api/")),
    ("invocation records: asdict copies, batched SQLite inserts (thread)",
     lambda fn, f: f.startswith(("sqlalchemy/", "copy.py", "dataclasses.py", "threading.py",
                                 "concurrent/futures/", "queue.py", "impuls/engine/records.py"))),
    ("engine: invoke, pool, instance (incl. asyncio.wait, uuid4), reply envelope",
     lambda fn, f: f.startswith(("impuls/engine/", "impuls/sandbox/", "uuid.py", "asyncio/tasks.py"))),
    ("JSON encode/decode", lambda fn, f: f.startswith("json/")),
]
OTHER = "other"


def py_spy() -> str | None:
    return shutil.which("py-spy") or next(
        (str(p) for p in [Path(sys.executable).parent / "py-spy"] if p.exists()), None)


def classify(raw: str) -> tuple[list[tuple[str, float]], int]:
    """Group py-spy raw (collapsed) stacks by their innermost frame; (component, share) and total."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        match = _FRAME.match(stack.split(";")[-1].strip())
        func, file = (match["func"], match["file"]) if match else ("", "")
        name = next((c for c, test in COMPONENTS if test(func, file)), OTHER)
        counts[name] += int(n)
    if not total:
        return [], 0
    return [(name, n / total) for name, n in counts.most_common()], total


def profile_server(pid: int, url: str, script: Path, seconds: int) -> tuple[list[tuple[str, float]], str]:
    tool = py_spy()
    if tool is None:
        return [], "not run: py-spy is not installed (.venv/bin/pip install py-spy)"
    with tempfile.TemporaryDirectory(prefix="impuls-bench-prof-") as tmp:
        out = Path(tmp) / "stacks.txt"
        spy = subprocess.Popen([tool, "record", "--pid", str(pid), "--duration", str(seconds + 1),
                                "--rate", str(RATE_HZ), "--nonblocking", "--gil", "--format", "raw",
                                "--output", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        result = run_wrk(url, script, 1, seconds)
        try:
            _, err = spy.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        if not out.exists():
            return [], f"not run: py-spy failed: {err.strip()[-300:]}"
        shares, total = classify(out.read_text())
    version = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return shares, (f"{version}, {total:,} samples at {RATE_HZ} Hz during an extra {seconds} s Python run at "
                    f"concurrency 1 ({result.rps:,.0f} inv/s, p50 {result.p50_ms:.3f} ms while sampled); "
                    "only samples where a server thread held the GIL, i.e. CPU spent for Python, not idle "
                    "waits; self time by innermost Python frame, C code charged to its caller")
