"""What one run measured (plain dataclasses, also dumped as JSON with ``--json``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

IMPULS = "impuls"
#: the same function called through AWS Lambda's Invoke, signed with Signature Version 4
IMPULS_LAMBDA = "impuls Lambda API"
#: the same function served through its function URL
IMPULS_URL = "impuls function URL"
#: the same function on a server with tracing on, exporting over OTLP/HTTP to a no-op sink
IMPULS_TRACED = "impuls traced"
#: the same function on a server whose store is PostgreSQL (``--postgres-url``) instead of SQLite
IMPULS_POSTGRES = "impuls on PostgreSQL"
#: the systems whose rows are told apart by sandbox
PER_SANDBOX = (IMPULS, IMPULS_LAMBDA, IMPULS_URL, IMPULS_TRACED, IMPULS_POSTGRES)
FLOOR = "floor"
FLOOR_FASTAPI = "floor + FastAPI"
SPAWN = "spawn-per-call"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0 to 100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class WarmRow:
    system: str  # IMPULS, FLOOR or SPAWN
    sandbox: str  # the Impuls sandbox, "-" for the baselines
    runtime: str  # "python" / "node"
    concurrency: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    rps: float
    errors: int  # socket errors, timeouts and non-2xx replies
    cpu_server_us: float  # CPU per invocation: the server process
    cpu_sandbox_us: float  # ... everything the server started (runtimes, sandboxes, spawned pythons)
    cpu_client_us: float  # ... the load generator
    other_cpu_pct: float = 0.0  # busy CPU not ours during the row, % of all cores (noise from others)

    @property
    def label(self) -> str:
        return f"{self.system} ({self.sandbox})" if self.sandbox != "-" else self.system


@dataclass
class ServerTime:
    """Sequential calls at concurrency 1 with a per-call client: what the server says it spent."""

    system: str
    sandbox: str
    runtime: str
    calls: int
    client_p50_ms: float
    duration_p50_ms: float  # the reply's duration_ms


@dataclass
class ColdRow:
    sandbox: str
    runtime: str
    samples: int
    client_p50_ms: float
    client_p99_ms: float
    server_p50_ms: float  # the reply's duration_ms (the server's view of the same call)
    server_p99_ms: float
    burst: int  # concurrent first calls after an update
    burst_cold: int  # how many of them reported cold_start
    burst_wall_ms: float
    not_cold: int = 0  # samples that unexpectedly reported cold_start false (excluded)

    @property
    def instances_per_s(self) -> float:
        return self.burst_cold / (self.burst_wall_ms / 1000) if self.burst_wall_ms else 0.0


@dataclass
class MemoryRow:
    sandbox: str
    runtime: str
    instances: int
    pss_mib_mean: float  # an instance's own processes (runtime, and e.g. its sandbox init)
    shared_mib: float = 0.0  # sandbox processes serving all instances (templates, spares), in total


@dataclass
class RotationRow:
    """Namespace Python cold starts in-process (``driver.create`` + first call, no HTTP) with
    the template replaced after ``max_forks`` instances (``bench/rotation.py``)."""

    label: str
    max_forks: int
    samples: int
    p50_ms: float
    p99_ms: float
    rotations: int  # templates replaced during the row


@dataclass
class InitOnceRow:
    """Cold starts of a Python function that sleeps 1 s at import (``bench/init_once.py``)."""

    label: str
    init_once: bool
    samples: int
    first_ms: float  # the function's first call (its version's init)
    p50_ms: float  # of the later cold starts
    p99_ms: float
    not_cold: int  # samples left out: they found a warm instance
    target_ms: float

    @property
    def met(self) -> bool | None:
        """The p50 is within the target (None: nothing measured)."""
        return None if not self.samples else self.p50_ms <= self.target_ms


@dataclass
class EventRow:
    """Asynchronous events on one store (``bench/events.py``)."""

    store: str  # sqlite | postgresql
    concurrency: int
    requests: int
    accepted_per_s: float
    errors: int
    delay_samples: int
    delay_p50_ms: float  # accept (committed) to the start of the delivery, idle warm function
    delay_p99_ms: float


@dataclass
class PropagationRow:
    """Updates answered on one node until another node serves them (``bench/scale_out.py``)."""

    sandbox: str
    updates: int
    p50_ms: float  # from the answer on node A to the send time of node B's first call seeing it
    max_ms: float


@dataclass
class ConsoleRow:
    """The web console's function list in Chromium (``bench/console.py``)."""

    functions: int  # in the registry, each with calls in the last hour
    loads: int
    first_paint_p50_ms: float
    first_paint_p99_ms: float


@dataclass
class DensityRow:
    """Many idle warm instances of many functions on one server (``bench/density.py``)."""

    functions: int
    per_function: int
    target: int  # functions * per_function
    instances: int  # live on the server after the first round
    idle: int
    reach_s: float  # from the first call until every call of the first round answered
    pss_per_instance_mib: float  # mean over the instances measured
    measured_instances: int
    server_pss_mib: float  # the server process itself
    server_rss_mib: float
    server_fds: int  # open file descriptors of the server process
    errors: int  # calls of either round that did not succeed
    warm_calls: int  # the second round
    cold_in_warm: int  # of those, calls that started an instance


@dataclass
class Results:
    machine: dict[str, str]
    command: str
    settings: dict[str, Any]
    warm: list[WarmRow] = field(default_factory=list)
    server_times: list[ServerTime] = field(default_factory=list)
    cold: list[ColdRow] = field(default_factory=list)
    memory: list[MemoryRow] = field(default_factory=list)
    rotation: list[RotationRow] = field(default_factory=list)  # the first row: the default limits
    init_once: list[InitOnceRow] = field(default_factory=list)  # namespace sandbox
    events: list[EventRow] = field(default_factory=list)
    console: list[ConsoleRow] = field(default_factory=list)
    density: list[DensityRow] = field(default_factory=list)
    propagation: list[PropagationRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sandboxes: list[str] = field(default_factory=list)  # the ones measured
    profile: list[tuple[str, float]] = field(default_factory=list)  # (component, share of samples)
    profile_note: str = ""
    ipc_rtt_us: dict[str, float] = field(default_factory=dict)  # round trip to an echo process

    def find_warm(self, system: str, runtime: str, concurrency: int, sandbox: str = "-") -> WarmRow | None:
        for row in self.warm:
            if (row.system, row.runtime, row.concurrency) == (system, runtime, concurrency) and (
                    system not in PER_SANDBOX or row.sandbox == sandbox):
                return row
        return None

    def find_cold(self, sandbox: str, runtime: str) -> ColdRow | None:
        return next((r for r in self.cold if (r.sandbox, r.runtime) == (sandbox, runtime)), None)

    def find_server_time(self, system: str, sandbox: str, runtime: str) -> ServerTime | None:
        return next((r for r in self.server_times
                     if (r.system, r.sandbox, r.runtime) == (system, sandbox, runtime)), None)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for row, doc in zip(self.cold, out["cold"], strict=True):
            doc["instances_per_s"] = row.instances_per_s
        return out
