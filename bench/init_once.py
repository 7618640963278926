"""Cold starts of a Python function whose module takes 1 s to import (docs/init-once.md).

Through the HTTP API of a namespace server of its own.  The function sleeps 1 s at
import; its first call runs that import while the version template runs it alongside
(once for every later instance).  Every later sample is
a cold start forced by concurrency, not by an update (an update would retire the
template): as many calls as the function has instances are sent first, each holding its
instance for ``HOLD_S``, and once they have had ``SETTLE_S`` to take them, the measured
call finds none idle and starts a new one -- forked from the template.  A sample whose
reply is not a cold start (a holder came late) is counted and left out.  The same
function with ``init_once: false`` gives the contrast: a few cold starts forced by an
update, each running the 1 s import.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

from bench.loadgen import Client
from bench.results import InitOnceRow, percentile
from bench.servers import ImpulsServer
from bench.workloads import EVENT, Workload

SLOW_INIT = ("import json, time\n\ntime.sleep(1)\n\n\n"
             "def handler(event, context):\n"
             "    time.sleep(event.get('hold', 0))\n"
             "    return {'ok': True}\n")
WORKLOAD = Workload("python3.11", "python, 1 s init", "handler.handler", SLOW_INIT)
#: the target (docs/init-once.md): p50 of a forked cold start
TARGET_MS = 30.0
HOLD_S = 0.4
SETTLE_S = 0.15
#: cold starts of the opted-out function (each takes its 1 s import)
OPTED_OUT_SAMPLES = 3


def measure(server: ImpulsServer, samples: int, budget_s: float, timeout: float) -> list[InitOnceRow]:
    return [_forked(server, samples, budget_s, timeout), _opted_out(server, timeout)]


def _forked(server: ImpulsServer, samples: int, budget_s: float, timeout: float) -> InitOnceRow:
    name = "init-once-1s"
    path = _create(server, name, samples + 2, init_once=True)
    client = Client(server.url, timeout)
    first_ms, _ = _call(client, path, EVENT)
    instances, not_cold = 1, 0
    cold_ms: list[float] = []
    hold = json.dumps({"hold": HOLD_S}).encode()
    deadline = time.monotonic() + budget_s
    with concurrent.futures.ThreadPoolExecutor(samples + 1) as pool:
        while len(cold_ms) < samples and time.monotonic() < deadline and instances <= samples:
            holders = [pool.submit(_call_once, server.url, path, hold, timeout) for _ in range(instances)]
            time.sleep(SETTLE_S)  # the holders take every idle instance
            elapsed_ms, cold = _call(client, path, EVENT)
            started = [cold, *(h.result()[1] for h in holders)]
            instances += sum(started)  # every cold start left one more instance
            if cold:
                cold_ms.append(elapsed_ms)
            else:
                not_cold += 1
    client.close()
    server.call("DELETE", f"/api/v1/functions/{name}")
    return InitOnceRow("init_once: true (forked from the version template)", True, len(cold_ms), first_ms,
                       percentile(cold_ms, 50), percentile(cold_ms, 99), not_cold, TARGET_MS)


def _opted_out(server: ImpulsServer, timeout: float) -> InitOnceRow:
    name = "init-once-1s-off"
    path = _create(server, name, 2, init_once=False)
    client = Client(server.url, timeout)
    first_ms, _ = _call(client, path, EVENT)
    cold_ms: list[float] = []
    not_cold = 0
    for serial in range(OPTED_OUT_SAMPLES):
        server.touch(name, serial)  # its instance goes: the next call is cold
        elapsed_ms, cold = _call(client, path, EVENT)
        if cold:
            cold_ms.append(elapsed_ms)
        else:
            not_cold += 1
    client.close()
    server.call("DELETE", f"/api/v1/functions/{name}")
    return InitOnceRow("init_once: false (every instance imports)", False, len(cold_ms), first_ms,
                       percentile(cold_ms, 50), percentile(cold_ms, 99), not_cold, TARGET_MS)


def _create(server: ImpulsServer, name: str, max_concurrency: int, init_once: bool) -> str:
    server.call("POST", "/api/v1/functions", {
        "name": name, "runtime": WORKLOAD.runtime, "handler": WORKLOAD.handler, "code": WORKLOAD.code,
        "memory_mb": 128, "max_concurrency": max_concurrency, "init_once": init_once,
    })
    return f"/api/v1/functions/{name}/invoke"


def _call(client: Client, path: str, body: bytes) -> tuple[float, bool]:
    """(milliseconds, whether it was a cold start) of one successful call."""
    status, doc, elapsed = client.request("POST", path, body)
    if status != 200 or not isinstance(doc, dict) or doc.get("status_code") != 200:
        raise RuntimeError(f"1 s-init call failed: HTTP {status}: {doc}")
    return elapsed * 1000, bool(doc.get("cold_start"))


def _call_once(url: str, path: str, body: bytes, timeout: float) -> tuple[float, bool]:
    client = Client(url, timeout)
    try:
        return _call(client, path, body)
    finally:
        client.close()
