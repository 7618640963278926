"""What replacing the namespace sandbox's template costs (``TemplateLauncher`` rotation).

Python cold starts on the namespace driver itself, in the harness's process: a new
instance (``driver.create``) and its first call, timed together, then the instance is
destroyed and, after ``settle_s``, the next one starts.  Two rows, one after the other
and measured alike: the default limits (no rotation within a row) and a template
replaced every ``ROTATE_EVERY`` instances, whose replacement (a template start, ~50 ms
of CPU, and a new pool of slots) runs in the background during the following starts.
No HTTP: compare the two rows with each other, not with the HTTP cold-start row.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from bench.results import RotationRow, percentile
from bench.workloads import EVENT, EXPECTED_BODY, PYTHON

#: the rotating row replaces its template after this many instances
ROTATE_EVERY = 4
CALL_TIMEOUT = 30.0


async def measure(work: Path, samples: int, settle_s: float, budget_s: float) -> list[RotationRow]:
    from impuls.runtimes import default_registry
    from impuls.sandbox.base import InstanceSpec
    from impuls.sandbox.namespace.driver import NamespaceDriver
    from impuls.sandbox.namespace.template import TEMPLATE_MAX_AGE, TEMPLATE_MAX_FORKS
    from impuls.sandbox.runtime_api import Invocation

    registry = default_registry()
    runtime = registry.resolve(PYTHON.runtime)
    code = work / "rotation-code"
    code.mkdir(mode=0o755)
    (code / "handler.py").write_text(PYTHON.code)
    (code / "handler.py").chmod(0o644)
    rows = []
    for label, max_forks in ((f"after {TEMPLATE_MAX_FORKS:,} instances or {TEMPLATE_MAX_AGE:g} s (default)",
                              TEMPLATE_MAX_FORKS),
                             (f"every {ROTATE_EVERY} instances", ROTATE_EVERY)):
        driver = NamespaceDriver(work / f"rotation-{max_forks}", registry, template_max_forks=max_forks)
        times_ms: list[float] = []
        try:
            await driver.start()  # the template and its pool, as a server has them
            deadline = time.monotonic() + budget_s
            while len(times_ms) < samples and time.monotonic() < deadline:
                spec = InstanceSpec(instance_id=uuid.uuid4().hex[:16], function_name="bench-rotation",
                                    revision=1, runtime=runtime, handler=PYTHON.handler, code_dir=code,
                                    memory_mb=128, ephemeral_storage_mb=512, environment={})
                started = time.perf_counter()
                instance = await driver.create(spec)
                try:
                    reply = await instance.invoke(Invocation(
                        uuid.uuid4().hex, EVENT, int((time.time() + CALL_TIMEOUT) * 1000),
                        "arn:aws:lambda:us-east-1:000000000000:function:bench-rotation"), CALL_TIMEOUT)
                    elapsed = time.perf_counter() - started
                finally:
                    await instance.destroy()
                if not reply.ok or json.loads(reply.body) != EXPECTED_BODY:
                    raise RuntimeError(f"rotation row {label}: the call failed: {reply.body[:200]!r}")
                times_ms.append(elapsed * 1000)
                await asyncio.sleep(settle_s)
            rotations = int(getattr(driver.launcher, "rotations", 0))
        finally:
            await driver.close()
        rows.append(RotationRow(label, max_forks, len(times_ms), percentile(times_ms, 50),
                                percentile(times_ms, 99), rotations))
    return rows
