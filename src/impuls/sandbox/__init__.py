"""Sandbox drivers behind one interface (:mod:`impuls.sandbox.base`), and choosing one.

``make_driver(settings, runtimes)``:

* ``process``: :class:`~impuls.sandbox.process.ProcessDriver` (unsafe, development only);
* ``namespace``: :class:`~impuls.sandbox.namespace.driver.NamespaceDriver`, or
  :class:`~impuls.errors.ConfigError` naming what the host lacks (see
  :func:`impuls.sandbox.namespace.available`);
* ``microvm``: :class:`~impuls.sandbox.microvm.driver.MicroVMDriver`, or
  :class:`~impuls.errors.ConfigError` naming what is missing (QEMU, images);
* ``auto``: the strongest the host supports -- ``microvm`` where KVM works
  and its images are built, else ``namespace`` when available, else
  ``process`` with a warning that says why.
"""

from __future__ import annotations

import logging

from impuls.config import Settings
from impuls.errors import ConfigError
from impuls.runtimes import RuntimeRegistry
from impuls.sandbox import microvm, namespace
from impuls.sandbox.base import SandboxDriver
from impuls.sandbox.process import ProcessDriver

log = logging.getLogger("impuls.sandbox")


def make_driver(settings: Settings, runtimes: RuntimeRegistry) -> SandboxDriver:
    """The driver for ``settings.sandbox``; ``auto`` picks the strongest this host supports.

    ``auto`` takes ``microvm`` only where its guest images are built and KVM
    really works: under software emulation (TCG) a VM is far too slow to be
    a default, so it then takes ``namespace`` (and says why); ``process`` is
    the last resort, with a warning.
    """
    kind, work_dir = settings.sandbox, settings.data_dir / "sandbox"
    if kind == "process":
        return ProcessDriver(work_dir / "process")
    images = settings.images_path
    if kind == "microvm" or (kind == "auto" and microvm.available(images) is None):
        from impuls.sandbox.microvm.driver import MicroVMDriver

        vm = MicroVMDriver(work_dir / "microvm", images, accel=settings.microvm_accel,
                           snapshots=settings.microvm_snapshots)
        if kind == "microvm" or vm.accel.accel == "kvm":
            return vm
        log.warning("microvm would run under TCG (software emulation) here: 'auto' uses the "
                    "namespace sandbox; pass --sandbox microvm to use VMs anyway")
    reason = namespace.available()
    if reason is None:
        from impuls.sandbox.namespace.driver import NamespaceDriver

        return NamespaceDriver(work_dir / "namespace", runtimes,
                               template_max_forks=settings.template_max_forks,
                               template_max_age=settings.template_max_age)
    if kind == "namespace":
        raise ConfigError(f"sandbox 'namespace' is not available on this host: {reason}")
    log.warning("no isolating sandbox is available on this host (namespace: %s); "
                "using 'process'", reason)
    return ProcessDriver(work_dir / "process")
