#!/bin/sh
# Impuls microVM initramfs /init (busybox): load the virtio drivers, mount the
# runtime's root filesystem read-only and hand PID 1 over to the agent.
# `impuls.probe=1` on the kernel command line only proves the boot works
# (the host's acceleration probe) and powers off.
export PATH=/bin
mount -t devtmpfs dev /dev
mount -t proc -o hidepid=invisible proc /proc  # the function sees only its own processes
mount -t sysfs sys /sys
for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m.ko" || echo "impuls-init: insmod $m failed"
done
case " $(cat /proc/cmdline) " in
    *" impuls.probe=1 "*) echo "IMPULS-PROBE-OK"; poweroff -f ;;
esac
i=0
while [ ! -e /dev/vda ] && [ $i -lt 1000 ]; do i=$((i + 1)); sleep 0.01; done
if ! mount -t ext4 -o ro /dev/vda /newroot; then
    echo "impuls-init: cannot mount the root filesystem"
    poweroff -f
fi
# The code disk (romfs; see impuls.images.codedisk) is mounted now, before any snapshot:
# task/ is the function's code at /var/task, pycache/ its precompiled Python.
i=0
while [ ! -e /dev/vdb1 ] && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.01; done
if mount -t romfs -o ro,nosuid,nodev /dev/vdb1 /newroot/var/impuls-code 2>/dev/null; then
    mount --bind /newroot/var/impuls-code/task /newroot/var/task
else
    echo "impuls-init: the code disk is not romfs (the agent mounts it later)"
fi
mount -t tmpfs -o mode=0755,nosuid,nodev,size=16m run /newroot/run
mount -t tmpfs -o mode=1777,nosuid,nodev,size=1m tmp /newroot/tmp  # until the agent mounts /dev/vdc
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
export LANG=C.UTF-8 HOME=/root
exec switch_root /newroot /usr/bin/python3 /opt/impuls/agent.py
