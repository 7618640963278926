"""How long a memory bomb in a microVM takes to end (a measurement of the benchmark tools, not a test).

    IMPULS_IMAGES_DIR=... .venv/bin/python -m bench.microvm_oom [--runs N] [--memory MB]
        [--timeout S] [--kind bytes|objects|child ...] [--progress] [--io]

For each kind, N instances (restored from the snapshot, made first if missing) each get one
bomb; prints, per bomb, the outcome and the seconds from the bomb's first allocation (the
guest's clock, which the driver syncs with the host's at load) to the host seeing the call end,
then the median.  ``--progress`` shows when each step of the bomb's output reached the host;
``--io`` samples what QEMU reads (the guest's disk reads) and its CPU time every second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

from impuls.errors import InvocationTimedOut, OutOfMemory, RuntimeExited
from impuls.runtimes import default_registry
from impuls.sandbox.base import InstanceSpec
from impuls.sandbox.microvm.driver import MicroVMDriver, MicroVMInstance
from impuls.sandbox.runtime_api import Invocation

BOMB = """
import os, sys, time
def eat(chunk, progress, t0):
    hog, i = [], 0
    while True:
        hog.append(b"x" * chunk if chunk else i)
        i += 1
        if progress and (chunk or i % 100000 == 0):
            print("step", i, round(time.time() - t0, 3), flush=True)
def handler(event, context):
    t0 = time.time()
    print("BOMB-START", t0, flush=True)
    kind, progress = event["kind"], event["progress"]
    if kind == "bytes":
        eat(1 << 20, progress, t0)
    if kind == "objects":
        eat(0, progress, t0)
    if kind == "child":
        if os.fork() == 0:
            eat(1 << 20, progress, t0)
        time.sleep(3600)
"""


async def sample_qemu(pid: int, t0: float, lines: list[str]) -> None:
    last = None
    while True:
        try:
            with open(f"/proc/{pid}/io") as fh:
                rchar = int(next(line for line in fh if line.startswith("rchar:")).split()[1])
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, StopIteration):
            return
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if last is not None:
            lines.append(f"    t+{time.time() - t0:5.1f} s  QEMU read {(rchar - last) / 2**20:6.1f} MB/s, "
                         f"cpu {cpu:6.1f} s")
        last = rchar
        await asyncio.sleep(1.0)


async def bomb(d: MicroVMDriver, base: InstanceSpec, kind: str, timeout: float, progress: bool,
               io: bool) -> tuple[str, float]:
    instance = await d.create(replace(base, instance_id=uuid.uuid4().hex[:16]))
    assert isinstance(instance, MicroVMInstance) and instance.vm is not None
    arrivals: list[tuple[float, bytes]] = []
    feed = instance.output.feed

    def spy(data: bytes) -> None:
        arrivals.append((time.time(), data))
        feed(data)

    instance.output.feed = spy  # type: ignore[method-assign]
    inv = Invocation(request_id=str(uuid.uuid4()),
                     payload=json.dumps({"kind": kind, "progress": progress}).encode(),
                     deadline_ms=int((time.time() + timeout) * 1000),
                     function_arn="arn:aws:lambda:us-east-1:000000000000:function:oom-timing")
    samples: list[str] = []
    t0 = time.time()
    sampler = None
    if io and instance.vm.qemu_pid is not None:
        sampler = asyncio.ensure_future(sample_qemu(instance.vm.qemu_pid, t0, samples))
    try:
        await instance.invoke(inv, timeout)
        outcome = "returned"
    except OutOfMemory:
        outcome = "oom"
    except InvocationTimedOut:
        outcome = "timeout"
    except RuntimeExited as exc:
        outcome = f"exited ({exc})"
    end = time.time()
    if sampler is not None:
        sampler.cancel()
    text = b"".join(data for _, data in arrivals).decode(errors="replace")
    start = next((float(line.split()[1]) for line in text.splitlines() if line.startswith("BOMB-START")),
                 float("nan"))
    if progress:
        for t, data in arrivals:
            for line in data.decode(errors="replace").splitlines():
                print(f"    reached the host at t+{t - t0:6.2f} s: {line}")
    for line in samples:
        print(line)
    console = instance.vm.diagnostics.peek().strip().splitlines() if instance.vm is not None else []
    for line in console[-4:]:
        print(f"    guest console: {line}")
    await instance.destroy()
    return outcome, end - start


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--memory", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--kind", action="append", choices=["bytes", "objects", "child"])
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--io", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="impuls-oom-timing-"))
    code = tmp / "code"
    code.mkdir()
    (code / "handler.py").write_text(BOMB)
    d = MicroVMDriver(tmp / "sandbox", images_dir=Path(os.environ["IMPULS_IMAGES_DIR"]))
    base = InstanceSpec(instance_id="", function_name="oom-timing", revision=1,
                        runtime=default_registry().resolve("python3.11"), handler="handler.handler",
                        code_dir=code, memory_mb=args.memory, ephemeral_storage_mb=512, environment={})
    try:
        await d.snapshots.ensure("python", args.memory)
        for kind in args.kind or ["bytes", "objects", "child"]:
            results = []
            for n in range(args.runs):
                outcome, seconds = await bomb(d, base, kind, args.timeout, args.progress, args.io)
                print(f"{kind} #{n}: {outcome}, {seconds:.2f} s from the first allocation to the end",
                      flush=True)
                results.append((outcome, seconds))
            times = [s for _, s in results]
            print(f"{kind}: median {statistics.median(times):.2f} s (min {min(times):.2f}, "
                  f"max {max(times):.2f}, n={len(times)}, {args.memory} MB), "
                  f"outcomes {sorted({o for o, _ in results})}\n", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
