"""Guest images for the ``microvm`` sandbox, built by Impuls from Debian packages.

* :mod:`impuls.images.store` — the images directory and its manifest;
* :mod:`impuls.images.builder` — ``impuls images build`` (kernel, initramfs, rootfs per runtime);
* :mod:`impuls.images.qemu` — how the images boot (QEMU microvm) and the KVM probe;
* :mod:`impuls.images.cli` — what the ``impuls images`` commands print.
"""

from impuls.images.store import GUEST_RUNTIMES, ImageStore, default_images_dir

__all__ = ["GUEST_RUNTIMES", "ImageStore", "default_images_dir"]
