#!/bin/bash
# Build the domsnap Debian test guest: a small Debian 12 (debootstrap
# minbase + systemd + the cloud kernel) in a qcow2 disk that firmware boots,
# as a user's HVM guest would be. One disk boots both ways:
#   - SeaBIOS: syslinux's MBR code -> the active FAT partition's syslinux;
#   - OVMF: the same FAT partition (type EF, an ESP) holds systemd-boot as
#     EFI/BOOT/BOOTX64.EFI, the removable-media path firmware looks for.
# Both load the same kernel and initramfs from that partition; the root is
# ext4 on partition 2 (built with mke2fs -d: no mount, no loop device).
#
# The guest runs the test guest's self-check (guest/init's counter and disk
# loop) as the systemd unit domsnap-check.service on /dev/ttyS0, on the data
# disks /dev/vd[b-z] (vda is its own root), once the boot is done. At start the unit also prints
# `EFIVAR <n>` (the UEFI variable DomsnapBoot, or `none`) and, under UEFI,
# writes n+1 there: a boot counter that lives in the firmware's NVRAM.
#
# Output (in ${DOMSNAP_DEBIAN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/domsnap/debian}):
#   disk.qcow2 (never written by tests: they use an overlay), stamp.
# stdout: `disk=PATH`; progress on stderr. Cached: rebuilt only when this
# script, guest/init, scripts/lib/debs.sh or the resolved kernel change.
#
# Environment:
#   DOMSNAP_DEBIAN_DIR      output directory (see above)
#   DOMSNAP_DEBIAN_FORCE=1  rebuild even if the stamp matches
#   DOMSNAP_DEBIAN_MIRROR   Debian mirror (default: the host's bookworm URI)
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
SRC_DIR=$(dirname "$SELF")
REPO=$(cd "$SRC_DIR/../.." && pwd)
INIT_SRC=$REPO/guest/init
OUT=${DOMSNAP_DEBIAN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/domsnap/debian}
SUITE=bookworm
META_PKG=linux-image-cloud-amd64
# debootstrap adds these to minbase. busybox runs guest/init's loop (usleep,
# and its dd's O_DIRECT behaviour); udev names the disks for systemd.
ROOT_PKGS=(systemd systemd-sysv udev "$META_PKG" initramfs-tools busybox)
ESP_MIB=48
DISK_MIB=1024
CMDLINE="root=/dev/vda2 rw console=ttyS0 quiet loglevel=1 systemd.show_status=0 panic=-1"

log() { printf 'guest/debian/build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
DEBS_LIB=$REPO/scripts/lib/debs.sh
# shellcheck source=../../scripts/lib/debs.sh
. "$DEBS_LIB"

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

finish() { printf 'disk=%s\n' "$OUT/disk.qcow2"; exit 0; }

SCRIPT_SHA=$(cat "$SELF" "$DEBS_LIB" "$INIT_SRC" | sha_of -)
KVER=$(apt-cache policy "$META_PKG" 2>/dev/null | sed -n 's/^ *Candidate: //p')
[[ -n $KVER && $KVER != "(none)" ]] || die "$META_PKG is not known to apt: run 'apt-get update' (as root)"
KEY="v1 build=$SCRIPT_SHA $META_PKG=$KVER"
if [[ ${DOMSNAP_DEBIAN_FORCE:-0} != 1 && -s $OUT/disk.qcow2 && -s $OUT/stamp && $(<"$OUT/stamp") == "$KEY" ]]; then
    finish
fi
[[ $(id -u) == 0 ]] || die "building the Debian guest needs root (debootstrap, chroot)"
for t in debootstrap mke2fs mkfs.vfat mcopy syslinux sfdisk qemu-img; do
    have "$t" || die "missing $t: run scripts/setup"
done
for f in /usr/lib/syslinux/mbr/mbr.bin /usr/lib/systemd/boot/efi/systemd-bootx64.efi; do
    [[ -s $f ]] || die "missing $f: run scripts/setup"
done

mirror() { bookworm_mirror "${DOMSNAP_DEBIAN_MIRROR:-}"; }

T0=$(date +%s)
TMP=$(mktemp -d "$OUT/.build.XXXXXX")
cleanup() {
    mountpoint -q "$TMP/root/proc" 2>/dev/null && umount -l "$TMP/root/proc"
    rm -rf "$TMP"
}
trap cleanup EXIT
root=$TMP/root
inroot() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive chroot "$root" "$@"; }

# The initramfs needs only virtio's disk path; a small one boots faster under TCG.
mkdir -p "$root/etc/initramfs-tools/conf.d"
log "debootstrap $SUITE minbase + ${ROOT_PKGS[*]} from $(mirror)"
mkdir -p "$OUT/debcache"
debootstrap --variant=minbase --cache-dir="$OUT/debcache" --include="$(IFS=,; echo "${ROOT_PKGS[*]}")" \
    "$SUITE" "$root" "$(mirror)" >"$TMP/debootstrap.log" 2>&1 || {
    tail -n 30 "$TMP/debootstrap.log" >&2
    die "debootstrap failed (log above)"
}
log "debootstrap done ($(($(date +%s) - T0)) s)"

printf 'MODULES=list\nCOMPRESS=gzip\n' >"$root/etc/initramfs-tools/conf.d/domsnap"
printf 'virtio_pci\nvirtio_blk\next4\n' >>"$root/etc/initramfs-tools/modules"
inroot update-initramfs -u -k all >&2 || die "update-initramfs failed"

# The self-check: guest/init's loop on the data disks, as a unit.
mkdir -p "$root/opt/bb" "$root/lib/modules/domsnap" "$root/usr/local/sbin"
inroot /bin/busybox --install -s /opt/bb
: >"$root/lib/modules/domsnap/load.order"
sed -e 's#^export PATH=/bin$#export PATH=/opt/bb#' -e 's#/dev/vda#/dev/vdb#g' -e 's#/dev/vd\[a-z\]#/dev/vd[b-z]#g' \
    "$INIT_SRC" >"$root/usr/local/sbin/domsnap-check"
grep -q '^export PATH=/opt/bb$' "$root/usr/local/sbin/domsnap-check" && grep -q '/dev/vd\[b-z\]' "$root/usr/local/sbin/domsnap-check" ||
    die "guest/init no longer has the PATH and /dev/vd[a-z] this script adapts"
cat >"$root/usr/local/sbin/domsnap-efivar" <<'EOS'
#!/bin/sh
# Print the UEFI boot counter DomsnapBoot (or "none"), then store n+1 there.
v=/sys/firmware/efi/efivars/DomsnapBoot-5a8c4a52-0d87-4b3e-9f3c-6a1d1e2b7c40
if [ ! -d /sys/firmware/efi ]; then echo "EFIVAR nouefi" >/dev/console; exit 0; fi
n=none
# Through a pipe: efivarfs reports a size of 0 until a file is read (6.1).
[ -e "$v" ] && n=$(cat "$v" | tail -c +5)
echo "EFIVAR $n" >/dev/console
case $n in none) n=0 ;; esac
[ -e "$v" ] && chattr -i "$v" 2>/dev/null
# Attributes NV|BS|RT (7), little-endian, then the value.
printf '\007\000\000\000%d' $((n + 1)) >"$v" && echo "EFIVAR set $((n + 1))" >/dev/console
EOS
chmod 0755 "$root/usr/local/sbin/domsnap-check" "$root/usr/local/sbin/domsnap-efivar"
cat >"$root/etc/systemd/system/domsnap-check.service" <<'EOS'
[Unit]
Description=domsnap self-check (RAM counter, data disk sector 0) on the serial console

[Service]
# idle: once the boot's other jobs are done, so that READY means a booted
# system (a snapshot taken while systemd still starts units restores a
# guest that is busy for many seconds under TCG).
Type=idle
ExecStartPre=-/usr/local/sbin/domsnap-efivar
ExecStart=/opt/bb/sh /usr/local/sbin/domsnap-check
StandardInput=null
StandardOutput=tty
TTYPath=/dev/ttyS0

[Install]
WantedBy=multi-user.target
EOS
inroot systemctl enable domsnap-check.service >&2
# Nothing else on ttyS0: no getty, no status lines; nothing to wait for.
inroot systemctl mask serial-getty@ttyS0.service getty@tty1.service systemd-networkd-wait-online.service \
    systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer >&2 2>/dev/null || true
printf 'domsnap-debian\n' >"$root/etc/hostname"
printf '/dev/vda2 / ext4 rw,noatime 0 1\n' >"$root/etc/fstab"
inroot passwd -d root >/dev/null

kernel=$(find "$root/boot" -name 'vmlinuz-*' -print -quit)
initrd=$(find "$root/boot" -name 'initrd.img-*' -print -quit)
[[ -n $kernel && -n $initrd ]] || die "no kernel or initramfs in the root's /boot"
mkdir -p "$TMP/esp"
cp "$kernel" "$TMP/esp/vmlinuz"
cp "$initrd" "$TMP/esp/initrd.img"
rm -rf "$root"/usr/share/{doc,man,info,locale}/* "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/boot/*

log "building the disk"
# ESP: syslinux (BIOS) and systemd-boot (UEFI), the kernel and initramfs.
cat >"$TMP/syslinux.cfg" <<EOS
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
    KERNEL /vmlinuz
    INITRD /initrd.img
    APPEND $CMDLINE
EOS
printf 'default debian.conf\ntimeout 0\n' >"$TMP/loader.conf"
printf 'title Debian\nlinux /vmlinuz\ninitrd /initrd.img\noptions %s\n' "$CMDLINE" >"$TMP/debian.conf"
esp=$TMP/esp.img
# -h: the partition's start (sector 2048), which syslinux's boot sector reads from the BPB.
mkfs.vfat -n ESP -h 2048 -C "$esp" $((ESP_MIB * 1024)) >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries
mcopy -i "$esp" /usr/lib/systemd/boot/efi/systemd-bootx64.efi ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$esp" "$TMP/loader.conf" ::/loader/loader.conf
mcopy -i "$esp" "$TMP/debian.conf" ::/loader/entries/debian.conf
mcopy -i "$esp" "$TMP/syslinux.cfg" ::/syslinux.cfg
mcopy -i "$esp" "$TMP/esp/vmlinuz" "$TMP/esp/initrd.img" ::/
syslinux --install "$esp"
# Root: ext4 from the tree.
root_mib=$((DISK_MIB - ESP_MIB - 2))
mke2fs -q -t ext4 -L root -d "$root" "$TMP/root.img" "${root_mib}M" || die "mke2fs -d failed"
# The disk: MBR with syslinux's boot code, ESP (active) then root.
truncate -s "${DISK_MIB}M" "$TMP/disk.raw"
printf 'label: dos\nstart=2048, size=%dMiB, type=ef, bootable\nsize=%dMiB, type=83\n' "$ESP_MIB" "$root_mib" |
    sfdisk -q "$TMP/disk.raw" >&2
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$TMP/disk.raw" bs=440 count=1 conv=notrunc status=none
dd if="$esp" of="$TMP/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$TMP/root.img" of="$TMP/disk.raw" bs=1M seek=$((1 + ESP_MIB)) conv=notrunc,sparse status=none
qemu-img convert -O qcow2 "$TMP/disk.raw" "$TMP/disk.qcow2"
mv -f "$TMP/disk.qcow2" "$OUT/disk.qcow2"
printf '%s\n' "$KEY" >"$OUT/stamp"
log "done in $(($(date +%s) - T0)) s: $(du -h "$OUT/disk.qcow2" | cut -f1) qcow2"
finish
