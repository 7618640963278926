"""Sandbox drivers behind one interface (:mod:`impuls.sandbox.base`), and choosing one.

``make_driver(kind, work_dir)``:

* ``process``: :class:`~impuls.sandbox.process.ProcessDriver` (unsafe, development only);
* ``namespace``: :class:`~impuls.sandbox.namespace.NamespaceDriver`, or
  :class:`~impuls.errors.ConfigError` naming what the host lacks (see
  :func:`namespace_available`);
* ``microvm``: :class:`~impuls.sandbox.microvm.MicroVMDriver`, or
  :class:`~impuls.errors.ConfigError` naming what is missing (QEMU, images);
* ``auto``: the strongest the host supports -- ``microvm`` where KVM works
  and its images are built, else ``namespace`` when available, else
  ``process`` with a warning that says why.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from pathlib import Path

from impuls.errors import ConfigError
from impuls.sandbox.base import SandboxDriver
from impuls.sandbox.process import ProcessDriver

log = logging.getLogger("impuls.sandbox")


@functools.cache
def namespace_available() -> str | None:
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
    from impuls.sandbox import bwrap, cgroups, launch, seccomp

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


def microvm_available(images_dir: Path | None = None) -> str | None:
    """None when this host can run the ``microvm`` sandbox, else the reason (QEMU, images).

    ``images_dir`` defaults to ``IMPULS_IMAGES_DIR`` or ``<data dir>/images``.
    """
    from impuls.images import default_images_dir
    from impuls.sandbox.microvm import available

    return available(images_dir or default_images_dir())


def make_driver(kind: str, work_dir: Path) -> SandboxDriver:
    """The driver for ``kind``; ``auto`` picks the strongest this host supports.

    ``auto`` takes ``microvm`` only where its guest images are built and KVM
    really works: under software emulation (TCG) a VM is far too slow to be
    a default, so it then takes ``namespace`` (and says why); ``process`` is
    the last resort, with a warning.
    """
    if kind == "process":
        return ProcessDriver(work_dir / "process")
    from impuls.images import default_images_dir

    images = default_images_dir(work_dir.parent)
    if kind == "microvm" or (kind == "auto" and microvm_available(images) is None):
        from impuls.sandbox.microvm import MicroVMDriver

        vm = MicroVMDriver(work_dir / "microvm", images_dir=images)
        if kind == "microvm" or vm.accel.accel == "kvm":
            return vm
        log.warning("microvm would run under TCG (software emulation) here: 'auto' uses the "
                    "namespace sandbox; pass --sandbox microvm to use VMs anyway")
    reason = namespace_available()
    if reason is None:
        from impuls.sandbox.namespace import NamespaceDriver

        return NamespaceDriver(work_dir / "namespace")
    if kind == "namespace":
        raise ConfigError(f"sandbox 'namespace' is not available on this host: {reason}")
    log.warning("no isolating sandbox is available on this host (namespace: %s); "
                "using 'process'", reason)
    return ProcessDriver(work_dir / "process")
