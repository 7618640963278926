"""Building the ``microvm`` sandbox's guest images from Debian packages (``impuls images``).

* :mod:`impuls.images.builder` — ``impuls images build`` (kernel, initramfs, rootfs per runtime);
* :mod:`impuls.images.cli` — what the ``impuls images`` commands print.

The images directory itself (what the builder writes and the driver reads) is
:mod:`impuls.sandbox.microvm.images`.
"""
