"""The ``namespace`` sandbox: Linux namespaces (bubblewrap), cgroup limits and seccomp.

:mod:`.driver` is the driver; :mod:`.launch` starts one instance, from a
pre-initialised template (:mod:`.template`, :mod:`.zygote`, :mod:`.slots`) or
with one ``bwrap`` per instance (:mod:`.bwrap_launch`); :mod:`.bwrap`,
:mod:`.cgroups` and :mod:`.seccomp` are the isolation primitives.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys


@functools.cache
def available() -> str | None:
    """None when this host can run the ``namespace`` sandbox, else the reason it cannot.

    Needs Linux, root (cgroups; sandboxes are started as uid 993),
    bubblewrap, libseccomp, usable cgroups (v1 or v2) and user namespaces
    that an unprivileged uid may create -- checked by starting one real
    (empty) sandbox, once per process.
    """
    if sys.platform != "linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (to manage cgroups and start sandboxes as uid 993)"
    from impuls.sandbox.namespace import bwrap, cgroups, launch, seccomp

    if not os.access(bwrap.BWRAP, os.X_OK):
        return f"bubblewrap is not installed ({bwrap.BWRAP}; Debian package 'bubblewrap')"
    try:
        seccomp.build_filter_bpf()
        if cgroups.detect() is None:
            return "no usable cgroups (v2 with memory, pids and cpu, or v1 memory, pids and cpu)"
    except (seccomp.SeccompError, cgroups.CgroupError) as exc:
        return exc.message
    return _probe_bwrap(bwrap.build_argv(bwrap.BwrapSpec(
        command=["/usr/bin/true"], code_dir=None, uid=launch.SANDBOX_UID,
        gid=launch.SANDBOX_GID)), launch.SANDBOX_UID, launch.SANDBOX_GID)


def _probe_bwrap(argv: list[str], uid: int, gid: int) -> str | None:
    try:
        probe = subprocess.run(argv, user=uid, group=gid, extra_groups=[], capture_output=True,
                               stdin=subprocess.DEVNULL, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run bubblewrap as uid {uid}: {exc}"
    if probe.returncode != 0:
        detail = probe.stderr.decode("utf-8", "replace").strip() or f"exit status {probe.returncode}"
        return f"bubblewrap cannot create namespaces as uid {uid}: {detail}"
    return None
