"""How long an update answered on one node takes to reach another node on the same PostgreSQL
database: the row beside the warm rows on PostgreSQL (``--postgres-url``).

Two servers share a fresh database.  A function that returns its version is warm on both; each
round updates it on node A, then calls it on node B until B answers the new version.  The delay
is from A's answer to the *send* time of B's first call that saw the change (so the call's own
duration, a cold start with the new code, is not counted): what the change feed
(``impuls.cluster.changes``) takes, bounded by its 0.5 s poll when a notification is lost.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.results import PropagationRow, percentile
from bench.servers import ImpulsServer

CODE = "def handler(event, context):\n    return {{\"version\": {v}}}\n"
#: a guard against a node that never sees the change, not a bound on speed
GIVE_UP_S = 30.0


def _version(server: ImpulsServer, path: str) -> int | None:
    status, doc, _ = server.client.request("POST", path, b"{}")
    if status != 200 or not isinstance(doc, dict) or doc.get("status_code") != 200:
        raise RuntimeError(f"call on {server.url} failed: HTTP {status}: {doc}")
    body = doc["body"] if isinstance(doc["body"], dict) else json.loads(doc["body"])
    return int(body["version"])


def measure(sandbox: str, work: Path, database_url: str, updates: int) -> PropagationRow:
    """``updates`` rounds on two fresh servers sharing ``database_url``."""
    nodes = [ImpulsServer(sandbox, work / f"data-node-{i}", work / f"node-{i}.log", database_url=database_url)
             for i in range(2)]
    try:
        writer, reader = (node.start() for node in nodes)
        writer.call("POST", "/api/v1/functions", {"name": "propagation", "runtime": "python3.11",
                                                  "handler": "handler.handler", "code": CODE.format(v=0)})
        path = "/api/v1/functions/propagation/invoke"
        delays = []
        for version in range(1, updates + 1):
            for node in nodes:
                if _version(node, path) != version - 1:  # warm with the old code on both
                    raise RuntimeError(f"{node.url} does not serve version {version - 1}")
            writer.call("PATCH", "/api/v1/functions/propagation", {"code": CODE.format(v=version)})
            answered = time.perf_counter()
            while True:
                sent = time.perf_counter()
                if _version(reader, path) == version:
                    delays.append((sent - answered) * 1000)
                    break
                if sent - answered > GIVE_UP_S:
                    raise RuntimeError(f"{reader.url} still served version {version - 1} "
                                       f"after {GIVE_UP_S:g} s")
    finally:
        for node in nodes:
            node.stop()
    return PropagationRow(sandbox, len(delays), percentile(delays, 50), max(delays))
