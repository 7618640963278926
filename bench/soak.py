"""The soak: a fixed number of mixed calls against one Impuls server (namespace sandbox) while a
chaos loop kills its instances and, once, the server itself; every answer is checked against
docs/api.md and docs/reliability.md.

    .venv/bin/python -m bench.soak [--calls 1000000] [--concurrency 64] [--postgres ADMIN_URL]
                                   [--seed N] [--work DIR]

Traffic (``concurrency`` calls outstanding, loopback only): functions that return, raise,
time out, exit or SIGKILL their runtime, return more than 6 MB, fill ``/tmp`` until
``ENOSPC``, are throttled (reserved concurrency 0, or 1 with a short queue); asynchronous
events (``?async=true``); function URL requests; and, every couple of seconds, a code update,
a configuration update or a new function.  Chaos meanwhile: SIGKILL of a random instance's
sandbox (its pid 1) or runtime -- a version template among them, which ends every instance
forked from it (docs/init-once.md) -- and once, halfway, SIGKILL of the server and a start on the same
data directory, store and port.

Verdicts (any failing one makes the exit status 1):

- every synchronous call got the documented answer for its function's behaviour (docs/api.md,
  *Invoking*, *Function URLs*); a call that overlapped the SIGKILL of an instance may instead
  get the documented answer for a runtime that died (502 ``Runtime.ExitError`` or
  ``Sandbox.StartFailed``; a function URL's 502), and so may one that started within
  ``NOTICE_S`` after the kill (the server had not seen the idle instance die yet); a call in
  flight when the server was killed gets no answer (docs/reliability.md).  These are counted
  by kind, apart from the rest;
- a call that got 502 ``Sandbox.StartFailed`` with no kill to explain it (no sandbox could be
  started: the platform's fault, e.g. an overloaded host) is counted; over
  ``START_FAILED_SHARE`` of the calls fails; answers put down to kills outnumbering the
  instances the kills ended fail too;
- no hang: calls answered after their function's timeout plus the queue timeout plus one
  second are counted and shown (a cold call also waits for its instance's start); one past
  that by more than ``LOAD_SLACK_S`` (the init limit), or never answered, is a hang;
- every accepted asynchronous event succeeded with its own result (duplicates counted);
- after the server stops, no process, cgroup, mount or QEMU of its sandboxes is left;
- the server's RSS, open files and threads (sampled from ``/proc`` every second) grow, by least
  squares over each server's life (the first tenth left out as warm-up), by no more than the
  limits over the calls it served.

Stores: the data directory's SQLite, or with ``--postgres`` a new database on that
PostgreSQL server (``IMPULS_DATABASE_URL``), dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import hashlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.events import temporary_database
from bench.loadgen import AUTH_HEADERS, scratch_dir
from bench.servers import ImpulsServer

QUEUE_SIZE = 4
QUEUE_TIMEOUT_S = 2.0
#: A call answers within its function's timeout plus the queue timeout plus a second, plus the
#: start of an instance for a cold call (its init may take 30 s: docs/api.md).  The soak keeps
#: the server's CPUs saturated, so requests also wait for the server's event loop (on 2 cores
#: at concurrency 64, a warm call's answer takes 0.1 to 2 s, rarely more), and starts slow
#: down.  So what is past timeout + queue timeout + 1 s is counted and shown; past it by more
#: than this (the init limit) is a hang.
LOAD_SLACK_S = 30.0
#: how long past its bound a call may take before the client gives up on it (a hang)
HANG_GRACE_S = 60.0
#: at most this share of calls may get 502 Sandbox.StartFailed with no kill to explain it (a
#: sandbox not built in time on an overloaded host: the platform's fault, documented as such)
START_FAILED_SHARE = 0.01
OVERSIZED_BYTES = 7 * 1024 * 1024
RESULT_LIMIT = "Function.ResponseSizeTooLarge"
DIED = frozenset({"Runtime.ExitError", "Sandbox.StartFailed"})
#: an idle instance killed this shortly before a call may still be handed the call: the server
#: has not seen it die yet (its exit is noticed asynchronously), and the call ends as one whose
#: runtime died under it
NOTICE_S = 1.0
SERVER_ENV = {
    "IMPULS_QUEUE_SIZE": str(QUEUE_SIZE), "IMPULS_QUEUE_TIMEOUT": str(QUEUE_TIMEOUT_S),
    # retries of events cut short by the chaos loop come within seconds, not minutes
    "IMPULS_EVENT_RETRY_BASE_SECONDS": "1", "IMPULS_EVENT_BACKOFF_MAX_SECONDS": "5",
}
DRAIN_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Function:
    """One function of the mix: its code and configuration; ``kind`` names its behaviour."""

    kind: str
    code: str
    timeout_sec: int = 10
    memory_mb: int = 128
    max_concurrency: int = 64
    reserved: int | None = None


ECHO = "GEN = {gen}\n\n\ndef handler(event, context):\n    return {{'echo': event, 'gen': GEN}}\n"
FUNCTIONS = {f.kind: f for f in (
    # asynchronous deliveries take up to half of it, synchronous calls up to the soak's concurrency
    Function("ok", ECHO.format(gen=0), max_concurrency=128),
    Function("raise", "def handler(event, context):\n    raise ValueError(f\"soak {event['i']}\")\n"),
    Function("timeout", "import time\n\n\ndef handler(event, context):\n    time.sleep(60)\n",
             timeout_sec=1),
    Function("crash", "import os\nimport signal\n\n\ndef handler(event, context):\n"
             "    if event['i'] % 2:\n        os.kill(os.getpid(), signal.SIGKILL)\n    os._exit(3)\n"),
    Function("oversized", f"def handler(event, context):\n    return 'x' * {OVERSIZED_BYTES}\n",
             timeout_sec=60),
    # /tmp holds 512 MB (ephemeral_storage_mb); the memory limit is above it (a tmpfs /tmp
    # counts against it), so writing ends in ENOSPC
    Function("tmpfill", "import errno\nimport os\n\n\ndef handler(event, context):\n"
             "    chunk, written = b'x' * (1 << 20), 0\n"
             "    try:\n        with open(f\"/tmp/fill-{event['i']}\", 'wb', buffering=0) as f:\n"
             "            while True:\n                f.write(chunk)\n                written += 1\n"
             "    except OSError as exc:\n        if exc.errno != errno.ENOSPC:\n            raise\n"
             "    return {'enospc': True, 'written_mb': written}\n",
             timeout_sec=60, memory_mb=768, max_concurrency=2),
    Function("throttled", ECHO.format(gen=0), reserved=0),
    Function("narrow", "import time\n\n\ndef handler(event, context):\n    time.sleep(0.02)\n"
             "    return {'echo': event, 'gen': 0}\n", reserved=1),
    Function("url", "def handler(event, context):\n"
             "    return {'path': event['rawPath'], 'method': event['requestContext']['http']['method']}\n"),
)}
#: calls of each kind per 1,000 (``async`` goes to ``ok``; ``fresh`` to the newest deployed function)
MIX = {"ok": 560, "async": 100, "url": 120, "raise": 80, "narrow": 40, "throttled": 30, "crash": 30,
       "fresh": 20, "timeout": 12, "oversized": 4, "tmpfill": 4}
MAX_FRESH = 20


@dataclass
class Limits:
    """How much each sampled figure may grow over one server's life (least-squares projection)."""

    rss_mib: float = 256.0
    fds: float = 300.0
    threads: float = 50.0


@dataclass
class Tally:
    """What the soak saw; ``failures`` lists every verdict that failed."""

    calls: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # "kind: label"
    chaos: Counter[str] = field(default_factory=Counter)  # documented answers to killed work
    unexpected: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    hangs: int = 0
    start_failed: int = 0  # 502 Sandbox.StartFailed with no kill to explain it
    over_bound: int = 0
    worst_over_bound: tuple[float, str] = (-1e9, "")
    waits: Counter[str] = field(default_factory=Counter)  # answers by time outside the function
    kills: Counter[str] = field(default_factory=Counter)
    #: instances the kills ended: each killed one, and those forked from a killed version template
    taken_down: int = 0
    taken_down_forked: int = 0
    deploys: Counter[str] = field(default_factory=Counter)
    accepted: dict[str, int] = field(default_factory=dict)  # request id → i
    events: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    orphans: list[str] = field(default_factory=list)
    samples: list[tuple[int, int, float, int, int]] = field(default_factory=list)  # gen, calls, ...
    slopes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def odd(self, key: str, example: str) -> None:
        self.unexpected[key] += 1
        self.examples.setdefault(key, example[:300])


def log(message: str) -> None:
    print(f"soak: {message}", file=sys.stderr, flush=True)


# --- what the chaos loop kills, and what must be gone at the end ------------------------------------


class Sandboxes:
    """The namespace sandbox's instances of one server: cgroups under ``impuls/<hash of its work
    dir>`` (see ``impuls.sandbox.namespace.driver.cgroup_parent``), each with pid 1 ``impuls-init``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        work = self.data_dir / "sandbox" / "namespace"
        self.parent = "impuls/" + hashlib.sha256(str(work).encode()).hexdigest()[:12]

    def cgroup_dirs(self) -> list[Path]:
        root = Path("/sys/fs/cgroup")
        found = [root / self.parent] if (root / self.parent).is_dir() else []
        with contextlib.suppress(OSError):
            found += [d / self.parent for d in root.iterdir() if (d / self.parent).is_dir()]
        return found

    def instances(self) -> list[Instance]:
        """Every live instance: slots (``slot-*``) and instances forked from a version template
        (``fork-*``, docs/init-once.md), each with pid 1 ``impuls-init``."""
        found: dict[int, list[int]] = {}
        for parent in self.cgroup_dirs()[:1]:
            for group in [*parent.glob("slot-*"), *parent.glob("fork-*")]:
                try:
                    pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
                except (OSError, ValueError):
                    continue
                inits = [p for p in pids if _cmdline(p).startswith(b"impuls-init")]
                if inits:
                    found[inits[0]] = [p for p in pids if p != inits[0]]
        # an instance forked from a template lives in the template's pid namespace: its pid 1 is a
        # child of the template's, and it ends with the template
        forked: Counter[int] = Counter(_parent(init) for init in found)
        return [Instance(init, others, forked[init]) for init, others in found.items()]

    def leftovers(self) -> list[str]:
        """Processes, cgroups, mounts and QEMUs of this server's sandboxes that still exist."""
        found = [f"cgroup {d}" for d in self.cgroup_dirs()]
        marks = (self.parent.encode(), str(self.data_dir).encode())
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cgroup = (entry / "cgroup").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            args = _cmdline(int(entry.name))
            if state != "Z" and (marks[0] in cgroup or marks[1] in args
                                 or cwd.startswith(str(self.data_dir))):
                kind = "qemu" if b"qemu" in args.split(b"\0")[0] else "process"
                found.append(f"{kind} {entry.name}: {args[:120].decode(errors='replace')}")
        with contextlib.suppress(OSError):
            mounts = Path("/proc/self/mountinfo").read_text().splitlines()
            found += [f"mount {line.split()[4]}" for line in mounts if str(self.data_dir) in line]
        return found


@dataclass(frozen=True)
class Instance:
    """One live instance: its pid 1, its other processes, and how many instances forked from it
    (it is a version template) end with it."""

    init: int
    others: list[int]
    forked: int


def _parent(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), 0)


def _bucket(seconds: float) -> str:
    return next((f"< {b:g} s" for b in (0.01, 0.1, 0.5, 1, 2, 5) if seconds < b), ">= 5 s")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _proc_figures(pid: int) -> tuple[float, int, int] | None:
    """(RSS in MiB, open file descriptors, threads) of ``pid``; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, fds, int(fields["Threads"])


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 for fewer than two distinct x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


# --- the soak ---------------------------------------------------------------------------------------


class Soak:
    def __init__(self, server: ImpulsServer, data_dir: Path, calls: int, concurrency: int, seed: int,
                 kill_interval_s: float, deploy_interval_s: float) -> None:
        self.server = server
        self.calls = calls
        self.concurrency = concurrency
        self.rng = random.Random(seed)
        self.kinds = self.rng.choices(list(MIX), weights=list(MIX.values()), k=calls)
        self.kill_interval_s = kill_interval_s
        self.deploy_interval_s = deploy_interval_s
        self.tally = Tally()
        self.sandboxes = Sandboxes(data_dir)
        self.next_call = 0
        self.done = 0
        self.gen = 0  # ``ok``'s newest code generation (sent: maybe not answered yet)
        self.fresh: list[str] = []
        self.kill_times: list[float] = []
        self.restart: tuple[float, float] | None = None  # (killed at, answering again at)
        self.up = asyncio.Event()
        self.up.set()
        self.finished = asyncio.Event()
        self.client = self._client()

    def _client(self) -> httpx.AsyncClient:
        # idle connections are dropped well before the server's keep-alive timeout (uvicorn's 5 s)
        # closes them: else a request sent as the server closes one fails with no answer
        limits = httpx.Limits(max_connections=self.concurrency + 8,
                              max_keepalive_connections=self.concurrency + 8, keepalive_expiry=1.0)
        return httpx.AsyncClient(base_url=self.server.url, headers=AUTH_HEADERS, limits=limits,
                                 timeout=httpx.Timeout(60.0, connect=5.0))

    # --- setup ---

    async def deploy(self) -> None:
        for name, fn in FUNCTIONS.items():
            await self._must("POST", "/api/v1/functions", {
                "name": name, "runtime": "python3.11", "handler": "handler.handler", "code": fn.code,
                "timeout_sec": fn.timeout_sec, "memory_mb": fn.memory_mb,
                "max_concurrency": fn.max_concurrency})
            if fn.reserved is not None:
                await self._must("PUT", f"/api/v1/functions/{name}/concurrency",
                                 {"reserved_concurrency": fn.reserved})
        await self._must("POST", "/api/v1/functions/url/url", {"auth_type": "NONE"})

    async def _must(self, method: str, path: str, doc: Any) -> Any:
        r = await self.client.request(method, path, json=doc)
        if r.status_code not in (200, 201):
            raise RuntimeError(f"{method} {path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    # --- traffic ---

    async def worker(self) -> None:
        while self.next_call < self.calls:
            i = self.next_call
            self.next_call += 1
            await self.up.wait()
            await self.one(i, self.kinds[i])
            self.done += 1
        self.finished.set()

    def _target(self, kind: str) -> tuple[str, Function]:
        if kind == "fresh" and self.fresh:
            return self.fresh[-1], FUNCTIONS["ok"]
        if kind in ("fresh", "async"):
            return "ok", FUNCTIONS["ok"]
        return kind, FUNCTIONS[kind]

    async def one(self, i: int, kind: str) -> None:
        name, fn = self._target(kind)
        event = {"i": i}
        if kind == "url":
            method, path, body = "GET", f"/fn/url/soak/{i}", None
        else:
            method, body = "POST", json.dumps(event).encode()
            path = f"/api/v1/functions/{name}/invoke" + ("?async=true" if kind == "async" else "")
        bound = fn.timeout_sec + QUEUE_TIMEOUT_S + 1.0
        t0 = time.monotonic()
        try:
            r = await self.client.request(method, path, content=body, timeout=bound + HANG_GRACE_S,
                                     headers={"Content-Type": "application/json"})
        except httpx.TimeoutException:
            self.tally.hangs += 1
            self.tally.odd(f"{kind}: no answer within {bound + HANG_GRACE_S:.0f} s", path)
            return
        except httpx.TransportError as exc:
            if self._server_died_during(t0, time.monotonic()):
                self.tally.chaos[f"{kind}: no answer (server killed)"] += 1
            else:
                self.tally.odd(f"{kind}: {type(exc).__name__}", f"{path}: {exc}")
            return
        finally:
            self.tally.calls += 1
        t1 = time.monotonic()
        try:
            doc: Any = r.json()
        except ValueError:
            doc = None
        over = (t1 - t0) - bound
        if over > 0:
            self.tally.over_bound += 1
            self.tally.worst_over_bound = max(self.tally.worst_over_bound, (over, f"{kind} {r.text[:200]}"))
        if over > LOAD_SLACK_S:
            self.tally.hangs += 1
            self.tally.odd(f"{kind}: a hang", f"{path}: {t1 - t0:.2f} s: HTTP {r.status_code} {r.text[:200]}")
        if isinstance(doc, dict) and isinstance(doc.get("duration_ms"), (int, float)):
            # duration_ms runs from the engine's start of the call (queue, start, run) to its end
            wait = (t1 - t0) - doc["duration_ms"] / 1000  # HTTP, the event loop, the round trip
            self.tally.waits[f"{'cold' if doc.get('cold_start') else 'warm'} {_bucket(wait)}"] += 1
        label = self.judge(kind, i, r.status_code, doc)
        if label is not None:
            self.tally.answers[f"{kind}: {label}"] += 1
            if kind == "async":
                self.tally.accepted[doc["request_id"]] = i
            return
        died = self.died(kind, r.status_code, doc)
        if died is not None and self._instance_killed_during(t0, t1):
            self.tally.chaos[f"{kind}: {died} (instance killed)"] += 1
            return
        if died is not None and self._instance_killed_during(t0 - NOTICE_S, t0):
            self.tally.chaos[f"{kind}: {died} (idle instance killed just before)"] += 1
            return
        if died == "502 Sandbox.StartFailed":
            self.tally.start_failed += 1
            self.tally.examples.setdefault("start failed", r.text[:250])
            return
        error_type = doc.get("error_type") if isinstance(doc, dict) else None
        self.tally.odd(f"{kind}: HTTP {r.status_code} {error_type or ''}".strip(), f"{path}: {r.text[:250]}")

    def judge(self, kind: str, i: int, status: int, doc: Any) -> str | None:
        """The label of a documented answer for ``kind``'s behaviour (None: not one)."""
        if not isinstance(doc, dict):
            return None
        code, error_type = doc.get("status_code"), doc.get("error_type")
        result = doc.get("body") if code == 200 else None
        echoed = (isinstance(result, dict) and result.get("echo") == {"i": i}
                  and result.get("gen") in range(self.gen + 1))
        throttled = status == 429 and doc.get("error") is True and bool(doc.get("message"))
        if kind in ("ok", "fresh"):
            return "200 result" if status == 200 and echoed else None
        if kind == "async":
            return "202 accepted" if status == 202 and isinstance(doc.get("request_id"), str) else None
        if kind == "url":
            return "200 result" if status == 200 and doc == {"path": f"/soak/{i}", "method": "GET"} else None
        if kind == "raise":
            ok = error_type == "ValueError" and doc.get("error") == f"soak {i}"
            return "200 ValueError" if status == 200 and code == 500 and ok else None
        if kind == "timeout":
            return "504 Sandbox.Timeout" if status == 504 and error_type == "Sandbox.Timeout" else None
        if kind == "crash":
            return "502 Runtime.ExitError" if status == 502 and error_type == "Runtime.ExitError" else None
        if kind == "oversized":
            ok = status == 200 and code == 500 and error_type == RESULT_LIMIT
            return f"200 {RESULT_LIMIT}" if ok else None
        if kind == "throttled":
            return "429" if throttled else None
        if kind == "narrow":
            return "429" if throttled else "200 result" if status == 200 and echoed else None
        if kind == "tmpfill":
            if throttled:
                return "429"
            if status == 200 and code == 200 and isinstance(result, dict) and result.get("enospc") is True:
                return "200 ENOSPC"
            oom = status == 200 and error_type == "Runtime.OutOfMemory"
            return "200 Runtime.OutOfMemory" if oom else None
        raise AssertionError(kind)

    @staticmethod
    def died(kind: str, status: int, doc: Any) -> str | None:
        """The documented answer to a call whose instance was killed under it, if this is one."""
        if kind == "url":
            return "502" if status == 502 and doc == {"message": "Internal Server Error"} else None
        if status == 502 and isinstance(doc, dict) and doc.get("error_type") in DIED:
            return f"502 {doc['error_type']}"
        return None

    def _instance_killed_during(self, t0: float, t1: float) -> bool:
        k = bisect.bisect_left(self.kill_times, t0)
        return k < len(self.kill_times) and self.kill_times[k] <= t1

    def _server_died_during(self, t0: float, t1: float) -> bool:
        if not self.up.is_set():
            return True
        return self.restart is not None and t0 <= self.restart[1] and t1 >= self.restart[0]

    # --- chaos, deploys, samples ---

    async def chaos(self) -> None:
        restarted = False
        while not self.finished.is_set():
            await asyncio.sleep(self.kill_interval_s * (0.5 + self.rng.random()))
            if not restarted and self.done >= self.calls // 2:
                await self.restart_server()
                restarted = True
                continue
            instances = await asyncio.to_thread(self.sandboxes.instances)
            if not instances:
                continue
            victim = self.rng.choice(instances)
            target, what = (victim.init, "sandbox") if not victim.others or self.rng.random() < 0.5 else \
                (self.rng.choice(victim.others), "runtime")
            self.kill_times.append(time.monotonic())
            try:
                os.kill(target, signal.SIGKILL)
                self.tally.kills[what] += 1
                self.tally.taken_down += 1 + victim.forked
                self.tally.taken_down_forked += victim.forked
            except ProcessLookupError:
                self.kill_times.pop()

    async def restart_server(self) -> None:
        """SIGKILL the server (only its own process: its sandboxes are left behind, as after a crash),
        then start it again on the same data directory, store and port."""
        self.up.clear()
        killed_at = time.monotonic()
        proc = self.server.proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        self.tally.kills["server"] += 1
        log(f"server SIGKILLed after {self.done} calls; starting it again on port {self.server.port}")
        self.server.log_path = self.server.log_path.with_name("server-after-restart.log")
        await asyncio.to_thread(self.server.start, 120.0)
        old, self.client = self.client, self._client()
        self.restart = (killed_at, time.monotonic())
        self.up.set()
        await old.aclose()

    async def deployer(self) -> None:
        """Updates and deploys under load: ``ok``'s code, ``raise``'s configuration, new functions."""
        step = 0
        while not self.finished.is_set():
            await asyncio.sleep(self.deploy_interval_s)
            await self.up.wait()
            step += 1
            if step % 3 == 0:  # calls may see the new generation before the update is answered
                self.gen += 1
                what, method, path = "update code", "PATCH", "/api/v1/functions/ok"
                doc: dict[str, Any] = {"code": ECHO.format(gen=self.gen)}
            elif step % 3 == 1:
                what, method, path = "update configuration", "PATCH", "/api/v1/functions/raise"
                doc = {"environment": {"SOAK_STEP": str(step)}}
            elif len(self.fresh) < MAX_FRESH:
                name = f"fresh-{len(self.fresh)}"
                what, method, path = "create", "POST", "/api/v1/functions"
                doc = {"name": name, "runtime": "python3.11", "handler": "handler.handler",
                       "code": ECHO.format(gen=0), "timeout_sec": 10, "max_concurrency": 64}
            else:
                continue
            t0 = time.monotonic()
            try:
                r = await self.client.request(method, path, json=doc)
            except httpx.TransportError as exc:
                if self._server_died_during(t0, time.monotonic()):
                    self.tally.chaos[f"deploy {what}: no answer (server killed)"] += 1
                else:
                    self.tally.odd(f"deploy {what}: {type(exc).__name__}", str(exc))
                continue
            if r.status_code in (200, 201):
                self.tally.deploys[what] += 1
                if what == "create":
                    self.fresh.append(doc["name"])
            else:
                self.tally.odd(f"deploy {what}: HTTP {r.status_code}", r.text[:250])

    async def sampler(self) -> None:
        while not self.finished.is_set():
            if self.up.is_set() and self.server.proc is not None:
                figures = await asyncio.to_thread(_proc_figures, self.server.proc.pid)
                generation = 0 if self.restart is None else 1
                if figures is not None:
                    self.tally.samples.append((generation, self.done, *figures))
            await asyncio.sleep(1.0)

    async def drain_events(self) -> None:
        """Wait until every accepted event is final; each must have succeeded with its own echo."""
        pending = dict(self.tally.accepted)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        gate = asyncio.Semaphore(16)

        async def check(rid: str, i: int) -> None:
            async with gate:
                r = await self.client.get(f"/api/v1/functions/ok/invocations/{rid}")
            if r.status_code == 404:
                self.tally.events["lost"] += 1
                self.tally.examples.setdefault("event lost", rid)
                pending.pop(rid)
                return
            ev = r.json()
            if ev["state"] not in ("succeeded", "failed", "expired"):
                return
            pending.pop(rid)
            self.tally.duplicates += int(ev.get("duplicates") or 0)
            runs = [h for h in ev.get("history") or [] if h.get("outcome") == "success"]
            result = runs[-1].get("result") if runs else None
            if isinstance(result, str):
                with contextlib.suppress(ValueError):
                    result = json.loads(result)
            ok = ev["state"] == "succeeded" and isinstance(result, dict) and result.get("echo") == {"i": i}
            outcome = "succeeded" if ok else "wrong result" if ev["state"] == "succeeded" else ev["state"]
            self.tally.events[outcome] += 1
            if not ok:
                self.tally.examples.setdefault(f"event {ev['state']}", json.dumps(ev)[:300])

        while pending and time.monotonic() < deadline:
            await asyncio.gather(*(check(rid, i) for rid, i in list(pending.items())))
            if pending:
                await asyncio.sleep(1.0)
        self.tally.events["never finished"] += len(pending)

    async def run(self) -> Tally:
        started = time.monotonic()
        await self.deploy()
        log(f"{self.calls} calls at concurrency {self.concurrency} against {self.server.url}")
        helpers = [asyncio.create_task(c) for c in (self.chaos(), self.deployer(), self.sampler(),
                                                    self.progress())]
        await asyncio.gather(*(self.worker() for _ in range(self.concurrency)))
        self.finished.set()
        await asyncio.gather(*helpers)
        log(f"all calls answered in {time.monotonic() - started:.0f} s; waiting for "
            f"{len(self.tally.accepted)} asynchronous events")
        await self.drain_events()
        await self.client.aclose()
        self.tally.seconds = time.monotonic() - started
        return self.tally

    async def progress(self) -> None:
        last = time.monotonic()
        while not self.finished.is_set():
            await asyncio.sleep(0.5)
            if time.monotonic() - last >= 30:
                last = time.monotonic()
                log(f"{self.done}/{self.calls} calls, {sum(self.tally.kills.values())} kills, "
                    f"{sum(self.tally.unexpected.values())} unexpected")


def judge(tally: Tally, limits: Limits) -> None:
    """Fill ``tally.slopes`` and ``tally.failures`` from what was seen."""
    f = tally.failures
    if tally.unexpected:
        f.append(f"{sum(tally.unexpected.values())} undocumented answers")
    if tally.hangs:
        f.append(f"{tally.hangs} calls hung")
    if tally.start_failed > START_FAILED_SHARE * tally.calls:
        f.append(f"{tally.start_failed} calls found no sandbox (over {START_FAILED_SHARE:.0%})")
    killed = sum(n for k, n in tally.chaos.items() if "instance killed" in k)
    if killed > tally.taken_down:
        f.append(f"{killed} answers put down to {tally.taken_down} instances killed")
    if tally.events["lost"] or tally.events["never finished"]:
        f.append(f"{tally.events['lost']} events lost, {tally.events['never finished']} never finished")
    bad = sum(n for k, n in tally.events.items() if k not in ("succeeded", "lost", "never finished"))
    if bad:
        f.append(f"{bad} events did not succeed with their result")
    if tally.orphans:
        f.append(f"{len(tally.orphans)} leftovers after the server stopped")
    for generation in sorted({s[0] for s in tally.samples}):
        rows = [s for s in tally.samples if s[0] == generation]
        rows = rows[len(rows) // 10:]  # warm-up: pools and caches filling
        if len(rows) < 3:
            continue
        span = rows[-1][1] - rows[0][1]
        for index, (name, limit, unit) in enumerate((("RSS", limits.rss_mib, "MiB"),
                                                     ("open files", limits.fds, ""),
                                                     ("threads", limits.threads, ""))):
            per = slope([(s[1], s[2 + index]) for s in rows])
            tally.slopes.append(f"server {generation + 1} ({span} calls, {len(rows)} samples): {name} "
                                f"{per * 100_000:+.2f}{unit} per 100,000 calls "
                                f"(first {rows[0][2 + index]:.0f}, last {rows[-1][2 + index]:.0f})")
            if per * span > limit:
                f.append(f"server {generation + 1}: {name} grew {per * span:.1f}{unit} over {span} calls "
                         f"(limit {limit:g})")


def summary(tally: Tally, label: str) -> str:
    lines = [f"soak summary ({label}): {tally.calls} calls in {tally.seconds:.0f} s"]

    def block(title: str, counts: Counter[str]) -> None:
        lines.append(f"  {title}:" + ("" if counts else " none"))
        lines.extend(f"    {k}: {n}" for k, n in sorted(counts.items()))

    block("answers", tally.answers)
    block("answers to killed work (documented)", tally.chaos)
    lines.append(f"  502 Sandbox.StartFailed with no kill to explain it: {tally.start_failed}")
    block("kills", tally.kills)
    lines.append(f"  instances the kills ended: {tally.taken_down} "
                 f"({tally.taken_down_forked} of them forked from a killed version template)")
    block("deploys under load", tally.deploys)
    block("time outside the engine (answer's time less its duration_ms, by cold start)", tally.waits)
    block("undocumented answers", tally.unexpected)
    lines.extend(f"    e.g. {k}: {v}" for k, v in tally.examples.items())
    worst = (f" (worst by {tally.worst_over_bound[0]:.2f} s: {tally.worst_over_bound[1][:160]})"
             if tally.over_bound else "")
    lines.append(f"  calls answered after their timeout + queue timeout + 1 s: {tally.over_bound}{worst}")
    lines.append(f"  hangs (answered over {LOAD_SLACK_S:g} s after that, or never): {tally.hangs}")
    lines.append(f"  asynchronous events: {len(tally.accepted)} accepted, "
                 f"{tally.events['succeeded']} succeeded, lost: {tally.events['lost']}, "
                 f"never finished: {tally.events['never finished']}, duplicates counted: {tally.duplicates}")
    lines.append(f"  leftovers after stop: {len(tally.orphans)}")
    lines.extend(f"    {o}" for o in tally.orphans[:10])
    lines.append("  server figures (least-squares slope):")
    lines.extend(f"    {s}" for s in tally.slopes)
    lines.append("  verdict: " + ("PASS" if not tally.failures else "FAIL: " + "; ".join(tally.failures)))
    return "\n".join(lines)


def soak(work: Path, calls: int, concurrency: int = 64, database_url: str = "",
         seed: int = 1, kill_interval_s: float = 0.5, deploy_interval_s: float = 2.0,
         limits: Limits | None = None) -> Tally:
    """One soak against a new server in ``work`` (its store: SQLite there, or ``database_url``, an
    empty PostgreSQL database); the tally with its verdicts (``failures`` empty: all passed)."""
    data_dir = work / "data"
    server = ImpulsServer("namespace", data_dir, work / "server.log", database_url=database_url)
    server.env.update(SERVER_ENV)
    server.start()
    try:
        tally = asyncio.run(Soak(server, data_dir, calls, concurrency, seed, kill_interval_s,
                                 deploy_interval_s).run())
    finally:
        server.stop()
    tally.orphans = Sandboxes(data_dir).leftovers()
    judge(tally, limits or Limits())
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--postgres", default="", metavar="ADMIN_URL",
                        help="run on a new database of this PostgreSQL server instead of SQLite")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kill-interval", type=float, default=0.5, help="mean seconds between kills")
    parser.add_argument("--work", type=Path, help="keep the data directory and logs here")
    parser.add_argument("--max-rss-growth", type=float, default=Limits.rss_mib, help="MiB per server life")
    parser.add_argument("--max-fd-growth", type=float, default=Limits.fds)
    parser.add_argument("--max-thread-growth", type=float, default=Limits.threads)
    args = parser.parse_args(argv)
    limits = Limits(args.max_rss_growth, args.max_fd_growth, args.max_thread_growth)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(scratch_dir()))
        work.mkdir(parents=True, exist_ok=True)
        database_url = stack.enter_context(temporary_database(args.postgres)) if args.postgres else ""
        tally = soak(work, args.calls, args.concurrency, database_url, args.seed,
                     args.kill_interval, limits=limits)
        print(summary(tally, f"namespace, {'PostgreSQL' if args.postgres else 'SQLite'}"))
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
