"""The load generator: ``wrk`` (Debian package ``wrk``) driven by a Lua script that POSTs the event.

Why wrk: the machine has 2 cores shared by the load generator and the server
under test, so the client must cost little CPU per request. wrk is a C
epoll loop (one thread here) that keeps ``concurrency`` keep-alive
connections each with one request outstanding (a closed loop), and records
every latency in microseconds. Its Lua ``done`` hook prints the summary as
one JSON line, which :func:`run_wrk` parses. Every row uses the same
binary, thread count, script and event, and a fixed duration after which
wrk stops by itself.

Also here: a tiny keep-alive client (``http.client``) for single calls
(checks, cold starts, pre-warming), where a per-call latency is wanted.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import resource
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MARK = "BENCH-JSON "
WRK_THREADS = 1
#: the admin key of every Impuls server the harness starts (IMPULS_ADMIN_KEY); every request
#: carries it, so Impuls' numbers include checking it (the baselines ignore it)
API_KEY = "impuls-bench-" + secrets.token_hex(16)
AUTH_HEADERS = {"Authorization": f"Bearer {API_KEY}"}

_LUA = """
wrk.method = "POST"
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
%(headers)s

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests":%%d,"duration_us":%%d,"bytes":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,' ..
    '"max_us":%%d,"mean_us":%%f,"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d}\\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


class LoadGenError(RuntimeError):
    pass


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    non_2xx: int
    client_cpu_s: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    path = wrk_path()
    if path is None:
        return "not installed"
    out = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10, check=False)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].split(" Copyright")[0].strip() if first else "wrk"


def lua_script(body: bytes, directory: Path, headers: dict[str, str] | None = None,
               name: str = "post.lua") -> Path:
    """Write the POST script for ``body`` into ``directory``; every request carries ``headers``
    (default: the harness's API key)."""
    path = directory / name
    lines = "\n".join(f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}"
                      for k, v in (AUTH_HEADERS if headers is None else headers).items())
    path.write_text(_LUA % {"body": _lua_string(body.decode()), "mark": MARK, "headers": lines})
    return path


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def run_wrk(url: str, script: Path, concurrency: int, seconds: int, timeout_s: int = 10) -> WrkResult:
    """One fixed-duration wrk run against ``url`` (must be 127.0.0.1)."""
    if urlsplit(url).hostname != "127.0.0.1":
        raise LoadGenError(f"refusing to load anything but 127.0.0.1: {url}")
    path = wrk_path()
    if path is None:
        raise LoadGenError("wrk is not installed (apt-get install wrk; scripts/setup installs it)")
    argv = [path, "-t", str(WRK_THREADS), "-c", str(concurrency), "-d", f"{seconds}s",
            "--timeout", f"{timeout_s}s", "-s", str(script), url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + timeout_s + 30,
                             check=False)
    except subprocess.TimeoutExpired as exc:
        raise LoadGenError(f"wrk did not stop: {' '.join(argv)}") from exc
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in out.stdout.splitlines() if x.startswith(MARK)), None)
    if out.returncode != 0 or line is None:
        raise LoadGenError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    doc = json.loads(line[len(MARK):])
    errors = doc["connect"] + doc["read"] + doc["write"] + doc["timeout"]
    return WrkResult(
        requests=doc["requests"], duration_s=doc["duration_us"] / 1e6,
        p50_ms=doc["p50_us"] / 1000, p90_ms=doc["p90_us"] / 1000, p99_ms=doc["p99_us"] / 1000,
        max_ms=doc["max_us"] / 1000, errors=errors, non_2xx=doc["status"],
        client_cpu_s=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    )


class Client:
    """A keep-alive HTTP/1.1 client to one 127.0.0.1 server (not thread-safe: one per thread)."""

    def __init__(self, base_url: str, timeout: float = 60.0) -> None:
        parts = urlsplit(base_url)
        if parts.hostname != "127.0.0.1":
            raise LoadGenError(f"refusing to talk to anything but 127.0.0.1: {base_url}")
        self.host, self.port, self.timeout = parts.hostname, parts.port or 80, timeout
        self.conn: http.client.HTTPConnection | None = None

    def connect(self) -> None:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.conn.connect()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any, float]:
        """(status, decoded JSON or text, seconds) for one request; reconnects once if dropped.
        ``headers`` replace the harness's API key."""
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            headers = AUTH_HEADERS if headers is None else headers
            if body is not None:
                headers = {**headers, "Content-Type": "application/json"}
            t0 = time.perf_counter()
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                raw = resp.read()
            except (http.client.HTTPException, ConnectionError):
                self.close()
                if attempt:
                    raise
                continue
            elapsed = time.perf_counter() - t0
            try:
                data: Any = json.loads(raw) if raw else None
            except ValueError:
                data = raw.decode("utf-8", "replace")
            return resp.status, data, elapsed
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def burst(base_url: str, path: str, body: bytes, concurrency: int,
          timeout: float = 60.0) -> list[tuple[int, Any, float]]:
    """``concurrency`` simultaneous POSTs (one connection each); their results."""
    barrier = threading.Barrier(concurrency, timeout=timeout)

    def one(_: int) -> tuple[int, Any, float]:
        """(status, reply, seconds); status 0 when the call failed (the reply is then the error)."""
        client = Client(base_url, timeout)
        t0 = time.perf_counter()
        try:
            client.connect()
            barrier.wait()  # every connection is open: the requests leave together
            t0 = time.perf_counter()
            return client.request("POST", path, body)
        except (OSError, http.client.HTTPException, threading.BrokenBarrierError) as exc:
            return 0, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(concurrency)))


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="impuls-bench-")
