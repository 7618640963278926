"""The one command: measure everything side by side, print the tables, write docs/benchmarks.md.

    .venv/bin/python -m bench [--quick] [--sandbox process,namespace] [--output PATH] [--json PATH]

(``bench/run`` is the same, from any directory.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import (
    console,
    density,
    events,
    init_once,
    lambda_api,
    otlp,
    profiling,
    report,
    rotation,
    scale_out,
)
from bench.loadgen import Client, LoadGenError, burst, lua_script, run_wrk, scratch_dir, wrk_path, wrk_version
from bench.results import (
    FLOOR,
    FLOOR_FASTAPI,
    IMPULS,
    IMPULS_LAMBDA,
    IMPULS_POSTGRES,
    IMPULS_TRACED,
    IMPULS_URL,
    SPAWN,
    ColdRow,
    MemoryRow,
    Results,
    ServerTime,
    WarmRow,
    percentile,
)
from bench.servers import ImpulsServer, ServerProcess, ServerRefused
from bench.sysinfo import ROOT, cpu_sample, instance_memory, ipc_round_trips, machine, system_busy_s
from bench.workloads import EVENT, EXPECTED_BODY, PYTHON, WORKLOADS, Workload

ALL_SANDBOXES = ("process", "namespace", "microvm")
DEFAULT_OUTPUT = ROOT / "docs" / "benchmarks.md"
CORES = os.cpu_count() or 1
OTHER_LOAD_WARNING_PCT = 10.0
QUIET_LOAD_PCT = 10.0
QUIET_WINDOW_S = 0.5
BOOTSTRAP_MARK = {"python": "bootstrap.py", "node": "bootstrap.js", "java": "impuls.runtime.Main",
                  "ruby": "bootstrap.rb", "csharp": "impuls_bootstrap.exe"}
# a microVM instance is its QEMU process, told apart by its guest root file system
MICROVM_MARK = {"python": "rootfs-python", "node": "rootfs-nodejs", "java": "rootfs-java",
                "ruby": "rootfs-ruby", "csharp": "rootfs-dotnet"}


@dataclass(frozen=True)
class Plan:
    """How long and how much: the defaults, or the smoke-run values of ``--quick``."""

    quick: bool
    concurrency: tuple[int, ...]
    duration_s: int
    warmup_s: int
    prewarm_rounds: int
    server_time_calls: int
    cold_samples: int
    cold_budget_s: float
    cold_burst: int
    settle_s: float
    quiet_budget_s: float  # at most this long in all, wait for other load to drop before a row
    repeats: int  # at most this many warm rows measured again because other load disturbed them
    sandbox_budget_s: float  # rows of one sandbox not started after this long are skipped (slow VMs)

    @classmethod
    def make(cls, args: argparse.Namespace) -> Plan:
        levels = tuple(int(x) for x in args.concurrency.split(","))
        if args.quick:
            plan = cls(quick=True, concurrency=levels, duration_s=1, warmup_s=0, prewarm_rounds=1,
                       server_time_calls=10, cold_samples=4, cold_budget_s=10.0, cold_burst=8,
                       settle_s=0.02, quiet_budget_s=0.0, repeats=0, sandbox_budget_s=120.0)
        else:
            plan = cls(quick=False, concurrency=levels, duration_s=5, warmup_s=2, prewarm_rounds=2,
                       server_time_calls=200, cold_samples=40, cold_budget_s=30.0, cold_burst=32,
                       settle_s=0.05, quiet_budget_s=60.0, repeats=6, sandbox_budget_s=150.0)
        overrides = {k: v for k, v in (("duration_s", args.duration), ("warmup_s", args.warmup),
                                       ("cold_samples", args.cold_samples),
                                       ("quiet_budget_s", args.quiet_wait),
                                       ("repeats", args.repeats),
                                       ("sandbox_budget_s", args.sandbox_budget)) if v is not None}
        return cls(**{**plan.__dict__, **overrides})

    @property
    def max_concurrency(self) -> int:
        return max(*self.concurrency, self.cold_burst)


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


class Runner:
    def __init__(self, plan: Plan, results: Results, work: Path, profile: bool,
                 workloads: tuple[Workload, ...] = WORKLOADS) -> None:
        self.plan = plan
        self.workloads = workloads
        self.results = results
        self.work = work
        self.script = lua_script(EVENT, work)
        self.profile = profile
        self.quiet_left = plan.quiet_budget_s
        self.deadline = float("inf")  # of the sandbox being measured
        self.repeats_left = plan.repeats

    def wait_quiet(self) -> None:
        """Between rows nothing of ours runs: if the machine is busy anyway, wait (bounded) for quiet."""
        waited = 0.0
        while self.quiet_left > 0:
            before = system_busy_s()
            time.sleep(QUIET_WINDOW_S)
            load = (system_busy_s() - before) / (QUIET_WINDOW_S * CORES) * 100
            if load < QUIET_LOAD_PCT:
                break
            self.quiet_left -= QUIET_WINDOW_S
            waited += QUIET_WINDOW_S
        if waited:
            self.deadline += waited  # waiting for others does not use up a sandbox's budget
            log(f"waited {waited:.1f} s for other load to drop ({self.quiet_left:.0f} s of waiting left)")

    # --- warm rows -------------------------------------------------------------------------

    def check(self, server: ServerProcess, path: str) -> str | None:
        """None if one call returns the expected body, else why not."""
        client = Client(server.url, self.call_timeout())
        try:
            status, doc, _ = client.request("POST", path, EVENT)
        except (OSError, http.client.HTTPException) as exc:
            return f"cannot call {server.label}: {exc}"
        finally:
            client.close()
        if status != 200 or not isinstance(doc, dict) or doc.get("status_code") != 200 \
                or doc.get("body") != EXPECTED_BODY:
            return f"HTTP {status}: {str(doc)[:300]}"
        return None

    def warm(self, server: ServerProcess, path: str, system: str, sandbox: str, runtime: str,
             levels: tuple[int, ...] = ()) -> None:
        problem = self.check(server, path)
        if problem is not None:
            self.note(f"{server.label} {runtime}: skipped, a test call failed: {problem}")
            return
        for level in levels or self.plan.concurrency:
            if self.out_of_time(f"{server.label} {runtime} concurrency {level}"):
                return
            for _ in range(self.plan.prewarm_rounds):
                replies = burst(server.url, path, EVENT, level, self.call_timeout())
                failed = [r for r in replies if r[0] != 200]
                if failed:
                    self.note(f"{server.label} {runtime} c={level}: {len(failed)} of {level} pre-warm calls "
                              f"failed, e.g. {str(failed[0][1])[:200]}")
            self.row(server, server.url + path, system, sandbox, runtime, level, self.script)
            if level == 1:
                self.server_time(server, path, system, sandbox, runtime)

    def row(self, server: ServerProcess, url: str, system: str, sandbox: str, runtime: str, level: int,
            script: Path) -> None:
        """Measure one warm row, again (bounded) while other load disturbs it; keep the quietest."""
        row = self.measure(server, url, system, sandbox, runtime, level, script)
        while row.other_cpu_pct > OTHER_LOAD_WARNING_PCT and self.repeats_left > 0:
            self.repeats_left -= 1
            log(f"{row.label} {runtime} c={level}: other load {row.other_cpu_pct:.0f}%, measuring again "
                f"({self.repeats_left} repeats left)")
            started = time.monotonic()
            again = self.measure(server, url, system, sandbox, runtime, level, script)
            self.deadline += time.monotonic() - started  # nor does measuring a row again
            row = min(row, again, key=lambda r: r.other_cpu_pct)
        self.results.warm.append(row)
        log(f"{row.label:<22} {runtime:<6} c={level:<3} p50 {row.p50_ms:8.3f} ms  "
            f"p99 {row.p99_ms:8.3f} ms  {row.rps:9.0f} inv/s  errors {row.errors}  "
            f"other load {row.other_cpu_pct:.0f}%")

    def measure(self, server: ServerProcess, url: str, system: str, sandbox: str, runtime: str,
                level: int, script: Path) -> WarmRow:
        """One warm row: (wait for quiet,) wrk warm-up, then the measured wrk run with CPU accounting."""
        self.wait_quiet()
        if self.plan.warmup_s:
            run_wrk(url, script, level, self.plan.warmup_s)
        before, busy_before = cpu_sample(server.pid), system_busy_s()
        result = run_wrk(url, script, level, self.plan.duration_s)
        after, busy_after = cpu_sample(server.pid), system_busy_s()
        n = max(result.requests, 1)
        server_s, others_s = after.server_s - before.server_s, after.others_s - before.others_s
        other = max(0.0, busy_after - busy_before - server_s - others_s - result.client_cpu_s)
        return WarmRow(
            system, sandbox, runtime, level, result.requests, result.duration_s, result.p50_ms,
            result.p99_ms, result.rps, result.errors + result.non_2xx, server_s / n * 1e6,
            others_s / n * 1e6, result.client_cpu_s / n * 1e6, other / (result.duration_s * CORES) * 100)

    def server_time(self, server: ServerProcess, path: str, system: str, sandbox: str, runtime: str) -> None:
        client, client_ms, server_ms = Client(server.url), [], []
        for _ in range(self.plan.server_time_calls):
            status, doc, elapsed = client.request("POST", path, EVENT)
            if status == 200 and isinstance(doc, dict) and "duration_ms" in doc:
                client_ms.append(elapsed * 1000)
                server_ms.append(float(doc["duration_ms"]))
        client.close()
        if server_ms:
            self.results.server_times.append(ServerTime(
                system, sandbox, runtime, len(server_ms), statistics.median(client_ms),
                statistics.median(server_ms)))

    # --- baselines -------------------------------------------------------------------------

    def baselines(self) -> None:
        code_file = self.work / "handler.py"
        code_file.write_text(PYTHON.code)
        python = runtime_interpreter()
        for kind, system in (("floor", FLOOR), ("fastapi", FLOOR_FASTAPI), ("spawn", SPAWN)):
            argv = [sys.executable, "-m", "bench.baselines", kind, "--port", "{port}",
                    "--code-file", str(code_file), "--python", python]
            server = ServerProcess(system, argv, self.work / f"{kind}.log")
            try:
                server.start()
            except ServerRefused as exc:
                self.note(f"{system}: could not start: {exc}")
                continue
            try:
                log(f"measuring {system}")
                self.warm(server, "/invoke", system, "-", PYTHON.label)
            except (OSError, RuntimeError, http.client.HTTPException) as exc:
                self.note(f"{system}: rows stopped: {exc}")
            finally:
                server.stop()

    # --- Impuls, per sandbox -------------------------------------------------------------

    def impuls(self, sandbox: str) -> None:
        data = self.work / f"data-{sandbox}"
        server = ImpulsServer(sandbox, data, self.work / f"impuls-{sandbox}.log")
        try:
            server.start()
        except ServerRefused as exc:
            hint = ""
            if "image" in str(exc):
                hint = (" (the harness gives the server IMPULS_IMAGES_DIR, else the checkout's "
                        ".impuls/images, where `.venv/bin/impuls images build` run from the checkout "
                        "puts them)")
            self.note(f"sandbox {sandbox}: skipped, the server refused to start with it: {exc}{hint}")
            return
        log(f"measuring impuls with sandbox {sandbox} (server pid {server.pid})")
        self.results.sandboxes.append(sandbox)
        health = server.health_doc or {}
        if "accel" in health:  # a microVM row means little without its acceleration
            self.note(f"impuls ({sandbox}) runs with acceleration {health['accel']}: "
                      f"{health.get('accel_note', '')}")
        self.deadline = time.monotonic() + self.plan.sandbox_budget_s
        try:
            offered = set((server.health_doc or {}).get("runtimes") or [])
            workloads = [w for w in self.workloads if not offered or w.runtime in offered]
            for workload in sorted(set(self.workloads) - set(workloads), key=WORKLOADS.index):
                self.note(f"sandbox {sandbox}: {workload.runtime} is not available on this host")
            # cold starts first: for a slow sandbox (a microVM without KVM) they matter most
            for workload in workloads:
                if self.out_of_time(f"impuls ({sandbox}) {workload.label} cold starts"):
                    continue
                try:
                    self.wait_quiet()
                    self.cold(server, sandbox, workload)
                except (OSError, RuntimeError, http.client.HTTPException) as exc:
                    self.note(f"impuls ({sandbox}) {workload.label} cold starts stopped: {exc}")
            for workload in workloads:
                try:
                    path = server.create(f"bench-{workload.label}", workload, self.plan.max_concurrency)
                    self.warm(server, path, IMPULS, sandbox, workload.label)
                    if workload is PYTHON:
                        self.lambda_api(server, sandbox, f"bench-{workload.label}")
                        self.function_url(server, sandbox, f"bench-{workload.label}")
                    self.memory(server, sandbox, workload)
                    if self.profile and workload is PYTHON and not self.results.profile_note:
                        self.wait_quiet()  # profiled once: on the first sandbox measured
                        shares, note = profiling.profile_server(
                            server.pid, server.url + path, self.script, self.plan.duration_s)
                        self.results.profile, self.results.profile_note = shares, f"{sandbox} sandbox; {note}"
                except (OSError, RuntimeError, http.client.HTTPException) as exc:
                    self.note(f"impuls ({sandbox}) {workload.label} warm rows stopped: {exc}")
        finally:
            self.deadline = float("inf")
            server.stop()

    def lambda_api(self, server: ImpulsServer, sandbox: str, function: str) -> None:
        """The same Python function through AWS Lambda's Invoke, signed (``bench/lambda_api.py``)."""
        path = lambda_api.invoke_path(function)
        access_key_id, secret = lambda_api.credentials(server.call)
        headers = lambda_api.signed_headers(server.url + path, EVENT, access_key_id, secret)
        status, doc, _ = Client(server.url, self.call_timeout()).request("POST", path, EVENT, headers)
        if status != 200 or doc != EXPECTED_BODY:
            self.note(f"impuls ({sandbox}) Lambda API: skipped, a signed test call gave HTTP {status}: "
                      f"{str(doc)[:200]}")
            return
        script = lua_script(EVENT, self.work, headers, name="lambda.lua")
        for level in self.plan.concurrency:
            if self.out_of_time(f"impuls ({sandbox}) Lambda API concurrency {level}"):
                return
            self.row(server, server.url + path, IMPULS_LAMBDA, sandbox, PYTHON.label, level, script)

    def function_url(self, server: ImpulsServer, sandbox: str, function: str) -> None:
        """The same Python function served through its function URL (auth KEY: the harness's key)."""
        server.call("POST", f"/api/v1/functions/{function}/url", {"auth_type": "KEY"})
        path = f"/fn/{function}/"
        status, doc, _ = Client(server.url, self.call_timeout()).request("POST", path, EVENT)
        if status != 200 or doc != EXPECTED_BODY:
            self.note(f"impuls ({sandbox}) function URL: skipped, a test call gave HTTP {status}: "
                      f"{str(doc)[:200]}")
            return
        for level in self.plan.concurrency:
            if self.out_of_time(f"impuls ({sandbox}) function URL concurrency {level}"):
                return
            self.row(server, server.url + path, IMPULS_URL, sandbox, PYTHON.label, level, self.script)

    def traced(self, sandbox: str) -> None:
        """The warm Python rows at the lowest and highest concurrency again, on a server with
        tracing on (IMPULS_OTLP_ENDPOINT: a no-op OTLP/HTTP sink in this process, ``bench/otlp.py``),
        to set beside the same function's rows with tracing off."""
        with otlp.sink() as sink:
            server = ImpulsServer(sandbox, self.work / f"data-traced-{sandbox}",
                                  self.work / f"impuls-traced-{sandbox}.log", otlp_endpoint=sink.endpoint)
            if not self.variant_rows(server, IMPULS_TRACED, sandbox, "tracing on"):
                return
            dropped = server.log_path.read_text(errors="replace").count("dropping Span")
            self.note(f"tracing on ({sandbox}): the no-op sink took {sink.posts:,} exports "
                      f"({sink.bytes / 1e6:,.1f} MB of spans)"
                      + (f"; the exporter dropped spans {dropped} times (queue full)" if dropped else ""))

    def variant_rows(self, server: ImpulsServer, system: str, sandbox: str, what: str) -> bool:
        """The warm Python rows at the lowest and highest concurrency on ``server`` (the usual
        server with one thing changed, ``what``), as ``system``; False when it would not start."""
        levels = tuple(sorted({min(self.plan.concurrency), max(self.plan.concurrency)}))
        try:
            server.start()
        except ServerRefused as exc:
            self.note(f"{what} ({sandbox}): skipped, the server refused to start: {exc}")
            return False
        log(f"measuring impuls, {what}, sandbox {sandbox} (server pid {server.pid})")
        self.deadline = time.monotonic() + self.plan.sandbox_budget_s
        try:
            path = server.create(f"bench-{PYTHON.label}", PYTHON, self.plan.max_concurrency)
            self.warm(server, path, system, sandbox, PYTHON.label, levels)
        except (OSError, RuntimeError, http.client.HTTPException) as exc:
            self.note(f"{what} ({sandbox}): rows stopped: {exc}")
        finally:
            self.deadline = float("inf")
            server.stop()
        return True

    def postgres(self, sandbox: str, postgres_url: str) -> None:
        """The warm Python rows at the lowest and highest concurrency on a server whose store is a
        fresh PostgreSQL database, to set beside the same rows on SQLite (the warm path reads no
        database: they should not differ beyond noise); then the update propagation between two
        nodes on one database (``bench/scale_out.py``)."""
        with events.temporary_database(postgres_url) as url:
            server = ImpulsServer(sandbox, self.work / f"data-postgres-{sandbox}",
                                  self.work / f"impuls-postgres-{sandbox}.log", database_url=url)
            if not self.variant_rows(server, IMPULS_POSTGRES, sandbox, "PostgreSQL store"):
                return
        self.wait_quiet()
        with events.temporary_database(postgres_url) as url:
            try:
                row = scale_out.measure(sandbox, self.work, url, 5 if self.plan.quick else 30)
            except (OSError, RuntimeError, http.client.HTTPException, ServerRefused) as exc:
                self.note(f"update propagation ({sandbox}): stopped: {exc}")
                return
        self.results.propagation.append(row)
        log(f"update propagation between two nodes ({sandbox}): p50 {row.p50_ms:.1f} ms, "
            f"max {row.max_ms:.1f} ms over {row.updates} updates")

    def out_of_time(self, what: str) -> bool:
        if time.monotonic() < self.deadline:
            return False
        self.note(f"{what}: skipped, the sandbox's time budget ({self.plan.sandbox_budget_s:.0f} s, "
                  "--sandbox-budget) is used up")
        return True

    def call_timeout(self) -> float:
        """For single calls: 60 s, or what is left of the sandbox's budget (at least 5 s)."""
        return max(5.0, min(60.0, self.deadline - time.monotonic()))

    def memory(self, server: ImpulsServer, sandbox: str, workload: Workload) -> None:
        marks = MICROVM_MARK if sandbox == "microvm" else BOOTSTRAP_MARK
        if workload.label not in marks:  # a compiled bootstrap: not told apart here
            return
        found = instance_memory(server.pid, list(marks.values()))
        sizes = found.instances[marks[workload.label]]
        if sizes:
            self.results.memory.append(MemoryRow(sandbox, workload.label, len(sizes),
                                                 statistics.mean(sizes) / 1024, found.shared_kib / 1024))

    def cold(self, server: ImpulsServer, sandbox: str, workload: Workload) -> None:
        name = f"cold-{workload.label}"
        path = server.create(name, workload, self.plan.max_concurrency)
        problem = self.check(server, path)  # also unpacks the code once, as any first call does
        if problem is not None:
            self.note(f"impuls ({sandbox}) {workload.label} cold start: skipped: {problem}")
            return
        client, client_ms, server_ms, not_cold = Client(server.url, self.call_timeout()), [], [], 0
        deadline = min(time.monotonic() + self.plan.cold_budget_s, self.deadline)
        for serial in range(self.plan.cold_samples):
            if time.monotonic() > deadline:
                self.note(f"impuls ({sandbox}) {workload.label} cold start: stopped after "
                          f"{serial} samples (time budget)")
                break
            server.touch(name, serial)
            time.sleep(self.plan.settle_s)  # let the retired instance go away first
            status, doc, elapsed = client.request("POST", path, EVENT)
            if status != 200 or not isinstance(doc, dict) or doc.get("status_code") != 200:
                raise RuntimeError(f"cold start call failed: HTTP {status}: {doc}")
            if not doc.get("cold_start"):
                not_cold += 1
                continue
            client_ms.append(elapsed * 1000)
            server_ms.append(float(doc["duration_ms"]))
        client.close()
        server.touch(name, -1)
        time.sleep(max(0.2, self.plan.settle_s))
        replies = burst(server.url, path, EVENT, self.plan.cold_burst, self.call_timeout())  # all together
        wall_ms = max(elapsed for _, _, elapsed in replies) * 1000
        cold_n = sum(1 for status, doc, _ in replies
                     if status == 200 and isinstance(doc, dict) and doc.get("cold_start"))
        row = ColdRow(sandbox, workload.label, len(client_ms), percentile(client_ms, 50),
                      percentile(client_ms, 99), percentile(server_ms, 50), percentile(server_ms, 99),
                      self.plan.cold_burst, cold_n, wall_ms, not_cold)
        self.results.cold.append(row)
        server.call("DELETE", f"/api/v1/functions/{name}")  # its instances go: they would skew memory
        log(f"impuls ({sandbox}) {workload.label} cold start: p50 {row.client_p50_ms:.1f} ms, "
            f"p99 {row.client_p99_ms:.1f} ms over {row.samples}; burst of {row.burst}: "
            f"{row.burst_cold} cold in {row.burst_wall_ms:.0f} ms")

    def rotation(self) -> None:
        """What replacing the namespace template costs (``bench/rotation.py``): in-process rows."""
        from impuls.errors import ImpulsError
        from impuls.sandbox import namespace

        reason = namespace.available()
        if reason:
            self.note(f"template rotation rows: skipped, the namespace sandbox is unavailable: {reason}")
            return
        self.wait_quiet()
        samples = max(20, 2 * self.plan.cold_samples)
        try:
            rows = asyncio.run(rotation.measure(self.work, samples, self.plan.settle_s,
                                                self.plan.cold_budget_s))
        except (OSError, RuntimeError, ImpulsError) as exc:
            self.note(f"template rotation rows stopped: {exc}")
            return
        self.results.rotation.extend(rows)
        for row in rows:
            log(f"namespace template {row.label}: cold start p50 {row.p50_ms:.1f} ms, "
                f"p99 {row.p99_ms:.1f} ms over {row.samples}, {row.rotations} rotations")

    def init_once_rows(self) -> None:
        """Cold starts of a 1 s-init Python function, forked or not (``bench/init_once.py``)."""
        self.wait_quiet()
        server = ImpulsServer("namespace", self.work / "data-init-once", self.work / "impuls-init-once.log")
        try:
            server.start()
        except ServerRefused as exc:
            self.note(f"init-once rows: skipped, the server refused the namespace sandbox: {exc}")
            return
        try:
            rows = init_once.measure(server, max(20, self.plan.cold_samples), self.plan.cold_budget_s + 30,
                                     self.call_timeout())
        except (OSError, RuntimeError, http.client.HTTPException) as exc:
            self.note(f"init-once rows stopped: {exc}")
            return
        finally:
            server.stop()
        self.results.init_once.extend(rows)
        for row in rows:
            log(f"{row.label}: first call {row.first_ms:.0f} ms, cold start p50 {row.p50_ms:.1f} ms, "
                f"p99 {row.p99_ms:.1f} ms over {row.samples} ({row.not_cold} found a warm instance)")

    def events(self, sandbox: str, postgres_url: str) -> None:
        """The asynchronous-event rows on SQLite, and on PostgreSQL when given (``bench/events.py``)."""
        stores = [("sqlite", "")] + ([("postgresql", postgres_url)] if postgres_url else [])
        level = max(self.plan.concurrency)
        samples = 20 if self.plan.quick else 200
        for store, url in stores:
            with contextlib.ExitStack() as stack:
                if url:
                    url = stack.enter_context(events.temporary_database(url))
                server = ImpulsServer(sandbox, self.work / f"data-events-{store}",
                                      self.work / f"events-{store}.log", database_url=url)
                stack.callback(server.stop)
                try:
                    server.start()
                    self.wait_quiet()
                    row = events.measure(server, store, self.work, level, self.plan.duration_s, samples)
                except (OSError, RuntimeError, http.client.HTTPException, ServerRefused) as exc:
                    self.note(f"asynchronous events ({store}): stopped: {exc}")
                    continue
            self.results.events.append(row)
            log(f"events ({store}): {row.accepted_per_s:,.0f} accepted/s at c={level}, accept to start "
                f"p50 {row.delay_p50_ms:.1f} ms, p99 {row.delay_p99_ms:.1f} ms")

    def console(self, sandbox: str) -> None:
        """The console row: the function list's first paint with 1,000 functions (``bench/console.py``)."""
        reason = console.unavailable()
        if reason:
            self.note(f"console row: skipped: {reason}")
            return
        self.wait_quiet()
        try:
            row = console.measure(sandbox, self.work, 5 if self.plan.quick else 21)
        except (OSError, RuntimeError, ServerRefused) as exc:
            self.note(f"console row: stopped: {exc}")
            return
        self.results.console.append(row)
        log(f"console: the function list with {row.functions:,} functions paints first in "
            f"{row.first_paint_p50_ms:.0f} ms (p50 of {row.loads})")

    def density(self) -> None:
        """The density row (``bench/density.py``): 1,000 idle warm instances of 100 functions in the
        namespace sandbox (``--quick``: 100 of 10)."""
        functions, per_function = (10, 10) if self.plan.quick else (100, 10)
        self.wait_quiet()
        try:
            row = density.measure(self.work, functions, per_function)
        except (OSError, RuntimeError, http.client.HTTPException, ServerRefused) as exc:
            self.note(f"density row: stopped: {exc}")
            return
        self.results.density.append(row)
        log(f"density: {row.instances:,} instances of {row.functions} functions in {row.reach_s:.1f} s, "
            f"PSS {row.pss_per_instance_mib:.1f} MiB each, server RSS {row.server_rss_mib:.0f} MiB; "
            f"warm round: {row.cold_in_warm} cold of {row.warm_calls}, {row.errors} errors")

    def note(self, text: str) -> None:
        log(text)
        self.results.notes.append(text)


def runtime_interpreter() -> str:
    """The python3.11 interpreter Impuls's runtime uses (so spawn-per-call runs the same one)."""
    from impuls.runtimes import default_registry

    rt = default_registry().resolve("python3.11")
    assert rt.interpreter is not None
    return rt.interpreter


def runtime_versions() -> dict[str, str]:
    """The versions of the runtimes the rows use, as Impuls runs them."""
    from impuls.runtimes import default_registry

    out = {}
    registry = default_registry()
    for workload in WORKLOADS:
        try:
            rt = registry.resolve(workload.runtime)
        except Exception as exc:  # not installed: the rows will say so too
            out[f"{workload.runtime} runtime"] = f"unavailable ({exc})"
            continue
        out[f"{rt.id} runtime"] = f"{rt.version or '?'}" + (f" ({rt.interpreter})" if rt.interpreter else "")
    return out


def command_line(argv: list[str]) -> str:
    prog = os.environ.get("BENCH_COMMAND")
    if not prog:
        exe = Path(sys.executable)
        with_root = exe.absolute()
        prog = f"{os.path.relpath(with_root, ROOT) if with_root.is_relative_to(ROOT) else exe} -m bench"
    return " ".join([prog, *(shlex.quote(a) for a in argv)])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run", description="Impuls benchmark harness: warm and cold invocations per sandbox, "
        "side by side with the spawn-per-call and in-process floor baselines (load generator: wrk).")
    parser.add_argument("--sandbox", default="",
                        help="comma-separated sandboxes to measure (default: every one the host "
                        f"supports among {','.join(ALL_SANDBOXES)}; refused ones are skipped with a note)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of a few seconds (1 s rows, no warm-up, few cold starts); "
                        "writes no docs unless --output is given")
    parser.add_argument("--runtime", default="",
                        help="comma-separated runtime ids whose rows to measure (default: every one in "
                        f"bench/workloads.py: {','.join(w.runtime for w in WORKLOADS)})")
    parser.add_argument("--concurrency", default="1,8,32", help="warm concurrency levels (default 1,8,32)")
    parser.add_argument("--duration", type=int, help="seconds per measured row (default 5; --quick 1)")
    parser.add_argument("--warmup", type=int,
                        help="wrk warm-up seconds before each row (default 2; --quick 0)")
    parser.add_argument("--cold-samples", type=int, help="cold starts per runtime (default 40; --quick 4)")
    parser.add_argument("--quiet-wait", type=float,
                        help="seconds in all to wait, before rows, for other processes' CPU load to drop "
                        f"below {QUIET_LOAD_PCT:g}%% (default 60; --quick 0)")
    parser.add_argument("--repeats", type=int,
                        help=f"warm rows that ran with other load above {OTHER_LOAD_WARNING_PCT:g}%% are "
                        "measured again, keeping the quieter run, this many times in all "
                        "(default 6; --quick 0)")
    parser.add_argument("--sandbox-budget", type=float,
                        help="seconds per sandbox after which its remaining rows are skipped with a note, "
                        "for slow sandboxes such as microVMs without KVM (default 150; --quick 120)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the floor and spawn-per-call rows")
    parser.add_argument("--no-events", action="store_true", help="skip the asynchronous-event rows")
    parser.add_argument("--no-density", action="store_true",
                        help="skip the density row (1,000 idle warm namespace instances of 100 functions)")
    parser.add_argument("--no-console", action="store_true",
                        help="skip the web console's row (first paint of the function list in Chromium)")
    parser.add_argument("--no-tracing", action="store_true",
                        help="skip the rows with tracing on (OTLP export to a no-op sink)")
    parser.add_argument("--postgres-url", default=os.environ.get("IMPULS_BENCH_POSTGRES_URL", ""),
                        help="also measure on PostgreSQL (a fresh database each time, made and dropped "
                        "through this URL): the asynchronous-event rows, the warm Python rows and the "
                        "update propagation between two nodes (IMPULS_BENCH_POSTGRES_URL)")
    parser.add_argument("--profile", action="store_true",
                        help="also sample the server with py-spy during an extra Python concurrency-1 "
                        "run and add the breakdown (needs py-spy on PATH or in the venv)")
    parser.add_argument("--output", type=Path,
                        help="markdown report (default docs/benchmarks.md; none with --quick)")
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if wrk_path() is None:
        print("bench: wrk is not installed: apt-get install wrk (scripts/setup installs it)", file=sys.stderr)
        return 2
    plan = Plan.make(args)
    sandboxes = [s for s in args.sandbox.split(",") if s] or list(ALL_SANDBOXES)
    wanted = {r for r in args.runtime.split(",") if r}
    if unknown := wanted - {w.runtime for w in WORKLOADS}:
        print(f"bench: unknown runtime {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    workloads = tuple(w for w in WORKLOADS if not wanted or w.runtime in wanted)
    results = Results(machine(runtime_versions(), wrk_version()), command_line(argv), {
        "concurrency": list(plan.concurrency), "duration_s": plan.duration_s, "warmup_s": plan.warmup_s,
        "cold_samples": plan.cold_samples, "cold_burst": plan.cold_burst, "settle_s": plan.settle_s,
        "quick": plan.quick,
        "sandboxes_requested": sandboxes,
    })
    started = time.monotonic()
    try:
        with scratch_dir() as tmp:
            runner = Runner(plan, results, Path(tmp), args.profile, workloads)
            results.ipc_rtt_us = ipc_round_trips()
            if not args.no_baselines:
                runner.baselines()
            for sandbox in sandboxes:
                runner.impuls(sandbox)
                if not args.no_tracing and results.sandboxes == [sandbox]:  # the first one measured
                    runner.traced(sandbox)
                if args.postgres_url and results.sandboxes == [sandbox]:
                    runner.postgres(sandbox, args.postgres_url)
                if sandbox == "namespace" and sandbox in results.sandboxes:
                    runner.rotation()
                    runner.init_once_rows()
                    if not args.no_density:
                        runner.density()
            if results.sandboxes and not args.no_events:
                runner.events(results.sandboxes[0], args.postgres_url)
            if results.sandboxes and not args.no_console:
                runner.console(results.sandboxes[0])
    except LoadGenError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    results.settings["elapsed_s"] = round(time.monotonic() - started, 1)
    noisy = [r for r in results.warm if r.other_cpu_pct > OTHER_LOAD_WARNING_PCT]
    if noisy:
        results.notes.append(
            f"{len(noisy)} of {len(results.warm)} warm rows ran while other processes used more than "
            f"{OTHER_LOAD_WARNING_PCT:g}% of the machine's CPU (column 'other load'; up to "
            f"{max(r.other_cpu_pct for r in noisy):.0f}%): those numbers are pessimistic; re-run on a quiet "
            "machine.")
    text = report.tables(results)
    print(text)
    output = args.output or (None if plan.quick else DEFAULT_OUTPUT)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report.markdown(results))
        log(f"wrote {output}")
    if args.json is not None:
        import json

        args.json.write_text(json.dumps(results.to_json(), indent=2))
    return 0
