#!/bin/busybox sh
# PID 1 of the power-cut guest (busybox-static initramfs). The mode comes
# from the kernel command line (outpost.mode=…); the host reads the markers
# this prints on the serial console (ttyS0).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() { echo "$*" > /dev/ttyS0; }
halt_now() { sync; poweroff -f; sleep 60; }

mode=run; nonce=x
for w in $(cat /proc/cmdline); do
  case "$w" in
    outpost.mode=*) mode=${w#outpost.mode=} ;;
    outpost.nonce=*) nonce=${w#outpost.nonce=} ;;
  esac
done
say "OUTPOST-INIT mode=$mode"
[ "$mode" = probe ] && halt_now

# Virtio drivers are modules in Debian's cloud kernel; this order resolves
# their dependencies.
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk failover net_failover virtio_net; do
  insmod /lib/modules/$m.ko || say "OUTPOST-FAIL insmod $m"
done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 500 ]; do usleep 10000; i=$((i+1)); done
[ -b /dev/vda ] || { say "OUTPOST-FAIL no /dev/vda"; halt_now; }
case "$mode" in
selftest)
  # Harness self-test on the raw disk: no filesystem is mounted, so nothing
  # in the guest (a journal commit, lazy inode-table init) can send a flush
  # after the last write. An O_DIRECT write + fsync of the block device
  # (a flush) must survive a cut; the O_DIRECT write after it, never
  # flushed, must be lost. Reading both back with O_DIRECT before the cut
  # shows the second write did reach the virtual disk's cache.
  (printf "SYNCED-%s\n" "$nonce"; dd if=/dev/zero bs=4000 count=1 2>/dev/null) | dd of=/tmp/m1 bs=4096 count=1 conv=sync 2>/dev/null
  (printf "UNSYNCED-%s\n" "$nonce"; dd if=/dev/zero bs=4000 count=1 2>/dev/null) | dd of=/tmp/m2 bs=4096 count=1 conv=sync 2>/dev/null
  dd if=/tmp/m1 of=/dev/vda bs=4096 count=1 seek=0 conv=notrunc,fsync oflag=direct 2>/dev/null || say "OUTPOST-FAIL synced write"
  dd if=/tmp/m2 of=/dev/vda bs=4096 count=1 seek=256 conv=notrunc oflag=direct 2>/dev/null || say "OUTPOST-FAIL unsynced write"
  say "OUTPOST-READBACK=$(dd if=/dev/vda bs=4096 count=1 skip=256 iflag=direct 2>/dev/null | head -n 1 | tr -cd 'A-Za-z0-9-')"
  say "OUTPOST-SELFTEST-WRITTEN"
  while true; do sleep 3600; done
  ;;
selftest-check)
  say "OUTPOST-SYNCED=$(dd if=/dev/vda bs=4096 count=1 skip=0 iflag=direct 2>/dev/null | head -n 1 | tr -cd 'A-Za-z0-9-')"
  say "OUTPOST-UNSYNCED=$(dd if=/dev/vda bs=4096 count=1 skip=256 iflag=direct 2>/dev/null | head -n 1 | tr -cd 'A-Za-z0-9-')"
  say "OUTPOST-SELFTEST-READ"
  halt_now
  ;;
esac

# A read-write mount replays the ext4 journal after a cut.
mount -t ext4 /dev/vda /mnt || { say "OUTPOST-FAIL mount"; halt_now; }
say "OUTPOST-MOUNTED"

# The appliance, as the box runs it.
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
export OUTPOST_SITE__DATA_DIR=/mnt/data OUTPOST_SITE__ID=powercut-vm
export OUTPOST_HTTP__LISTEN=0.0.0.0:8080 OUTPOST_MQTT__LISTEN=0.0.0.0:1883
export OUTPOST_LIMITS__PER_SECOND=1000000 OUTPOST_LIMITS__PER_MINUTE=100000000 OUTPOST_LIMITS__PER_HOUR=1000000000
export RUST_LOG=warn
/bin/outpost run > /dev/ttyS0 2>&1 &
pid=$!
say "OUTPOST-STARTED pid=$pid"
if [ "$mode" = final ]; then
  # Clean shutdown for the host-side checks: wait until it serves, SIGTERM
  # (drain, close the log), unmount (flushes), power off.
  i=0; while ! wget -q -O /dev/null http://127.0.0.1:8080/healthz 2>/dev/null; do
    kill -0 $pid 2>/dev/null || break; usleep 100000; i=$((i+1)); [ $i -gt 600 ] && break
  done
  kill -TERM $pid
  wait $pid
  say "OUTPOST-EXIT rc=$?"
  umount /mnt && say "OUTPOST-UMOUNTED"
  halt_now
fi
wait $pid
say "OUTPOST-EXIT rc=$?"
while true; do sleep 3600; done
