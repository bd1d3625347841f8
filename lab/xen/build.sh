#!/bin/bash
# Build the domsnap Xen lab: a Xen 4.17 host image that boots under QEMU
# (TCG) on a machine without usable KVM. Everything comes from Debian
# packages and PyPI; nothing is installed on the host (but debootstrap and
# cpio, as build tools, when missing).
#
# Outputs, in ${DOMSNAP_XENLAB_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/domsnap/xenlab}:
#   xen           the hypervisor, gunzipped (QEMU -kernel takes it as multiboot1)
#   vmlinuz-dom0  the dom0 kernel (linux-image-amd64)
#   dom0.cpio     the dom0 root as one uncompressed initramfs: two layers,
#                 base.cpio (debootstrap of bookworm minbase + xen-utils-4.17,
#                 qemu-system-xen, qemu-utils, lvm2, python3, the dom0 kernel's
#                 modules, a venv /opt/domsnap with the project's dependencies)
#                 and project.cpio (the project's wheel installed in that venv,
#                 lab/xen/dom0-init as /init, lab/xen/selftest.py, the domU
#                 kernel and initramfs under /lab).
#   root/         the base root tree (kept: the project layer is installed
#                 with its pip), debs/ and debcache/ (download caches)
# stdout: `xen=PATH`, `dom0_kernel=PATH`, `dom0_initrd=PATH`, `versions=...`;
# progress goes to stderr.
#
# Caching: the base layer is keyed on this script, the resolved package
# versions and the project's dependency list; the project layer on the
# project's sources, the lab files and the test guest. A second run with the
# same inputs only hashes them (and asks apt nothing while its lists are
# unchanged).
#
# Environment:
#   DOMSNAP_XENLAB_DIR      output directory (see above)
#   DOMSNAP_XENLAB_FORCE=1  rebuild both layers
#   DOMSNAP_XENLAB_MIRROR   Debian mirror for debootstrap (default: the
#                           bookworm URI of the host's apt sources)
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
LAB_DIR=$(dirname "$SELF")
REPO=$(cd "$LAB_DIR/../.." && pwd)
OUT=${DOMSNAP_XENLAB_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/domsnap/xenlab}
SUITE=bookworm
XEN_HV_PKG=xen-hypervisor-4.17-amd64
DOM0_META=linux-image-amd64
# Packages debootstrap adds to minbase. busybox: poweroff -f and friends in a
# root that has no init system.
ROOT_PKGS=(xen-utils-4.17 qemu-system-xen qemu-utils lvm2 thin-provisioning-tools python3 python3-venv
    kmod busybox procps util-linux iproute2)
# Module subtrees of the dom0 kernel copied into the root (the full set is
# ~400 MB): Xen backends, loop, device-mapper (dm-snapshot, dm-thin-pool)
# and what they depend on.
MODULE_DIRS=(drivers/xen drivers/block drivers/md lib crypto arch/x86/crypto fs/fuse)

log() { printf 'lab/xen/build.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
DEBS_LIB=$REPO/scripts/lib/debs.sh
# shellcheck source=../../scripts/lib/debs.sh
. "$DEBS_LIB"
now() { date +%s.%N; }
T_START=$(now)
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
elapsed() { since "$T_START"; }

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

finish() {
    printf 'xen=%s\ndom0_kernel=%s\ndom0_initrd=%s\nversions=%s\n' \
        "$OUT/xen" "$OUT/vmlinuz-dom0" "$OUT/dom0.cpio" "$(cat "$OUT/versions" 2>/dev/null)"
    exit 0
}

# The project's runtime dependencies (pyproject.toml [project] dependencies).
project_deps() {
    python3 - "$REPO/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
EOF
}

# Hash of every file that goes into the project layer.
project_id() {
    (
        cd "$REPO"
        find agent client proto/domsnap pyproject.toml README.md \
            \( -name __pycache__ -prune \) -o \( -type f -o -type l \) -print 2>/dev/null |
            LC_ALL=C sort | while IFS= read -r f; do
            if [[ -L $f ]]; then printf '%s -> %s\n' "$f" "$(readlink "$f")"; else printf '%s %s\n' "$f" "$(sha_of "$f")"; fi
        done
        for f in "$SELF" "$DEBS_LIB" "$LAB_DIR/dom0-init" "$LAB_DIR/selftest.py" "$LAB_DIR/genid" "$REPO/guest/init"; do
            printf '%s %s\n' "${f##*/}" "$(sha_of "$f")"
        done
        printf 'guest %s\n' "$(cat "$GUEST_STAMP" 2>/dev/null)"
    ) | sha256sum | cut -d' ' -f1
}

# ------------------------------------------------------------------ guest
# The domU kernel and initramfs come from guest/build.sh (cached there).
GUEST_OUT=$("$REPO/guest/build.sh") || die "guest/build.sh failed"
GUEST_KERNEL=$(sed -n 's/^kernel=//p' <<<"$GUEST_OUT")
GUEST_RAMDISK=$(sed -n 's/^ramdisk=//p' <<<"$GUEST_OUT")
GUEST_STAMP=$(dirname "$GUEST_KERNEL")/stamp
[[ -s $GUEST_KERNEL && -s $GUEST_RAMDISK ]] || die "guest/build.sh gave no kernel/ramdisk"

SCRIPT_SHA=$(cat "$SELF" "$DEBS_LIB" | sha_of -)
DEPS=$(project_deps)
DEPS_SHA=$(printf '%s\n' "$DEPS" | sha_of -)
BASE_QUICK_KEY="v1 build=$SCRIPT_SHA deps=$DEPS_SHA lists=$(apt_lists_id)"
PROJECT_KEY="v1 project=$(project_id)"

base_ok() { [[ -s $OUT/xen && -s $OUT/vmlinuz-dom0 && -s $OUT/base.cpio && -d $OUT/root/opt/domsnap && -s $OUT/stamp.base ]]; }
project_ok() { [[ -s $OUT/dom0.cpio && -s $OUT/stamp.project ]] && [[ $(<"$OUT/stamp.project") == "$PROJECT_KEY base=$(<"$OUT/stamp.base")" ]]; }

FORCE=${DOMSNAP_XENLAB_FORCE:-0}
if [[ $FORCE != 1 ]] && base_ok && [[ -f $OUT/stamp.base.quick && $(<"$OUT/stamp.base.quick") == "$BASE_QUICK_KEY" ]] && project_ok; then
    finish
fi

# ------------------------------------------------------------------ resolve
# "PACKAGE VERSION" of the candidate of $1; fails, naming it, when apt knows no candidate.
candidate() {
    local v
    v=$(apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p')
    [[ -n $v && $v != "(none)" ]] || return 1
    printf '%s\n' "$v"
}
resolve() {
    local p
    HV_VER=$(candidate "$XEN_HV_PKG") || return 1
    for p in "${ROOT_PKGS[@]}"; do
        candidate "$p" >/dev/null || {
            MISSING=$p
            return 1
        }
    done
    UTILS_VER=$(candidate xen-utils-4.17)
    QEMU_VER=$(candidate qemu-system-xen)
    local dep
    dep=$(apt-cache show --no-all-versions "$DOM0_META" 2>/dev/null | sed -n 's/^Depends: //p' | head -n1 |
        tr ',|' '\n' | sed 's/^ *//' | grep -m1 '^linux-image-') || {
        MISSING=$DOM0_META
        return 1
    }
    KPKG=${dep%% *}
    KVER=$(candidate "$KPKG") || {
        MISSING=$KPKG
        return 1
    }
}
MISSING=$XEN_HV_PKG
if ! resolve; then
    if [[ $(id -u) == 0 ]]; then
        log "$MISSING not known to apt; running apt-get update"
        apt-get update >&2 || die "apt-get update failed"
        MISSING=$XEN_HV_PKG
        resolve || die "Debian package $MISSING is not available from apt (needed for the Xen lab)"
    else
        die "Debian package $MISSING is not available: run 'apt-get update' (as root)"
    fi
fi
VERSIONS="$XEN_HV_PKG=$HV_VER xen-utils-4.17=$UTILS_VER qemu-system-xen=$QEMU_VER $KPKG=$KVER"
BASE_KEY="v1 build=$SCRIPT_SHA deps=$DEPS_SHA $VERSIONS"
# apt-get update may have changed the lists.
BASE_QUICK_KEY="v1 build=$SCRIPT_SHA deps=$DEPS_SHA lists=$(apt_lists_id)"

# ------------------------------------------------------------------ tools
need=()
have debootstrap || need+=(debootstrap)
have cpio || need+=(cpio)
if ((${#need[@]})); then
    [[ $(id -u) == 0 ]] || die "missing build tools: ${need[*]}"
    log "installing build tools: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >&2 ||
        die "apt-get install ${need[*]} failed"
fi
[[ $(id -u) == 0 ]] || die "building the lab needs root (debootstrap, chroot)"

TMP=$(mktemp -d "$OUT/.build.XXXXXX")
cleanup() {
    # Never leave a bind mount or proc inside a tree we remove.
    local m
    for m in "$TMP/root/proc" "$OUT/root/proc"; do mountpoint -q "$m" 2>/dev/null && umount -l "$m"; done
    rm -rf "$TMP"
}
trap cleanup EXIT

DEBS=$OUT/debs
mkdir -p "$DEBS" "$OUT/debcache"
mirror() { bookworm_mirror "${DOMSNAP_XENLAB_MIRROR:-}"; }

security_mirror() {
    if [[ -n ${DOMSNAP_XENLAB_SECURITY_MIRROR:-} ]]; then
        printf '%s\n' "$DOMSNAP_XENLAB_SECURITY_MIRROR"
        return
    fi
    local uri
    uri=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
        grep -E '^(URIs:|deb )' | grep -oE 'https?://[^ ]+/debian-security/?' | head -n1)
    printf '%s\n' "${uri:-http://deb.debian.org/debian-security}"
}

# A command in the root, with a clean environment (no pip or apt settings of the host's).
inroot() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive chroot "$root" "$@"; }

# ------------------------------------------------------------------ base layer
build_base() {
    log "building the base layer ($VERSIONS) into $OUT"
    local t0 hvdeb kdeb root=$TMP/root kx=$TMP/kernel f kuname moddir d
    t0=$(now)
    kdeb=$(fetch_deb "$DEBS" "$TMP" "$KPKG" "$KVER") || die "apt-get download $KPKG=$KVER failed"

    # The dom0 kernel and its modules.
    dpkg-deb -x "$kdeb" "$kx"
    f=$(find "$kx/boot" -name 'vmlinuz-*' -print -quit)
    [[ -n $f ]] || die "no boot/vmlinuz-* in $kdeb"
    kuname=${f##*/vmlinuz-}
    cp "$f" "$TMP/vmlinuz-dom0"
    for d in "$kx/lib/modules/$kuname" "$kx/usr/lib/modules/$kuname"; do [[ -d $d ]] && moddir=$d && break; done
    [[ -n ${moddir:-} ]] || die "no modules for $kuname in $kdeb"
    grep -qE '^CONFIG_XEN_DOM0=y' "$kx/boot/config-$kuname" || die "$KPKG is not built with CONFIG_XEN_DOM0"

    log "debootstrap $SUITE minbase + ${ROOT_PKGS[*]} from $(mirror)"
    local pkgs
    pkgs=$(
        IFS=,
        echo "${ROOT_PKGS[*]}"
    )
    debootstrap --variant=minbase --cache-dir="$OUT/debcache" --include="$pkgs" \
        "$SUITE" "$root" "$(mirror)" >"$TMP/debootstrap.log" 2>&1 || {
        tail -n 30 "$TMP/debootstrap.log" >&2
        die "debootstrap failed (log above)"
    }
    log "debootstrap done ($(since "$t0") s)"

    # debootstrap takes one suite; Debian's current Xen (and its security
    # fixes) comes from bookworm-security and -updates: upgrade the root from
    # the same mirrors, then take the hypervisor of exactly the tools' version.
    local sec
    sec=$(security_mirror)
    cat >"$root/etc/apt/sources.list" <<EOS
deb $(mirror) $SUITE main
deb $(mirror) $SUITE-updates main
deb $sec $SUITE-security main
EOS
    cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    log "apt-get update + dist-upgrade in the root (bookworm, -updates, -security)"
    { inroot apt-get -q update --error-on=any && inroot apt-get -q -y \
        -o Dpkg::Options::=--force-confold dist-upgrade; } >"$TMP/upgrade.log" 2>&1 || {
        tail -n 30 "$TMP/upgrade.log" >&2
        die "apt-get dist-upgrade in the root failed (log above)"
    }
    inroot apt-get clean
    rm -f "$root/etc/resolv.conf"
    UTILS_VER=$(inroot dpkg-query -W -f '${Version}' xen-utils-4.17) || die "xen-utils-4.17 is not in the root"
    QEMU_VER=$(inroot dpkg-query -W -f '${Version}' qemu-system-xen) || die "qemu-system-xen is not in the root"
    HV_VER=$UTILS_VER
    VERSIONS="$XEN_HV_PKG=$HV_VER xen-utils-4.17=$UTILS_VER qemu-system-xen=$QEMU_VER $KPKG=$KVER"
    local hvdeb
    hvdeb=$(fetch_deb "$DEBS" "$TMP" "$XEN_HV_PKG" "$HV_VER") ||
        die "apt-get download $XEN_HV_PKG=$HV_VER (the version of the root's xen-utils-4.17) failed"
    # The hypervisor: QEMU's multiboot loader needs it uncompressed.
    dpkg-deb -x "$hvdeb" "$TMP/hv"
    f=$(find "$TMP/hv/boot" -name 'xen-*.gz' -print -quit)
    [[ -n $f ]] || die "no boot/xen-*.gz in $hvdeb"
    gzip -dc "$f" >"$TMP/xen"

    mkdir -p "$root/lib/modules/$kuname/kernel"
    for d in "${MODULE_DIRS[@]}"; do
        [[ -d $moddir/kernel/$d ]] || continue
        mkdir -p "$root/lib/modules/$kuname/kernel/$(dirname "$d")"
        cp -a "$moddir/kernel/$d" "$root/lib/modules/$kuname/kernel/$d"
    done
    cp -a "$moddir"/modules.order "$moddir"/modules.builtin* "$root/lib/modules/$kuname/" 2>/dev/null || true
    inroot depmod "$kuname" || die "depmod failed"
    local m
    for m in xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-blkback loop dm-mod dm-snapshot dm-thin-pool; do
        inroot modprobe -S "$kuname" --show-depends "$m" >/dev/null 2>&1 ||
            grep -q "/${m//-/[-_]}.ko" "$moddir/modules.builtin" ||
            die "dom0 module $m is neither in the root nor built into $kuname"
    done

    # The project's dependencies, as wheels built on this host (same Python
    # minor version as bookworm's), installed offline into a venv.
    local pyver host_pip=(python3 -m pip)
    [[ -x $REPO/.venv/bin/pip ]] && host_pip=("$REPO/.venv/bin/pip")
    pyver=$(inroot python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    mkdir -p "$root/tmp/wheels"
    local -a deps
    mapfile -t deps <<<"$DEPS"
    log "wheels for ${deps[*]} (python $pyver)"
    "${host_pip[@]}" download -q --only-binary=:all: --python-version "$pyver" --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform linux_x86_64 \
        -d "$root/tmp/wheels" "${deps[@]}" >&2 ||
        "${host_pip[@]}" wheel -q -w "$root/tmp/wheels" "${deps[@]}" >&2 || die "cannot get wheels for ${deps[*]}"
    inroot python3 -m venv /opt/domsnap || die "python3 -m venv failed in the root"
    inroot /opt/domsnap/bin/pip install -q --no-index --find-links /tmp/wheels "${deps[@]}" >&2 ||
        die "pip install of the dependencies into the root's venv failed"
    rm -rf "$root/tmp/wheels"

    # Lab settings: consoles of domUs to /var/log/xen/console, no dom0 ballooning.
    cat >>"$root/etc/default/xen" <<'EOF'
# domsnap lab: every domU console into /var/log/xen/console/guest-<name>.log
XENCONSOLED_ARGS="--log=guest"
EOF
    mkdir -p "$root/var/log/xen/console" "$root/etc/domsnap" "$root/var/lib/domsnap"
    sed -i 's/^#\?autoballoon=.*/autoballoon="off"/' "$root/etc/xen/xl.conf" 2>/dev/null || true
    echo xenlab >"$root/etc/hostname"
    # lvm2 without udev in dom0: no waiting for udev, no lvmetad.
    if [[ -f $root/etc/lvm/lvm.conf ]]; then
        sed -i -e 's/^\(\s*\)# udev_sync = 1/\1udev_sync = 0/' -e 's/^\(\s*\)# udev_rules = 1/\1udev_rules = 0/' \
            "$root/etc/lvm/lvm.conf"
    fi

    # Slim down: documentation, locales, apt caches, the kernel image copy.
    rm -rf "$root"/usr/share/{doc,man,info,locale}/* "$root"/var/cache/apt/archives/*.deb \
        "$root"/var/lib/apt/lists/* "$root"/boot/* "$root"/var/cache/debconf/*-old

    log "packing base.cpio"
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$TMP/base.cpio"

    rm -rf "$OUT/root.old"
    [[ -d $OUT/root ]] && mv "$OUT/root" "$OUT/root.old"
    mv "$root" "$OUT/root"
    rm -rf "$OUT/root.old"
    mv -f "$TMP/xen" "$OUT/xen"
    mv -f "$TMP/vmlinuz-dom0" "$OUT/vmlinuz-dom0"
    mv -f "$TMP/base.cpio" "$OUT/base.cpio"
    printf '%s\n' "$VERSIONS kernel=$kuname" >"$OUT/versions"
    printf '%s\n' "$BASE_KEY" >"$OUT/stamp.base"
    printf '%s\n' "$BASE_QUICK_KEY" >"$OUT/stamp.base.quick"
    rm -f "$OUT/stamp.project"
    log "base layer: $(du -sh "$OUT/base.cpio" | cut -f1) in $(since "$t0") s"
}

if [[ $FORCE == 1 ]] || ! base_ok || [[ $(<"$OUT/stamp.base") != "$BASE_KEY" ]]; then
    build_base
else
    printf '%s\n' "$BASE_QUICK_KEY" >"$OUT/stamp.base.quick"
fi

# ------------------------------------------------------------------ project layer
# The domU initramfs for Xen: the test guest's, plus xen-blkfront from the
# same cloud kernel package, and its /init made to check /dev/xvd* disks (the
# guest's init checks /dev/vd*; a Xen PV disk is /dev/xvd*).
build_domu_initrd() { # DEST
    local dest=$1 g=$TMP/domu kinfo kpkg kver kuname kdeb f
    mkdir -p "$g"
    (cd "$g" && gzip -dc "$GUEST_RAMDISK" | cpio --quiet -idm) || die "cannot unpack $GUEST_RAMDISK"
    read -r kpkg kver kuname <"$g/etc/domsnap-kernel" || die "$GUEST_RAMDISK has no /etc/domsnap-kernel"
    kdeb=$(fetch_deb "$DEBS" "$TMP" "$kpkg" "$kver") || die "apt-get download $kpkg=$kver failed"
    dpkg-deb -x "$kdeb" "$TMP/ck"
    grep -q '^CONFIG_XEN_PV=y' "$TMP/ck/boot/config-$kuname" || die "$kpkg cannot boot as a Xen PV domU"
    grep -q '^CONFIG_XEN_PVH=y' "$TMP/ck/boot/config-$kuname" || die "$kpkg cannot boot as a Xen PVH domU"
    f=$(find "$TMP/ck" -name 'xen-blkfront.ko*' -print -quit)
    if [[ -n $f ]]; then
        case $f in
        *.ko) cp "$f" "$g/lib/modules/domsnap/xen_blkfront.ko" ;;
        *.ko.xz) xz -dc "$f" >"$g/lib/modules/domsnap/xen_blkfront.ko" ;;
        *.ko.zst) zstd -q -dc "$f" >"$g/lib/modules/domsnap/xen_blkfront.ko" ;;
        *) die "unknown module format $f" ;;
        esac
        deps=$(tr '\0' '\n' <"$g/lib/modules/domsnap/xen_blkfront.ko" | sed -n 's/^depends=//p' | head -n1)
        [[ -z $deps ]] || die "xen-blkfront depends on $deps: not handled"
        echo xen_blkfront >>"$g/lib/modules/domsnap/load.order"
    else
        grep -q '^CONFIG_XEN_BLKDEV_FRONTEND=y' "$TMP/ck/boot/config-$kuname" ||
            die "$kpkg has no xen-blkfront"
    fi
    # /dev/vda -> /dev/xvda, /dev/vd[a-z] -> /dev/xvd[a-z]; nothing else may name /dev/vd.
    # An HVM domU also prints its VM generation ID (lab/xen/genid, started just before READY).
    sed -e 's#/dev/vda#/dev/xvda#g' -e 's#/dev/vd\[a-z\]#/dev/xvd[a-z]#g' \
        -e 's#^echo READY$#/bin/lab-genid \&\necho READY#' "$REPO/guest/init" >"$g/init"
    if grep -n '/dev/vd' "$g/init" >&2; then die "guest/init names /dev/vd* in a way this script cannot adapt"; fi
    grep -q '/dev/xvd\[a-z\]' "$g/init" && grep -q '/dev/xvda' "$g/init" ||
        die "guest/init no longer has the /dev/vda and /dev/vd[a-z] this script adapts"
    grep -q '^/bin/lab-genid &$' "$g/init" || die "guest/init no longer has the 'echo READY' line this script adapts"
    install -m 0755 "$LAB_DIR/genid" "$g/bin/lab-genid"
    chmod 0755 "$g/init"
    (cd "$g" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | gzip -n -6 >"$dest"
}

log "building the project layer"
T_PROJ=$(now)
P=$TMP/project
mkdir -p "$P/lab/domu" "$TMP/src" "$TMP/w"
# The wheel is built from a copy (a build in the work tree would leave build/
# and *.egg-info there).
(cd "$REPO" && cp -a --parents agent client proto/domsnap pyproject.toml README.md "$TMP/src/")
find "$TMP/src" -name __pycache__ -prune -exec rm -rf {} +
host_pip=(python3 -m pip)
[[ -x $REPO/.venv/bin/pip ]] && host_pip=("$REPO/.venv/bin/pip")
"${host_pip[@]}" wheel -q --no-deps -w "$TMP/w" "$TMP/src" >&2 || die "pip wheel of the project failed"
WHEEL=$(find "$TMP/w" -name 'domsnap-*.whl' -print -quit)
[[ -n $WHEEL ]] || die "no domsnap wheel built"
mkdir -p "$OUT/root/tmp/lab-wheel"
cp "$WHEEL" "$OUT/root/tmp/lab-wheel/"
rm -rf "$OUT/root/tmp/stage"
root=$OUT/root inroot /opt/domsnap/bin/pip install -q --no-deps --no-index --root /tmp/stage \
    "/tmp/lab-wheel/${WHEEL##*/}" >&2 || die "pip install of the project wheel into the root failed"
cp -a "$OUT/root/tmp/stage/." "$P/"
rm -rf "$OUT/root/tmp/stage" "$OUT/root/tmp/lab-wheel"
# pip installs under /opt/domsnap as seen from the chroot; scripts must call the venv's python.
head -n1 "$P/opt/domsnap/bin/domsnapd" | grep -q '^#!/opt/domsnap/bin/python' || die "unexpected domsnapd shebang"
install -m 0755 "$LAB_DIR/dom0-init" "$P/init"
install -m 0755 "$LAB_DIR/selftest.py" "$P/lab/selftest.py"
cp "$GUEST_KERNEL" "$P/lab/domu/vmlinuz"
build_domu_initrd "$P/lab/domu/initrd.img"
(cd "$P" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$TMP/project.cpio"
cat "$OUT/base.cpio" "$TMP/project.cpio" >"$TMP/dom0.cpio"
mv -f "$TMP/project.cpio" "$OUT/project.cpio"
mv -f "$TMP/dom0.cpio" "$OUT/dom0.cpio"
printf '%s\n' "$PROJECT_KEY base=$(<"$OUT/stamp.base")" >"$OUT/stamp.project"
log "project layer in $(since "$T_PROJ") s; dom0.cpio $(du -sh "$OUT/dom0.cpio" | cut -f1); total $(elapsed) s"
finish
