"""Starting one namespace-sandbox instance: the launcher interface and what launchers share."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from impuls.errors import SandboxStartFailed
from impuls.sandbox.base import InstanceSpec, RuntimeWatch
from impuls.sandbox.namespace import bwrap, cgroups

SANDBOX_UID = SANDBOX_GID = 993
PIDS_MAX = 256
API_ADDRESS = "127.0.0.1:9001"
SOCKET_ENV = "IMPULS_RUNTIME_API_SOCKET"
RUNTIME_DIR = "/var/runtime"
TMP_DIR = "/tmp"
LAMBDA_MB_PER_VCPU = 1769


class LaunchFailed(SandboxStartFailed):
    """The sandboxed runtime process could not be started (launchers raise it and
    its subclasses, never ``OSError``)."""


class LauncherUnavailable(LaunchFailed):
    """This way of starting sandboxes does not work on this host (another may: the
    driver then falls back to one bwrap per instance)."""


class SandboxLost(LaunchFailed):
    """The sandbox died before it received the function (worth one retry)."""


def cpu_weight(memory_mb: int) -> int:
    """CPU weight (100 = one full share) proportional to memory, as on Lambda."""
    return max(1, min(10000, memory_mb * 100 // LAMBDA_MB_PER_VCPU))


def sandbox_env(spec: InstanceSpec) -> dict[str, str]:
    """The complete environment of the runtime inside the sandbox (the socket
    variable only for clients that speak HTTP over a unix socket)."""
    env = spec.runtime_environment(API_ADDRESS, bwrap.TASK_DIR, TMP_DIR)
    if spec.runtime.unix_socket_client:
        env[SOCKET_ENV] = bwrap.RUNTIME_SOCKET
    return env


def bootstrap_path(spec: InstanceSpec) -> str | None:
    """Where the runtime client file is inside the sandbox (None: the package brings one)."""
    bootstrap = spec.runtime.bootstrap
    return None if bootstrap is None else f"{RUNTIME_DIR}/{bootstrap.name}"


def sandbox_command(spec: InstanceSpec) -> list[str]:
    """argv of the runtime inside the sandbox; LaunchFailed if its interpreter is missing."""
    interpreter = spec.runtime.interpreter
    if interpreter is not None and not os.path.isfile(interpreter):
        raise LaunchFailed(f"interpreter {interpreter} of {spec.runtime.id} is not installed")
    return spec.runtime.command(bwrap.TASK_DIR, bootstrap_path(spec))


# --- a started instance -------------------------------------------------------------


class LaunchedRuntime(RuntimeWatch, Protocol):
    """The runtime a launcher started: its exit and output (a :class:`RuntimeWatch`), and
    the means to end it."""

    #: why building the sandbox failed, when the launcher learns it after ``launch``
    error: str

    @property
    def lost(self) -> bool:
        """True when the sandbox died before it took the function (nothing of it ran)."""
        ...

    def kill(self) -> bool:
        """SIGKILL the instance's top process (its pid namespace then collapses);
        False when there is none to signal (the cgroup sweep does it all)."""

    async def wait_closed(self) -> None: ...


@dataclass(frozen=True)
class Launched:
    """A started instance: its runtime and the cgroup that holds all of its processes
    (from before their first instruction)."""

    runtime: LaunchedRuntime
    cgroup: cgroups.Cgroup
    #: how it was started, when that is worth a line in the invocation record
    note: str = ""


class Launcher(Protocol):
    """Starts the runtime of one instance inside fresh namespaces and a cgroup of its own.

    Two exist, giving the runtime the same view:
    :class:`~impuls.sandbox.namespace.template.TemplateLauncher` (fork from a
    pre-initialised template; the default) and
    :class:`~impuls.sandbox.namespace.bwrap_launch.BwrapLauncher` (one ``bwrap``
    per instance).
    """

    name: str

    async def launch(self, spec: InstanceSpec, socket_path: Path) -> Launched:
        """Start it (every process in the cgroup before it runs anything); raise a
        SandboxStartFailed subclass, leaving nothing behind."""
        ...

    async def start(self) -> None:
        """Prepare shared state ahead of the first launch (optional)."""

    def cgroup_names(self) -> set[str]:
        """Cgroups of the launcher's own (kept by ``reap_orphans``)."""
        ...

    async def close(self) -> None: ...


def close_fds(*fds: int) -> None:
    """Close each descriptor that is >= 0, ignoring errors."""
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
