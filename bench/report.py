"""Tables for the terminal and the docs/benchmarks.md page, targets, and where the time goes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.results import (
    FLOOR,
    FLOOR_FASTAPI,
    IMPULS,
    IMPULS_LAMBDA,
    IMPULS_POSTGRES,
    IMPULS_TRACED,
    IMPULS_URL,
    SPAWN,
    Results,
)

FLOOR_RATIO_GOAL = 2.0
SPAWN_SPEEDUP_GOAL = 20.0
THROUGHPUT_GOAL = 2000.0
THROUGHPUT_LEVEL = 32
# the namespace sandbox's own targets: only evaluated for sandboxes other than process
NS_COLD_P50_GOAL_MS = 20.0
NS_WARM_OVERHEAD_GOAL = 1.10
NS_STARTS_PER_S_GOAL = 100.0
NS_PSS_GOAL_MIB = 15.0
# the microvm sandbox's targets under TCG (software emulation)
VM_TCG_RESTORE_P50_GOAL_MS = 300.0
VM_TCG_WARM_P50_GOAL_MS = 10.0
# the Lambda API: a SigV4-signed Invoke against the native invoke of the same function
LAMBDA_SIGNED_RATIO_GOAL = 1.25
# function URLs: the same function through its URL against its native invoke
URL_RATIO_GOAL = 1.2
# asynchronous events
EVENTS_ACCEPTED_GOAL = 2000.0
EVENTS_DELAY_P50_GOAL_MS = 5.0
# density: idle warm namespace instances
DENSITY_PSS_GOAL_MIB = 5.0
# the web console: the function list's first paint with 1,000 functions
CONSOLE_FIRST_PAINT_GOAL_MS = 300.0
# no tail, a lean median, throughput, Node cold starts (process and namespace)
TAIL_P99_FLOOR_GOAL = 3.0
TAIL_LEVELS = (1, 8, 32)
MEDIAN_FLOOR_GOAL = 1.5
FAST_THROUGHPUT_GOAL = 8000.0
NODE_COLD_P50_GOAL_MS = 15.0
X = "\u00d7"  # multiplication sign
NA = "\u2013"  # en dash: not measured


def _ms(value: float) -> str:
    if math.isnan(value):
        return NA
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _int(value: float) -> str:
    return NA if math.isnan(value) else f"{value:,.0f}"


def table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """A markdown table padded so that it also reads well as plain text."""
    right = right if right is not None else set(range(1, len(headers)))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


# --- the tables ------------------------------------------------------------------------------


def warm_table(results: Results) -> str:
    rows = []
    for row in results.warm:
        floor = results.find_warm(FLOOR, "python", row.concurrency)
        ratio = f"{row.p50_ms / floor.p50_ms:.2f}{X}" if floor and floor.p50_ms else NA
        rows.append([row.label, row.runtime, str(row.concurrency), _ms(row.p50_ms), _ms(row.p99_ms),
                     _int(row.rps), ratio, str(row.errors), _int(row.cpu_server_us),
                     _int(row.cpu_sandbox_us), _int(row.cpu_client_us), f"{row.other_cpu_pct:.0f}%"])
    return table(["system", "runtime", "concurrency", "p50 ms", "p99 ms", "inv/s", "p50 vs floor",
                  "errors", "CPU µs/inv: server", "runtimes", "client (wrk)", "other load"], rows,
                 set(range(2, 12)))


def cold_table(results: Results) -> str:
    rows = [[f"impuls ({r.sandbox})", r.runtime, str(r.samples), _ms(r.client_p50_ms), _ms(r.client_p99_ms),
             _ms(r.server_p50_ms), _ms(r.server_p99_ms),
             f"{r.burst_cold}/{r.burst} in {r.burst_wall_ms:.0f} ms", _int(r.instances_per_s)]
            for r in results.cold]
    spawn = results.find_warm(SPAWN, "python", 1)
    if spawn is not None:
        rows.append([f"{SPAWN} (every call)", "python", f"{spawn.requests:,}", _ms(spawn.p50_ms),
                     _ms(spawn.p99_ms), "", "", "", ""])
    return table(["system", "runtime", "samples", "client p50 ms", "client p99 ms", "server p50 ms",
                  "server p99 ms", "concurrent burst", "instances/s"], rows, {2, 3, 4, 5, 6, 8})


def memory_table(results: Results) -> str:
    rows = [[f"impuls ({m.sandbox})", m.runtime, str(m.instances), f"{m.pss_mib_mean:.1f}",
             f"{m.shared_mib:.1f}"] for m in results.memory]
    return table(["system", "runtime", "idle warm instances", "PSS per instance MiB",
                  "shared processes MiB (total: sandbox helpers, record writer)"], rows, {2, 3, 4})


def rotation_table(results: Results) -> str:
    base = results.rotation[0]

    def ratio(value: float, of: float) -> str:
        return f"{value / of:.2f}{X}" if of and not math.isnan(value) else NA

    rows = [[r.label, str(r.samples), _ms(r.p50_ms), _ms(r.p99_ms), str(r.rotations),
             ratio(r.p50_ms, base.p50_ms), ratio(r.p99_ms, base.p99_ms)] for r in results.rotation]
    return table(["template replaced", "samples", "p50 ms", "p99 ms", "rotations", "p50 vs default",
                  "p99 vs default"], rows)


def init_once_table(results: Results) -> str:
    rows = [[r.label, str(r.samples), _ms(r.first_ms), _ms(r.p50_ms), _ms(r.p99_ms), str(r.not_cold),
             f"≤ {r.target_ms:g} ms", Target("", "", "", r.met).verdict if r.init_once else NA]
            for r in results.init_once]
    return table(["function", "cold starts", "first call ms", "p50 ms", "p99 ms", "left out (warm)",
                  "target (p50)", "verdict"], rows, {1, 2, 3, 4, 5})


def events_table(results: Results) -> str:
    rows = [[r.store, str(r.concurrency), _int(r.accepted_per_s), str(r.errors), str(r.delay_samples),
             _ms(r.delay_p50_ms), _ms(r.delay_p99_ms)] for r in results.events]
    return table(["store", "concurrency", "accepted/s", "errors", "samples", "accept→start p50 ms",
                  "p99 ms"], rows)


def density_table(results: Results) -> str:
    rows = [[f"{r.functions}{X}{r.per_function}", _int(r.instances), _int(r.idle), f"{r.reach_s:.1f}",
             f"{r.pss_per_instance_mib:.2f}", _int(r.server_rss_mib), _int(r.server_pss_mib),
             f"{r.warm_calls - r.cold_in_warm:,} of {r.warm_calls:,}", str(r.errors)]
            for r in results.density]
    return table([f"functions{X}instances", "instances", "idle", "reached in s", "PSS/instance MiB",
                  "server RSS MiB", "server PSS MiB", "warm round: warm", "errors"], rows)


def console_table(results: Results) -> str:
    rows = [[f"{r.functions:,}", str(r.loads), _ms(r.first_paint_p50_ms), _ms(r.first_paint_p99_ms)]
            for r in results.console]
    return table(["functions", "loads", "first paint p50 ms", "p99 ms"], rows, {0, 1, 2, 3})


def tracing_table(results: Results) -> str:
    """Each traced row beside the row of the same function, sandbox and concurrency with tracing off."""
    rows = []
    for on in (r for r in results.warm if r.system == IMPULS_TRACED):
        off = results.find_warm(IMPULS, on.runtime, on.concurrency, on.sandbox)
        if off is None:
            continue
        rows.append([on.sandbox, on.runtime, str(on.concurrency), _ms(off.p50_ms), _ms(on.p50_ms),
                     f"{on.p50_ms - off.p50_ms:+.3f}", _ms(off.p99_ms), _ms(on.p99_ms), _int(off.rps),
                     _int(on.rps), _int(off.cpu_server_us), _int(on.cpu_server_us)])
    return table(["sandbox", "runtime", "concurrency", "p50 ms off", "p50 ms on", "p50 Δ ms", "p99 ms off",
                  "p99 ms on", "inv/s off", "inv/s on", "server CPU µs/inv off", "on"], rows,
                 set(range(2, 12)))


def stores_table(results: Results) -> str:
    """Each warm row on PostgreSQL beside the same function's row on SQLite."""
    rows = []
    for pg in (r for r in results.warm if r.system == IMPULS_POSTGRES):
        lite = results.find_warm(IMPULS, pg.runtime, pg.concurrency, pg.sandbox)
        if lite is None:
            continue
        rows.append([pg.sandbox, pg.runtime, str(pg.concurrency), _ms(lite.p50_ms), _ms(pg.p50_ms),
                     f"{pg.p50_ms - lite.p50_ms:+.3f}", _ms(lite.p99_ms), _ms(pg.p99_ms), _int(lite.rps),
                     _int(pg.rps)])
    return table(["sandbox", "runtime", "concurrency", "p50 ms SQLite", "p50 ms PostgreSQL", "p50 Δ ms",
                  "p99 ms SQLite", "p99 ms PostgreSQL", "inv/s SQLite", "inv/s PostgreSQL"], rows,
                 set(range(2, 10)))


def propagation_table(results: Results) -> str:
    rows = [[r.sandbox, str(r.updates), _ms(r.p50_ms), _ms(r.max_ms)] for r in results.propagation]
    return table(["sandbox", "updates", "p50 ms", "max ms"], rows, {1, 2, 3})


@dataclass
class Target:
    name: str
    goal: str
    measured: str
    met: bool | None  # None: could not be evaluated

    @property
    def verdict(self) -> str:
        return {True: "**met**", False: "**missed**", None: "not measured"}[self.met]


def targets(results: Results) -> list[Target]:
    out: list[Target] = []
    floor = results.find_warm(FLOOR, "python", 1)
    spawn = results.find_warm(SPAWN, "python", 1)
    cores = results.machine.get("cores", "?")
    for sandbox in [s for s in results.sandboxes if s != "microvm"] or ["process"]:
        warm = results.find_warm(IMPULS, "python", 1, sandbox)
        label = f"({sandbox})"
        if warm and floor:
            ratio = warm.p50_ms / floor.p50_ms
            out.append(Target(f"warm Python p50 at concurrency 1 vs floor {label}",
                              f"≤ {FLOOR_RATIO_GOAL:g}{X} floor",
                              f"{ratio:.2f}{X} ({_ms(warm.p50_ms)} ms vs {_ms(floor.p50_ms)} ms)",
                              ratio <= FLOOR_RATIO_GOAL))
        else:
            out.append(Target(f"warm Python p50 vs floor {label}", f"≤ {FLOOR_RATIO_GOAL:g}{X}", NA, None))
        if warm and spawn:
            speedup = spawn.p50_ms / warm.p50_ms
            out.append(Target(f"warm Python p50 vs spawn-per-call {label}",
                              f"≥ {SPAWN_SPEEDUP_GOAL:g}{X} faster",
                              f"{speedup:.1f}{X} faster ({_ms(warm.p50_ms)} ms vs {_ms(spawn.p50_ms)} ms)",
                              speedup >= SPAWN_SPEEDUP_GOAL))
        else:
            out.append(Target(f"warm Python vs spawn-per-call {label}", f"≥ {SPAWN_SPEEDUP_GOAL:g}{X}", NA,
                              None))
        busy = results.find_warm(IMPULS, "python", THROUGHPUT_LEVEL, sandbox)
        out.append(Target(
            f"Python throughput at concurrency {THROUGHPUT_LEVEL} {label}",
            f"≥ {THROUGHPUT_GOAL:,.0f} inv/s on 2 cores",
            f"{busy.rps:,.0f} inv/s on {cores} cores" if busy else NA,
            (busy.rps >= THROUGHPUT_GOAL and busy.errors == 0) if busy else None))
    for sandbox in results.sandboxes:
        signed = results.find_warm(IMPULS_LAMBDA, "python", 1, sandbox)
        native = results.find_warm(IMPULS, "python", 1, sandbox)
        name = f"SigV4-signed Lambda Invoke p50 vs native invoke, concurrency 1 ({sandbox})"
        if signed and native:
            ratio = signed.p50_ms / native.p50_ms
            out.append(Target(name, f"≤ {LAMBDA_SIGNED_RATIO_GOAL:g}{X}",
                              f"{ratio:.2f}{X} ({_ms(signed.p50_ms)} ms vs {_ms(native.p50_ms)} ms)",
                              ratio <= LAMBDA_SIGNED_RATIO_GOAL))
        via_url = results.find_warm(IMPULS_URL, "python", 1, sandbox)
        if via_url and native:
            ratio = via_url.p50_ms / native.p50_ms
            out.append(Target(f"function URL p50 vs native invoke, concurrency 1 ({sandbox})",
                              f"≤ {URL_RATIO_GOAL:g}{X}",
                              f"{ratio:.2f}{X} ({_ms(via_url.p50_ms)} ms vs {_ms(native.p50_ms)} ms)",
                              ratio <= URL_RATIO_GOAL))
    for row in results.events:
        if row.store == "sqlite":
            out.append(Target(f"accepted asynchronous events per second, concurrency {row.concurrency} "
                              "(sqlite)", f"≥ {EVENTS_ACCEPTED_GOAL:,.0f}/s",
                              f"{row.accepted_per_s:,.0f}/s", row.accepted_per_s >= EVENTS_ACCEPTED_GOAL
                              and row.errors == 0))
        out.append(Target(f"accept to start of delivery p50, idle warm function ({row.store})",
                          f"≤ {EVENTS_DELAY_P50_GOAL_MS:g} ms", f"{_ms(row.delay_p50_ms)} ms",
                          row.delay_p50_ms <= EVENTS_DELAY_P50_GOAL_MS))
    for forked in (r for r in results.init_once if r.init_once):
        out.append(Target("cold start p50 of a Python function with a 1 s init, forked from its version "
                          "template (namespace)", f"≤ {forked.target_ms:g} ms",
                          f"{_ms(forked.p50_ms)} ms over {forked.samples}", forked.met))
    for dense in results.density:
        out.append(Target(f"{dense.target:,} idle warm instances of {dense.functions} functions, each then "
                          "answering warm (namespace)", "all live, no cold start, no error",
                          f"{dense.instances:,} live; {dense.cold_in_warm} cold, {dense.errors} errors",
                          dense.instances >= dense.target and dense.cold_in_warm == 0 and dense.errors == 0))
        out.append(Target(f"PSS per idle instance at {dense.target:,} instances (namespace)",
                          f"≤ {DENSITY_PSS_GOAL_MIB:g} MiB", f"{dense.pss_per_instance_mib:.2f} MiB",
                          dense.pss_per_instance_mib <= DENSITY_PSS_GOAL_MIB))
    for paint in results.console:
        out.append(Target(f"console function list first paint, {paint.functions:,} functions",
                          f"≤ {CONSOLE_FIRST_PAINT_GOAL_MS:g} ms", f"{paint.first_paint_p50_ms:.0f} ms (p50)",
                          paint.first_paint_p50_ms <= CONSOLE_FIRST_PAINT_GOAL_MS))
    out.extend(_speed_targets(results))
    if "namespace" in results.sandboxes:
        out.extend(_namespace_targets(results, "namespace"))
    if "microvm" in results.sandboxes:
        out.extend(_microvm_targets(results))
    return out


def _microvm_targets(results: Results) -> list[Target]:
    """The microvm sandbox's targets under TCG; a cold start is a snapshot restore (its note
    says so)."""
    label = "(microvm, TCG targets)"
    cold = results.find_cold("microvm", "python")
    warm = results.find_warm(IMPULS, "python", 1, "microvm")
    return [
        Target(f"Python restore to first result p50 {label}", f"≤ {VM_TCG_RESTORE_P50_GOAL_MS:g} ms",
               f"{_ms(cold.client_p50_ms)} ms" if cold else NA,
               cold.client_p50_ms <= VM_TCG_RESTORE_P50_GOAL_MS if cold else None),
        Target(f"warm Python no-op p50 {label}", f"≤ {VM_TCG_WARM_P50_GOAL_MS:g} ms",
               f"{_ms(warm.p50_ms)} ms" if warm else NA,
               warm.p50_ms <= VM_TCG_WARM_P50_GOAL_MS if warm else None),
    ]


def _speed_targets(results: Results) -> list[Target]:
    """Warm p99 within 3x the floor's at concurrency 1, 8 and 32; warm p50 within 1.5x the
    floor's; 8,000 inv/s at concurrency 32; Node cold start p50 (namespace)."""
    out = []
    for sandbox in (s for s in ("process", "namespace") if s in results.sandboxes):
        for level in TAIL_LEVELS:
            warm = results.find_warm(IMPULS, "python", level, sandbox)
            floor = results.find_warm(FLOOR, "python", level)
            name = f"warm Python p99 at concurrency {level} vs the floor's p99 ({sandbox})"
            goal = f"≤ {TAIL_P99_FLOOR_GOAL:g}{X}"
            if warm and floor:
                ratio = warm.p99_ms / floor.p99_ms
                measured = f"{ratio:.1f}{X} ({_ms(warm.p99_ms)} ms vs {_ms(floor.p99_ms)} ms)"
                out.append(Target(name, goal, measured, ratio <= TAIL_P99_FLOOR_GOAL))
            else:
                out.append(Target(name, goal, NA, None))
        warm, floor = results.find_warm(IMPULS, "python", 1, sandbox), results.find_warm(FLOOR, "python", 1)
        out.append(Target(f"warm Python p50 at concurrency 1 vs the floor's ({sandbox})",
                          f"≤ {MEDIAN_FLOOR_GOAL:g}{X}",
                          f"{warm.p50_ms / floor.p50_ms:.2f}{X}" if warm and floor else NA,
                          warm.p50_ms / floor.p50_ms <= MEDIAN_FLOOR_GOAL if warm and floor else None))
    if "namespace" in results.sandboxes:
        busy = results.find_warm(IMPULS, "python", THROUGHPUT_LEVEL, "namespace")
        out.append(Target(f"Python throughput at concurrency {THROUGHPUT_LEVEL} (namespace)",
                          f"≥ {FAST_THROUGHPUT_GOAL:,.0f} inv/s", f"{busy.rps:,.0f} inv/s" if busy else NA,
                          (busy.rps >= FAST_THROUGHPUT_GOAL and busy.errors == 0) if busy else None))
        node = results.find_cold("namespace", "node")
        out.append(Target("Node.js cold start p50 (namespace)", f"≤ {NODE_COLD_P50_GOAL_MS:g} ms",
                          f"{_ms(node.client_p50_ms)} ms" if node else NA,
                          node.client_p50_ms <= NODE_COLD_P50_GOAL_MS if node else None))
    return out


def _namespace_targets(results: Results, sandbox: str) -> list[Target]:
    label = f"({sandbox})"
    out = []
    cold = results.find_cold(sandbox, "python")
    out.append(Target(f"Python cold start p50 {label}", f"≤ {NS_COLD_P50_GOAL_MS:g} ms",
                      f"{_ms(cold.client_p50_ms)} ms" if cold else NA,
                      cold.client_p50_ms <= NS_COLD_P50_GOAL_MS if cold else None))
    mine = results.find_warm(IMPULS, "python", 1, sandbox)
    base = results.find_warm(IMPULS, "python", 1, "process")
    if mine and base:
        ratio = mine.p50_ms / base.p50_ms
        out.append(Target(f"warm Python p50 vs process sandbox {label}",
                          f"≤ {NS_WARM_OVERHEAD_GOAL:.2f}{X}", f"{ratio:.2f}{X}",
                          ratio <= NS_WARM_OVERHEAD_GOAL))
    else:
        out.append(Target(f"warm Python p50 vs process sandbox {label}",
                          f"≤ {NS_WARM_OVERHEAD_GOAL:.2f}{X}", f"{NA} (needs the process rows too)", None))
    out.append(Target(f"instances started per second {label}", f"≥ {NS_STARTS_PER_S_GOAL:g}/s",
                      f"{cold.instances_per_s:,.0f}/s" if cold else NA,
                      cold.instances_per_s >= NS_STARTS_PER_S_GOAL if cold else None))
    mem = next((m for m in results.memory if (m.sandbox, m.runtime) == (sandbox, "python")), None)
    out.append(Target(f"PSS per idle warm Python instance {label}", f"≤ {NS_PSS_GOAL_MIB:g} MiB",
                      f"{mem.pss_mib_mean:.1f} MiB" if mem else NA,
                      mem.pss_mib_mean <= NS_PSS_GOAL_MIB if mem else None))
    return out


def targets_table(results: Results) -> str:
    rows = [[t.name, t.goal, t.measured, t.verdict] for t in targets(results)]
    return table(["target", "goal", "measured (this run)", "verdict"], rows, set())


def tables(results: Results) -> str:
    parts = ["Warm invocations (wrk, fixed duration per row; CPU is per invocation)", warm_table(results),
             "", "Cold starts (new instance to first result)", cold_table(results)]
    if results.memory:
        parts += ["", "Memory", memory_table(results)]
    if results.rotation:
        parts += ["", "Template rotation (namespace, Python cold starts in-process: create + first call)",
                  rotation_table(results)]
    if results.init_once:
        parts += ["", "Init once, fork many (namespace, Python, 1 s import; client time through HTTP)",
                  init_once_table(results)]
    if results.events:
        parts += ["", "Asynchronous events", events_table(results)]
    if results.density:
        parts += ["", "Density", density_table(results)]
    if results.console:
        parts += ["", "Web console", console_table(results)]
    if any(r.system == IMPULS_TRACED for r in results.warm):
        parts += ["", "Tracing off and on (OTLP/HTTP export to a no-op sink)", tracing_table(results)]
    if any(r.system == IMPULS_POSTGRES for r in results.warm) or results.propagation:
        parts += ["", "SQLite and PostgreSQL (warm path)", stores_table(results),
                  "", "Update propagation between two nodes on one PostgreSQL", propagation_table(results)]
    parts += ["", "Targets", targets_table(results)]
    if results.notes:
        parts += ["", "Notes", *(f"- {n}" for n in results.notes)]
    return "\n".join(parts)


# --- where the time goes -------------------------------------------------------------------


def where_time_goes(results: Results) -> list[str]:
    out: list[str] = []
    floor1 = results.find_warm(FLOOR, "python", 1)
    fast1 = results.find_warm(FLOOR_FASTAPI, "python", 1)
    floor_busy = results.find_warm(FLOOR, "python", THROUGHPUT_LEVEL)
    fast_busy = results.find_warm(FLOOR_FASTAPI, "python", THROUGHPUT_LEVEL)
    for sandbox in results.sandboxes:
        warm1 = results.find_warm(IMPULS, "python", 1, sandbox)
        st = results.find_server_time(IMPULS, sandbox, "python")
        if warm1 is None:
            continue
        text = (f"**Latency, {sandbox} sandbox, Python, concurrency 1.** A warm call takes "
                f"{_ms(warm1.p50_ms)} ms at the client (wrk p50).")
        if floor1 is not None and fast1 is not None:
            text += (f" Step by step: the bare floor (loopback round trip, uvicorn/httptools, the handler "
                     f"in-process, the same reply) takes {_ms(floor1.p50_ms)} ms; putting FastAPI in front "
                     f"of the same handler makes it {_ms(fast1.p50_ms)} ms "
                     f"(+{_ms(fast1.p50_ms - floor1.p50_ms)} ms); Impuls adds "
                     f"{_ms(warm1.p50_ms - fast1.p50_ms)} ms more: the engine, the hand-off to a separate "
                     f"runtime process over the Runtime API and back, and the invoke endpoint's own work.")
        if results.ipc_rtt_us:
            rtts = " and ".join(f"{us:.0f} µs {where}" for where, us in results.ipc_rtt_us.items())
            text += (f" For scale: one round trip between two processes over a unix socket pair takes "
                     f"{rtts} on this machine (median, Python on both ends); Impuls "
                     f"needs one such round trip into the runtime process that the floor does not, plus "
                     f"the runtime's own work ({_int(warm1.cpu_sandbox_us)} µs of CPU per call here).")
        if st is not None:
            text += (f" The server's own `duration_ms` (engine: pool checkout, hand-off to the runtime "
                     f"over the Runtime API, the handler, the reply back) has a median of "
                     f"{_ms(st.duration_p50_ms)} ms ({st.calls} sequential calls); the other "
                     f"{_ms(warm1.p50_ms - st.duration_p50_ms)} ms are the front: loopback, uvicorn, "
                     f"FastAPI, the endpoint (body read, JSON check, reply serialisation, the invocation "
                     f"record).")
        out.append(text)
        busy = results.find_warm(IMPULS, "python", THROUGHPUT_LEVEL, sandbox)
        if busy is not None and busy.requests:
            total = busy.cpu_server_us + busy.cpu_sandbox_us + busy.cpu_client_us
            text = (f"**CPU, {sandbox} sandbox, Python, concurrency {THROUGHPUT_LEVEL}** (both cores busy): "
                    f"per invocation the Impuls server process used {_int(busy.cpu_server_us)} µs, the "
                    f"runtime processes and the record writer {_int(busy.cpu_sandbox_us)} µs and wrk "
                    f"{_int(busy.cpu_client_us)} µs, "
                    f"{_int(total)} µs in all, which caps 2 cores at about "
                    f"{_int(2e6 / total if total else math.nan)} inv/s; the server's one event loop "
                    f"caps it at {_int(1e6 / busy.cpu_server_us if busy.cpu_server_us else math.nan)} "
                    f"inv/s (measured: {_int(busy.rps)}).")
            if floor_busy is not None and fast_busy is not None:
                text += (f" For comparison the floor's whole server used {_int(floor_busy.cpu_server_us)} µs "
                         f"per call and the FastAPI floor {_int(fast_busy.cpu_server_us)} µs: the framework "
                         f"accounts for about {_int(fast_busy.cpu_server_us - floor_busy.cpu_server_us)} µs, "
                         f"and the Impuls server process spends "
                         f"{_int(busy.cpu_server_us - fast_busy.cpu_server_us)} µs beyond it (engine, "
                         f"Runtime API server, records, the second HTTP exchange's socket calls).")
            out.append(text)
    if results.profile:
        out.append(f"**Profile of the server process** ({results.profile_note}), share of samples:")
        out.append(table(["component", "share"],
                         [[name, f"{share * 100:.1f}%"] for name, share in results.profile], {1}))
    elif results.profile_note:
        out.append(f"Profile: {results.profile_note}.")
    return out


# --- the page ---------------------------------------------------------------------------------


INTRO = """\
# Benchmarks

Written by the benchmark harness (`bench/`); every number below comes from one
run of the command shown, on the machine described. Re-run it to refresh this
page. The targets are the project's goals for the warm path, cold starts, density,
the doors and the microVM under emulation.
"""

METHOD = """\
## How it measures

- **Load generator**: `wrk` (one thread, `-c` = concurrency, keep-alive, a Lua
  script that POSTs the event `{{"name":"bench","n":1}}` with
  `Content-Type: application/json`), identical for every row. wrk is a C epoll
  loop, so on this 2-core machine it takes little CPU from the server (its cost
  per call is in the "client (wrk)" column). Each row: {prewarm}, {warmup}then a
  fixed {duration} s measurement; wrk stops by itself. Latency percentiles are
  wrk's (per request, µs resolution); throughput = requests / duration. Only
  127.0.0.1 is ever targeted. At concurrency 1 every call is a ping-pong
  between processes, so its p50 moves by tens of µs with where the scheduler
  puts them (one vCPU or two; see the round trips under "Where the time goes"):
  compare rows of the same run, not of different runs.
- **Handlers**: no-ops returning `{{"ok": true}}` — Python
  `def handler(event, context): return {{"ok": True}}`, Node
  `exports.handler = async () => ({{ ok: true }})`.
- **Impuls**: `impuls server --sandbox S` with a fresh data directory (SQLite),
  functions with `memory_mb` 128 and `max_concurrency` {maxc}, invoked through
  `POST /api/v1/functions/{{name}}/invoke`.
- **floor**: the same Python handler imported once and called in-process behind
  a bare ASGI callable on uvicorn with uvloop + httptools (one worker, access log
  off) — the same HTTP server stack Impuls uses, without a framework or an
  engine; it returns the same reply envelope (`bench/baselines.py`).
- **spawn-per-call**: the original Impuls local mode on the same uvicorn stack:
  per request it writes a runner script and the handler to a fresh temp dir,
  runs a fresh `python3` (the interpreter of Impuls's python3.11 runtime) that
  imports the handler and calls it, returns what it printed, and removes the
  dir (`bench/baselines.py`).
- **Cold start**: a `PATCH` of the function's description retires its
  instances, so the next call starts a new one; after a {settle} ms pause the
  harness times that call with a keep-alive client (client p50/p99) and reads
  its `duration_ms` (server view) and `cold_start` (must be true). The first call
  of the function (which also unpacks its code) is not counted. "Concurrent
  burst": after another update, {burst} calls sent at once on separate
  connections; instances/s = cold starts / time until the last reply.
- **CPU** per invocation: CPU time of the server process, of everything it
  started (runtime processes, sandboxes, spawned interpreters, the record writer;
  from /proc), and of
  wrk, over the measured seconds, divided by the requests served.
- **Other load**: CPU time the whole machine was busy during the row minus the
  CPU of the processes above, as a share of all cores: other work on the machine
  that competed with the row (0% on a quiet machine).
- **Memory**: proportional set size (PSS, `/proc/PID/smaps_rollup`) after the
  concurrency-{maxlevel} row of each runtime. An instance's memory is that of its
  runtime process plus the processes above it that serve it alone (e.g. its
  sandbox's init), averaged over instances; processes below the server that
  serve all instances (a template, pre-forked spares) are shown in total.
"""


def markdown(results: Results) -> str:
    s = results.settings
    machine_rows = [[k, v] for k, v in results.machine.items()]
    prewarm = "a pre-warm burst of `concurrency` simultaneous calls"
    warmup = f"a {s['warmup_s']} s wrk warm-up, " if s["warmup_s"] else ""
    parts = [
        INTRO,
        "## Machine and command\n",
        table(["", ""], machine_rows, set()),
        "",
        "```sh\n" + results.command + "\n```\n",
        f"Sandboxes requested: {', '.join(s['sandboxes_requested'])}; measured: "
        f"{', '.join(results.sandboxes) or 'none'}. The whole run took {s.get('elapsed_s', '?')} s.",
        "",
        "## Targets\n",
        targets_table(results),
        "",
        "## Warm invocations\n",
        "p50/p99 latency at the client, throughput, the ratio of p50 to the (Python) floor at the same "
        "concurrency, CPU per invocation, and how busy the rest of the machine was meanwhile.\n",
        warm_table(results),
        "",
        "## Cold starts\n",
        "New instance to first result. Client = observed by the caller through the HTTP API; "
        "server = the reply's `duration_ms`.\n",
        cold_table(results),
        "",
    ]
    if results.memory:
        parts += ["## Memory of idle warm instances\n", memory_table(results), ""]
    if results.rotation:
        parts += ["## Template rotation (namespace)\n",
                  "What replacing the namespace sandbox's template costs: Python cold starts on the "
                  "driver itself (`driver.create` and the first call, in the harness's process, no "
                  "HTTP), with the default limits and with the template replaced every few instances "
                  "(its replacement starts in the background during the next starts); compare the rows "
                  "with each other (`bench/rotation.py`).\n", rotation_table(results), ""]
    if results.init_once:
        parts += ["## Init once, fork many (namespace)\n",
                  "Cold starts of a Python function that sleeps 1 s at import, seen by the caller through "
                  "the HTTP API. With `init_once` (the default) the first call runs its own import while "
                  "the version template imports alongside; later cold starts, forced by concurrency "
                  "(calls that hold every instance, then the measured call), are forked from the "
                  "template. With `init_once: false` every cold start (forced by an update) imports "
                  "again. See docs/init-once.md (`bench/init_once.py`).\n", init_once_table(results), ""]
    if results.events:
        parts += ["## Asynchronous events\n",
                  "Accepted events per second at a concurrency (wrk, each answered 202 once its row is "
                  "committed; the events are then delivered), and the time from an event's acceptance to "
                  "the start of its delivery for an idle warm function (events sent one at a time, "
                  "timestamps of the event's row and of its first attempt; `bench/events.py`).\n",
                  events_table(results), ""]
    if results.density:
        parts += ["## Density\n",
                  f"Functions{X}instances each: every function is sent as many calls at once as it may have "
                  "instances, each holding its instance for 1 s, so each call needs an instance of its own; "
                  "then the same again, when every call must find an idle warm instance. PSS per instance "
                  "from `/proc/PID/smaps_rollup` of each instance's processes; the server's own RSS and PSS "
                  "after the first round (`bench/density.py`).\n", density_table(results), ""]
    if results.console:
        parts += ["## Web console\n",
                  "The first contentful paint of `/console/functions` with 1,000 functions in the "
                  "registry, each with 30 calls in the last hour (counts, p50/p99 and a sparkline per "
                  "row), in Debian's Chromium driven by Playwright, after one load that warms the "
                  "browser's cache "
                  "(`bench/console.py`).\n", console_table(results), ""]
    if any(r.system == IMPULS_TRACED for r in results.warm):
        parts += ["## Tracing\n",
                  "The warm Python rows with tracing off (the default: no `IMPULS_OTLP_ENDPOINT`, the "
                  "rows above) beside the same function on a second server with tracing on, exporting "
                  "over OTLP/HTTP to a no-op sink in the harness's process (its CPU counts as other "
                  "load). Off, each call only checks that there is no tracer; on, each warm call makes "
                  "two spans (`invoke <function>`, `runtime call`) that a BatchSpanProcessor encodes and "
                  "exports from a background thread of the server, whose CPU is in the server column.\n",
                  tracing_table(results), ""]
    if any(r.system == IMPULS_POSTGRES for r in results.warm) or results.propagation:
        parts += ["## SQLite and PostgreSQL\n",
                  "The warm Python rows on SQLite (the rows above) beside the same function on a server "
                  "whose store is a fresh PostgreSQL database (`--postgres-url`). The warm path reads no "
                  "database (the invocation record is written in the background), so the two should "
                  "differ only by noise.\n", stores_table(results), "",
                  "An update answered on one of two nodes sharing a PostgreSQL database, until the other "
                  "node serves the new code: from the answer to the send time of the other node's first "
                  "call that saw it (`bench/scale_out.py`; the change feed's NOTIFY, or its 0.5 s poll when "
                  "a notification is lost; the bound promised is 1 s).\n", propagation_table(results), ""]
    parts += ["## Where the time goes\n", *(p + "\n" for p in where_time_goes(results))]
    if results.notes:
        parts += ["## Notes from this run\n", *(f"- {n}" for n in results.notes), ""]
    parts.append(METHOD.format(
        prewarm=prewarm, warmup=warmup, duration=s["duration_s"],
        maxc=max([*s["concurrency"], s["cold_burst"]]),
        settle=int(s["settle_s"] * 1000), burst=s["cold_burst"], maxlevel=max(s["concurrency"])))
    return "\n".join(parts).rstrip() + "\n"
