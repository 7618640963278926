"""The ``microvm`` sandbox: a QEMU ``microvm`` virtual machine with its own kernel per instance.

:mod:`.driver` is the driver; :mod:`.vm` one QEMU process, :mod:`.link` the host end of
its serial link to the guest agent, :mod:`.snapshots` the runtime snapshots cold starts
restore; :mod:`.qemu` the VMM layer (argv, QMP, the KVM probe); :mod:`.jail` how QEMU is
confined (its uid, namespaces, files and seccomp filters); :mod:`.images` the guest
images it boots (built by :mod:`impuls.images`); :mod:`.codedisk` the per-version code disks.
"""

from __future__ import annotations

from pathlib import Path


def available(images_dir: Path) -> str | None:
    """None when microVMs can run here, else the reason they cannot."""
    from impuls.sandbox.microvm.images import ImageStore
    from impuls.sandbox.microvm.jail import unavailable
    from impuls.sandbox.microvm.qemu import qemu_binary

    if qemu_binary() is None:
        return "qemu-system-x86_64 is not installed (Debian package qemu-system-x86)"
    why = unavailable()
    if why:
        return why
    store = ImageStore(images_dir)
    missing = store.missing(["python"])
    if missing:
        return f"guest images missing in {store.root} ({', '.join(missing)}): run `impuls images build`"
    return None
