"""The density row: many idle warm instances of many functions on one server, every one of them
then answering a warm call.

``functions`` Python functions, each allowed ``per_function`` instances, are each sent
``per_function`` calls at once that hold their instance for a moment, so every call gets an
instance of its own: ``functions * per_function`` instances, started as fast as the server
starts them.  Then each function gets ``per_function`` calls at once again: each must find an
idle warm instance (no cold start, no error).  Reported: the time to reach all instances, the
server's own memory (RSS and PSS of the server process), the PSS of each idle instance, and the
outcome of the warm round.
"""

from __future__ import annotations

import concurrent.futures
import json
import statistics
import threading
import time
from pathlib import Path

from bench.loadgen import Client
from bench.results import DensityRow
from bench.servers import ImpulsServer
from bench.sysinfo import instance_memory, pss_kib
from bench.workloads import Workload

#: holds its instance for ``hold`` seconds when asked (so that simultaneous calls need one each)
HOLDER = Workload(
    "python3.11", "python", "handler.handler",
    "import time\n\n\ndef handler(event, context):\n"
    "    time.sleep(event.get('hold', 0))\n    return {'ok': True}\n")
HOLD_S = 1.0
CLIENT_THREADS = 128


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _round(server: ImpulsServer, names: list[str], per_function: int, hold: float) -> list[dict[str, object]]:
    """``per_function`` simultaneous calls of each function (``CLIENT_THREADS`` at a time in all);
    each call's envelope (or ``{"error": ...}``)."""
    local = threading.local()
    body = json.dumps({"hold": hold}).encode()

    def call(name: str) -> dict[str, object]:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = Client(server.url, timeout=120)
        status, doc, _ = client.request("POST", f"/api/v1/functions/{name}/invoke", body)
        if status != 200 or not isinstance(doc, dict):
            return {"error": f"HTTP {status}: {str(doc)[:200]}"}
        return doc

    with concurrent.futures.ThreadPoolExecutor(CLIENT_THREADS) as pool:
        return list(pool.map(call, [n for n in names for _ in range(per_function)]))


def measure(work: Path, functions: int, per_function: int) -> DensityRow:
    total = functions * per_function
    server = ImpulsServer("namespace", work / "data-density", work / "impuls-density.log")
    server.start()
    try:
        names = [f"dense-{i:03d}" for i in range(functions)]
        for name in names:
            server.create(name, HOLDER, per_function)
        t0 = time.monotonic()
        first = _round(server, names, per_function, HOLD_S)
        reached_s = time.monotonic() - t0
        engine = server.call("GET", "/health")["engine"]
        memory = instance_memory(server.pid, ["bootstrap.py"]).instances["bootstrap.py"]
        server_pss, server_rss = pss_kib(server.pid) or 0, _rss_kib(server.pid)
        server_fds = len(list(Path(f"/proc/{server.pid}/fd").iterdir()))
        warm = _round(server, names, per_function, HOLD_S)
        errors = sum(1 for r in first + warm if "error" in r or r.get("status_code", 200) != 200)
        cold_in_warm = sum(1 for r in warm if r.get("cold_start"))
        return DensityRow(
            functions=functions, per_function=per_function, instances=int(engine["instances"]),
            idle=int(engine["idle"]), target=total, reach_s=reached_s,
            pss_per_instance_mib=statistics.mean(memory) / 1024 if memory else float("nan"),
            measured_instances=len(memory), server_pss_mib=server_pss / 1024,
            server_rss_mib=server_rss / 1024, server_fds=server_fds, errors=errors, warm_calls=len(warm),
            cold_in_warm=cold_in_warm)
    finally:
        server.stop()
