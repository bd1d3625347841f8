#!/bin/bash
# Build the domsnap test guest: a Debian cloud kernel + a busybox initramfs
# whose /init (guest/init) counts in RAM and checks its disks (see the
# "A guest that checks itself" section of the QEMU field notes).
#
# Booted from initrd-qga.img, a domain with the guest-agent channel also gets
# Debian's qemu-ga running (guest/fsfreeze-hook as its freeze hook) and an
# ext4 filesystem for it to freeze, mounted at /data.
#
# Everything comes from Debian packages: the kernel is resolved through the
# linux-image-cloud-amd64 metapackage, downloaded with `apt-get download` into
# a cache and extracted with `dpkg-deb -x` (never installed).
#
# Output (in ${DOMSNAP_GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/domsnap/guest}):
#   vmlinuz, initrd.img, initrd-qga.img (initrd.img and, appended, a second
#   archive with the guest agent: only the domains that quiesce pay for its
#   size at boot), stamp (+ stamp.quick), debs/ (download cache).
# stdout: two lines, `kernel=PATH` and `ramdisk=PATH`; progress goes to stderr.
#
# A second run with the same inputs (kernel package version, guest/init,
# guest/fsfreeze-hook, this script, busybox, qemu-guest-agent) does nothing. Its fast path does not even ask apt
# (each apt-cache call costs ~0.5 s here): it keys on the apt lists' metadata;
# only when those changed is the kernel re-resolved, and the build redone only
# if the resolved version (or another input) differs.
#
# Environment:
#   DOMSNAP_GUEST_DIR     output directory (see above)
#   DOMSNAP_GUEST_FORCE=1 rebuild even if the stamp matches
set -euo pipefail

META_PKG=linux-image-cloud-amd64
# Modules to load, in this order (dependencies found in each module's
# modinfo are pulled in first; built-in ones are skipped).
WANT_MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)
# Of those, these must end up available (as a module or built in).
REQUIRED_MODULES=(virtio_ring virtio virtio_pci virtio_blk)
# Loaded only in a domain that has the guest-agent channel: its virtio-serial
# port, and a filesystem the guest agent can freeze (ext4 on a loop device:
# a tmpfs or the initramfs cannot be frozen).
QGA_MODULES=(virtio_console loop ext4)
# Debian's guest agent, with the host's copies of its libraries (the same
# Debian release's packages: qemu-system pulls them in).
QGA_PKG=qemu-guest-agent

SELF=$(readlink -f "${BASH_SOURCE[0]}")
SRC_DIR=$(dirname "$SELF")
INIT_SRC=$SRC_DIR/init
HOOK_SRC=$SRC_DIR/fsfreeze-hook
OUT=${DOMSNAP_GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/domsnap/guest}
KERNEL_OUT=$OUT/vmlinuz
RAMDISK_OUT=$OUT/initrd.img
RAMDISK_QGA_OUT=$OUT/initrd-qga.img
STAMP=$OUT/stamp
QUICK_STAMP=$OUT/stamp.quick
DEB_CACHE=$OUT/debs

log() { printf 'guest/build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
DEBS_LIB=$SRC_DIR/../scripts/lib/debs.sh
# shellcheck source=../scripts/lib/debs.sh
. "$DEBS_LIB"

finish() {
    printf 'kernel=%s\nramdisk=%s\nramdisk_qga=%s\n' "$KERNEL_OUT" "$RAMDISK_OUT" "$RAMDISK_QGA_OUT"
    exit 0
}

outputs_exist() { [[ -s $KERNEL_OUT && -s $RAMDISK_OUT && -s $RAMDISK_QGA_OUT && -s $STAMP ]]; }

[[ -r $INIT_SRC ]] || die "missing $INIT_SRC"
mkdir -p "$OUT"

# Serialise concurrent builds into the same directory.
exec 9>"$OUT/.lock"
flock 9

# ---------------------------------------------------------------- busybox
# The static busybox: the installed busybox-static package's /bin/busybox,
# else busybox-static downloaded into the cache and extracted (never
# installed: busybox-static conflicts with the dynamic busybox package).
busybox_identity() {
    local v
    if v=$(dpkg-query -W -f '${db:Status-Status} ${Version}' busybox-static 2>/dev/null) &&
        [[ $v == installed\ * && -x /bin/busybox ]]; then
        BUSYBOX_SRC=/bin/busybox
        BUSYBOX_ID="busybox-static=${v#installed } $(stat -c '%s %Y' /bin/busybox)"
        return 0
    fi
    BUSYBOX_SRC=
    BUSYBOX_ID="busybox-static=download"
}

busybox_identity
BUSYBOX_QID=$BUSYBOX_ID
SCRIPT_SHA=$(cat "$SELF" "$DEBS_LIB" | sha_of -)
INIT_SHA=$(cat "$INIT_SRC" "$HOOK_SRC" | sha_of -)
QUICK_KEY="v1 build=$SCRIPT_SHA init=$INIT_SHA $BUSYBOX_QID lists=$(apt_lists_id)"

if [[ ${DOMSNAP_GUEST_FORCE:-0} != 1 ]] && outputs_exist && [[ -f $QUICK_STAMP ]] &&
    [[ $(<"$QUICK_STAMP") == "$QUICK_KEY" ]]; then
    finish
fi

# ---------------------------------------------------------------- resolve

# Prints "PACKAGE VERSION" of the versioned kernel package the metapackage
# depends on, e.g. "linux-image-6.1.0-56-cloud-amd64 6.1.192-2".
resolve_kernel() {
    local show dep name ver
    show=$(apt-cache show --no-all-versions "$META_PKG" 2>/dev/null) || return 1
    dep=$(printf '%s\n' "$show" | sed -n 's/^Depends: //p' | head -n1)
    # The first linux-image-* alternative of the Depends field.
    dep=$(printf '%s\n' "$dep" | tr ',|' '\n' | sed 's/^ *//' | grep -m1 '^linux-image-') || return 1
    name=${dep%% *}
    if [[ $dep =~ \(=\ *([^\)]+)\) ]]; then
        ver=${BASH_REMATCH[1]// /}
    else
        # Unversioned dependency: take the candidate version.
        ver=$(apt-cache policy "$name" | sed -n 's/^ *Candidate: //p')
    fi
    [[ -n $name && -n $ver && $ver != "(none)" ]] || return 1
    printf '%s %s\n' "$name" "$ver"
}

KPKG_LINE=$(resolve_kernel) || {
    if [[ $(id -u) == 0 ]]; then
        log "$META_PKG not known to apt; running apt-get update"
        apt-get update >&2 || die "apt-get update failed"
        KPKG_LINE=$(resolve_kernel) || die "cannot resolve $META_PKG (apt-cache show)"
    else
        die "cannot resolve $META_PKG: run 'apt-get update' (as root) first"
    fi
}
KPKG=${KPKG_LINE%% *}
KVER=${KPKG_LINE#* }
if [[ -z $BUSYBOX_SRC ]]; then
    BBVER=$(apt-cache policy busybox-static | sed -n 's/^ *Candidate: //p')
    [[ -n $BBVER && $BBVER != "(none)" ]] || die "busybox-static is not available from apt"
    BUSYBOX_ID="busybox-static=$BBVER (downloaded)"
fi

QGAVER=$(apt-cache policy "$QGA_PKG" | sed -n 's/^ *Candidate: //p')
[[ -n $QGAVER && $QGAVER != "(none)" ]] || die "$QGA_PKG is not available from apt"

FULL_KEY="v1 build=$SCRIPT_SHA init=$INIT_SHA $BUSYBOX_ID kernel=$KPKG=$KVER $QGA_PKG=$QGAVER"
# After apt-get update the lists changed: recompute the quick key.
QUICK_KEY="v1 build=$SCRIPT_SHA init=$INIT_SHA $BUSYBOX_QID lists=$(apt_lists_id)"

if [[ ${DOMSNAP_GUEST_FORCE:-0} != 1 ]] && outputs_exist && [[ $(<"$STAMP") == "$FULL_KEY" ]]; then
    printf '%s\n' "$QUICK_KEY" >"$QUICK_STAMP"
    finish
fi

log "building guest: kernel $KPKG $KVER into $OUT"

# ---------------------------------------------------------------- host tools
need_pkgs=()
have cpio || need_pkgs+=(cpio)
have gzip || need_pkgs+=(gzip)
if ((${#need_pkgs[@]})); then
    [[ $(id -u) == 0 ]] || die "missing host tools: ${need_pkgs[*]} (apt-get install ${need_pkgs[*]})"
    log "installing ${need_pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2
fi

TMP=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# ---------------------------------------------------------------- download
mkdir -p "$DEB_CACHE"

KDEB=$(fetch_deb "$DEB_CACHE" "$TMP" "$KPKG" "$KVER") || die "apt-get download $KPKG=$KVER failed"

QGADEB=$(fetch_deb "$DEB_CACHE" "$TMP" "$QGA_PKG" "$QGAVER") || die "apt-get download $QGA_PKG=$QGAVER failed"

if [[ -z $BUSYBOX_SRC ]]; then
    BBDEB=$(fetch_deb "$DEB_CACHE" "$TMP" busybox-static "$BBVER") || die "apt-get download busybox-static=$BBVER failed"
    dpkg-deb -x "$BBDEB" "$TMP/bb"
    BUSYBOX_SRC=$TMP/bb/bin/busybox
    [[ -x $BUSYBOX_SRC ]] || die "no bin/busybox in $BBDEB"
fi

# ---------------------------------------------------------------- extract
log "extracting ${KDEB##*/}"
KX=$TMP/kernel
dpkg-deb -x "$KDEB" "$KX"

vmlinuz=
for f in "$KX"/boot/vmlinuz-*; do
    [[ -f $f ]] && vmlinuz=$f && break
done
[[ -n $vmlinuz ]] || die "no boot/vmlinuz-* in $KDEB"
kver_uname=${vmlinuz##*/vmlinuz-}

moddir=
for d in "$KX/lib/modules/$kver_uname" "$KX/usr/lib/modules/$kver_uname"; do
    [[ -d $d ]] && moddir=$d && break
done
[[ -n $moddir ]] || die "no lib/modules/$kver_uname in $KDEB"

# module name -> file (names normalised to underscores)
declare -A MODFILE=() BUILTIN=() STATE=()
while IFS= read -r -d '' f; do
    n=${f##*/}
    n=${n%%.ko*}
    MODFILE[${n//-/_}]=$f
done < <(find "$moddir" \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) -print0 | sort -z)
if [[ -f $moddir/modules.builtin ]]; then
    while IFS= read -r line; do
        n=${line##*/}
        n=${n%%.ko*}
        BUILTIN[${n//-/_}]=1
    done <"$moddir/modules.builtin"
fi

ensure_tool() { # TOOL PACKAGE
    have "$1" && return 0
    [[ $(id -u) == 0 ]] || die "need $1 (package $2) to decompress modules"
    log "installing $2"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" >&2
}

# Decompress (if needed) module $1 into $2.
unpack_module() {
    local src=$1 dst=$2
    case $src in
    *.ko) cp "$src" "$dst" ;;
    *.ko.xz) ensure_tool xz xz-utils && xz -dc "$src" >"$dst" ;;
    *.ko.zst) ensure_tool zstd zstd && zstd -q -dc "$src" >"$dst" ;;
    *.ko.gz) gzip -dc "$src" >"$dst" ;;
    *) die "unknown module format: $src" ;;
    esac
}

ROOT=$TMP/root
MODOUT=$ROOT/lib/modules/domsnap
mkdir -p "$ROOT"/{bin,dev,etc,proc,sys,tmp,run,mnt} "$MODOUT"
LOAD_ORDER=()
SKIPPED_BUILTIN=()

# Depth-first: dependencies (from the module's own modinfo) first.
add_module() { # NAME REQUIRED(0/1)
    local name=$1 required=$2 dep deps
    case ${STATE[$name]:-} in
    loaded) return 0 ;;
    busy) die "module dependency cycle at $name" ;;
    esac
    if [[ -z ${MODFILE[$name]:-} ]]; then
        if [[ -n ${BUILTIN[$name]:-} ]]; then
            SKIPPED_BUILTIN+=("$name")
        elif ((required)); then
            die "module $name is neither in $KPKG nor built into its kernel"
        else
            log "note: module $name not in this kernel (skipped)"
        fi
        STATE[$name]=loaded
        return 0
    fi
    STATE[$name]=busy
    unpack_module "${MODFILE[$name]}" "$MODOUT/$name.ko"
    deps=$(tr '\0' '\n' <"$MODOUT/$name.ko" | sed -n 's/^depends=//p' | head -n1)
    for dep in ${deps//,/ }; do
        add_module "${dep//-/_}" 1
    done
    LOAD_ORDER+=("$name")
    STATE[$name]=loaded
}

for m in "${WANT_MODULES[@]}"; do
    req=0
    for r in "${REQUIRED_MODULES[@]}"; do [[ $r == "$m" ]] && req=1; done
    add_module "$m" "$req"
done
printf '%s\n' "${LOAD_ORDER[@]}" >"$MODOUT/load.order"
log "modules: ${LOAD_ORDER[*]:-(none)}${SKIPPED_BUILTIN[*]:+; built in: ${SKIPPED_BUILTIN[*]}}"
# Into the guest agent's archive; those already loaded above are not listed again.
QROOT=$TMP/qga-root
MODOUT=$QROOT/lib/modules/domsnap
mkdir -p "$MODOUT"
LOAD_ORDER=()
for m in "${QGA_MODULES[@]}"; do
    add_module "$m" 1
done
printf '%s\n' "${LOAD_ORDER[@]}" >"$MODOUT/load.qga"
log "guest-agent modules: ${LOAD_ORDER[*]:-(none)}"

# ---------------------------------------------------------------- guest agent
dpkg-deb -x "$QGADEB" "$TMP/qga"
install -D -m 0755 "$TMP/qga/usr/sbin/qemu-ga" "$QROOT/usr/sbin/qemu-ga"
install -D -m 0755 "$HOOK_SRC" "$QROOT/etc/fsfreeze-hook"
# Its shared libraries and the dynamic loader, at the paths ldd resolves.
QGA_LIBS=$(ldd "$QROOT/usr/sbin/qemu-ga") || die "ldd qemu-ga failed"
if grep 'not found' <<<"$QGA_LIBS" >&2; then
    die "qemu-ga needs libraries this host lacks (apt-get install qemu-system-x86 brings them)"
fi
for lib in $(awk '/\// {print ($2 == "=>") ? $3 : $1}' <<<"$QGA_LIBS"); do
    install -D -m 0755 "$lib" "$QROOT$lib"
done

# ---------------------------------------------------------------- initramfs
install -m 0755 "$BUSYBOX_SRC" "$ROOT/bin/busybox"
for a in $("$ROOT/bin/busybox" --list); do
    [[ $a == busybox ]] && continue
    ln -sf busybox "$ROOT/bin/$a"
done
install -m 0755 "$INIT_SRC" "$ROOT/init"
# A console for init's first file descriptors (init also reopens it after
# mounting devtmpfs, so this is only a nicety; mknod needs root).
mknod -m 0600 "$ROOT/dev/console" c 5 1 2>/dev/null || true
printf '%s %s %s\n' "$KPKG" "$KVER" "$kver_uname" >"$ROOT/etc/domsnap-kernel"

# pack DIR: a gzipped newc archive of DIR on stdout, reproducible.
pack() {
    find "$1" -exec touch -h -d @0 {} + 2>/dev/null || true
    (
        cd "$1"
        if have cpio; then
            find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible
        else
            find . -mindepth 1 | LC_ALL=C sort | "$ROOT/bin/busybox" cpio -o -H newc -R 0:0
        fi
    ) | gzip -n -9
}

log "packing initramfs"
pack "$ROOT" >"$TMP/initrd.img"
# The kernel unpacks concatenated archives in turn, the second over the first.
pack "$QROOT" | cat "$TMP/initrd.img" - >"$TMP/initrd-qga.img"

# ---------------------------------------------------------------- install
cp "$vmlinuz" "$TMP/vmlinuz"
mv -f "$TMP/vmlinuz" "$KERNEL_OUT"
mv -f "$TMP/initrd.img" "$RAMDISK_OUT"
mv -f "$TMP/initrd-qga.img" "$RAMDISK_QGA_OUT"
printf '%s\n' "$FULL_KEY" >"$STAMP"
printf '%s\n' "$QUICK_KEY" >"$QUICK_STAMP"

# Drop kernel debs of other versions from the cache.
for f in "$DEB_CACHE"/linux-image-*.deb; do
    [[ -e $f && $f != "$KDEB" ]] && rm -f "$f"
done

log "done: $(stat -c %s "$KERNEL_OUT") byte kernel, $(stat -c %s "$RAMDISK_OUT") byte initramfs" \
    "($(stat -c %s "$RAMDISK_QGA_OUT") with the guest agent)"
finish
