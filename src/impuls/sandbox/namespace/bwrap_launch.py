"""The simple namespace-sandbox launcher: one ``bwrap`` per instance, the driver's
fallback where the template (:mod:`.template`) cannot run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path

from impuls.errors import SandboxStartFailed
from impuls.sandbox.base import INSTANCE_OPEN_FILES, InstanceSpec
from impuls.sandbox.namespace import bwrap, cgroups, seccomp
from impuls.sandbox.namespace.launch import (
    PIDS_MAX,
    SANDBOX_GID,
    SANDBOX_UID,
    Launched,
    LaunchFailed,
    bootstrap_path,
    close_fds,
    cpu_weight,
    sandbox_command,
    sandbox_env,
)
from impuls.sandbox.watch import ProcessWatch

PRLIMIT = "/usr/bin/prlimit"


class BwrapRuntime(ProcessWatch):
    """A runtime launched in its own bwrap: the bwrap process, watched."""

    error = ""
    lost = False

    def kill(self) -> bool:
        """SIGKILL the sandbox's pid 1 (bwrap's child), so that bwrap itself sees it
        die and exits: killing bwrap first would leave that child to the host's init."""
        for pid in _children(self.proc.pid):
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if pid in _children(self.proc.pid):  # still bwrap's child: not a recycled pid
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    return True
            except OSError:
                pass
            finally:
                os.close(pidfd)
        try:
            os.kill(self.proc.pid, signal.SIGKILL)  # our child: its pid cannot be reused yet
        except ProcessLookupError:
            return False
        return True


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


class BwrapLauncher:
    """One ``bwrap`` process per instance, started as the sandbox uid.

    bwrap reads its options from a pipe (``--args``); it is moved into the
    cgroup before the options are written, so everything it forks is born
    there.  It needs nothing but bwrap, but compared with the template it is
    slower (every start pays bwrap and the interpreter's start-up) and more
    demanding: the code directory and the socket must be reachable by the
    sandbox uid (bwrap resolves them as that uid), and TCP-only runtime
    clients get no relay.
    """

    name = "bwrap"

    def __init__(self, host: cgroups.CgroupHost, uid: int = SANDBOX_UID, gid: int = SANDBOX_GID) -> None:
        self.host = host
        self.uid, self.gid = uid, gid
        self._bootstraps: dict[Path, bytes] = {}

    def _bootstrap(self, path: Path) -> bytes:
        data = self._bootstraps.get(path)
        if data is None:
            data = self._bootstraps[path] = path.read_bytes()
        return data

    async def launch(self, spec: InstanceSpec, socket_path: Path) -> Launched:
        if not spec.runtime.unix_socket_client:
            raise LaunchFailed(f"runtime {spec.runtime.id} only speaks TCP: its loopback relay "
                               "needs the template launcher")
        argv = sandbox_command(spec)
        for path in (spec.code_dir, socket_path):
            blocker = unreachable(path, self.uid, self.gid)
            if blocker is not None:
                raise LaunchFailed(
                    f"{path} is not reachable by the sandbox uid {self.uid}: {blocker} is not "
                    "searchable by it (bwrap resolves it as that uid; chmod o+x that directory, "
                    "or use the template launcher, which does not need it)")
        cgroup = self.host.create(spec.instance_id, spec.memory_mb, PIDS_MAX, cpu_weight(spec.memory_mb))
        try:
            return Launched(self._spawn(spec, argv, cgroup, socket_path), cgroup)
        except BaseException:
            with contextlib.suppress(cgroups.CgroupError):
                await asyncio.to_thread(cgroup.remove)
            raise

    def _spawn(self, spec: InstanceSpec, argv: list[str], cgroup: cgroups.Cgroup,
               socket_path: Path) -> BwrapRuntime:
        fds: dict[str, int] = {}
        seccomp_fd = args_r = args_w = out_r = out_w = -1
        try:
            for path, data in bwrap.etc_files(self.uid, self.gid).items():
                fds[path] = bwrap.data_fd(data)
            inside = bootstrap_path(spec)
            if inside is not None and spec.runtime.bootstrap is not None:
                fds[inside] = bwrap.data_fd(self._bootstrap(spec.runtime.bootstrap))
            seccomp_fd = bwrap.data_fd(seccomp.build_filter_bpf())
            command = bwrap.build(bwrap.BwrapSpec(
                command=argv, code_dir=str(spec.code_dir),
                host_paths=spec.runtime.host_paths, runtime_socket=str(socket_path),
                tmp_mb=spec.ephemeral_storage_mb, uid=self.uid, gid=self.gid,
                env=sandbox_env(spec), seccomp_fd=seccomp_fd, data_fds=fds))
            args_r, args_w = os.pipe()
            out_r, out_w = os.pipe()
            argv, payload = command.argv_with_args_fd(args_r)
            # the function's limit on open files, not the server's (util-linux's prlimit execs
            # bwrap: the server may not set a limit of a process of another user)
            argv = [PRLIMIT, f"--nofile={INSTANCE_OPEN_FILES}:{INSTANCE_OPEN_FILES}", "--", *argv]
            proc = subprocess.Popen(
                argv, pass_fds=[args_r, seccomp_fd, *fds.values()], user=self.uid,
                group=self.gid, extra_groups=[], stdin=subprocess.DEVNULL, stdout=out_w,
                stderr=out_w, close_fds=True)
        except OSError as exc:
            close_fds(out_r, args_w)
            raise LaunchFailed(f"cannot start bwrap: {exc}") from exc
        finally:
            close_fds(args_r, seccomp_fd, out_w, *fds.values())
        try:
            cgroup.add_pid(proc.pid)  # bwrap is still waiting for its options
            _write_all(args_w, payload)
        except (OSError, SandboxStartFailed) as exc:
            proc.kill()
            proc.wait()
            close_fds(out_r)
            raise LaunchFailed(f"cannot start bwrap in its cgroup: {exc}") from exc
        finally:
            close_fds(args_w)
        return BwrapRuntime(proc, out_r)

    async def start(self) -> None:
        return None

    def cgroup_names(self) -> set[str]:
        return set()

    async def close(self) -> None:
        return None


def unreachable(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory above ``path`` that ``uid``/``gid`` (no other groups)
    may not search, or None when every one of them is searchable."""
    for parent in reversed(Path(os.path.abspath(path)).parents):
        try:
            st = parent.stat()
        except OSError:
            return parent
        bits = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bits:
            return parent
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
