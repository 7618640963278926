"""The ``process`` driver: one child process per instance, on the host.

UNSAFE FOR UNTRUSTED CODE.  The function runs as the server's user with the
host's filesystem and network in view.  What it does get: its own process
group, a clean environment (never the server's), its own scratch directory
as TMPDIR and working files, and rlimits derived from ``memory_mb``.  For
development only; the ``namespace`` and ``microvm`` drivers contain code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from impuls.errors import SandboxStartFailed
from impuls.sandbox.base import INSTANCE_OPEN_FILES, Instance, InstanceSpec, SandboxDriver, WatchedInstance
from impuls.sandbox.runtime_api import RuntimeAPI
from impuls.sandbox.watch import PidFile, ProcessWatch, kill_tree

log = logging.getLogger("impuls.sandbox.process")

INIT_TIMEOUT = 30.0


class ProcessInstance(WatchedInstance):
    watch: ProcessWatch

    def __init__(self, spec: InstanceSpec, api: RuntimeAPI, proc: subprocess.Popen[bytes],
                 watch: ProcessWatch, scratch: Path, pidfile: PidFile) -> None:
        super().__init__(spec, api, watch)
        self.proc = proc
        self.scratch = scratch
        self.pidfile = pidfile

    async def _teardown(self) -> None:
        kill_tree(self.proc.pid)
        await self.watch.wait_closed()
        self.pidfile.remove()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _limit(pid: int, memory_mb: int) -> None:
    """rlimits for a process driver child (best effort; the child may already be gone)."""
    data = (memory_mb + 64) * 1024 * 1024
    with contextlib.suppress(OSError, ValueError):
        resource.prlimit(pid, resource.RLIMIT_DATA, (data, data))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (INSTANCE_OPEN_FILES, INSTANCE_OPEN_FILES))
        resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))


class ProcessDriver(SandboxDriver):
    """Runs each instance as a child process of the server (unsafe, development only)."""

    name = "process"
    unsafe = True

    def __init__(self, work_dir: Path) -> None:
        self.scratch_root = work_dir / "scratch"
        self.run_dir = work_dir / "run"
        self.scratch_root.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    async def create(self, spec: InstanceSpec) -> Instance:
        api = RuntimeAPI()
        scratch = self.scratch_root / spec.instance_id
        proc: subprocess.Popen[bytes] | None = None
        try:
            address = await api.listen_tcp()
            scratch.mkdir(mode=0o700)
            env = spec.runtime_environment(address, str(spec.code_dir), str(scratch))
            read_fd, write_fd = os.pipe()
            try:
                proc = subprocess.Popen(
                    spec.runtime.command(str(spec.code_dir)), cwd=spec.code_dir, env=env,
                    stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
                    start_new_session=True, close_fds=True,
                )
            finally:
                os.close(write_fd)
            _limit(proc.pid, spec.memory_mb)
            pidfile = PidFile.write(self.run_dir, spec.instance_id, proc.pid)
            watch = ProcessWatch(proc, read_fd)
        except OSError as exc:
            api.close()
            if proc is not None:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            shutil.rmtree(scratch, ignore_errors=True)
            raise SandboxStartFailed(f"cannot start {spec.runtime.id} runtime: {exc}") from exc
        instance = ProcessInstance(spec, api, proc, watch, scratch, pidfile)
        await instance.ready_or_destroyed(INIT_TIMEOUT)
        return instance

    async def reap_orphans(self) -> int:
        count = PidFile.reap_all(self.run_dir)
        for leftover in self.scratch_root.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        return count

    def describe(self) -> dict[str, Any]:
        return {"sandbox": self.name, "unsafe": True,
                "isolation": "none: a host process (unsafe for untrusted code)"}

