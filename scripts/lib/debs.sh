# Helpers of the scripts that build images from Debian packages
# (guest/build.sh, guest/debian/build.sh, lab/xen/build.sh), which source this file and hash it
# into their cache keys. The caller defines log().

have() { command -v "$1" >/dev/null 2>&1; }
sha_of() { sha256sum "$@" | cut -d' ' -f1; }

# Fingerprint of the apt package lists: while it is unchanged, resolving a
# package gives the same answer as last time.
apt_lists_id() {
    local f
    {
        for f in /var/lib/apt/lists/*_Packages* /etc/apt/sources.list /etc/apt/sources.list.d/*; do
            if [[ -e $f ]]; then stat -c '%n %s %Y' "$f" || true; fi
        done
    } 2>/dev/null | sha256sum | cut -d' ' -f1
}

# fetch_deb CACHE WORK PKG VERSION: prints the path of PKG_VERSION_*.deb in
# CACHE, downloading it (into WORK first) when it is not there.
fetch_deb() {
    local cache=$1 work=$2 pkg=$3 ver=$4 f
    local fver=${ver//:/%3a}
    for f in "$cache/${pkg}_${fver}_"*.deb; do
        if [[ -s $f ]] && dpkg-deb -f "$f" Package >/dev/null 2>&1; then
            printf '%s\n' "$f"
            return 0
        fi
    done
    log "downloading $pkg=$ver"
    (cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >&2) || return 1
    for f in "$work/${pkg}_${fver}_"*.deb; do
        [[ -s $f ]] || continue
        mv "$f" "$cache/"
        printf '%s\n' "$cache/${f##*/}"
        return 0
    done
    return 1
}

# bookworm_mirror [OVERRIDE]: OVERRIDE when set, else the URI the host's apt
# sources use for bookworm, else Debian's own.
bookworm_mirror() {
    if [[ -n ${1:-} ]]; then
        printf '%s\n' "$1"
        return
    fi
    local uri
    # deb822 sources first, then one-line ones: the URI serving bookworm main.
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
        /^URIs:/ {u=$2} /^Suites:/ {s=$0}
        /^$/ {if (s ~ / bookworm( |$)/ && u != "") {print u; exit} u=""; s=""}
        END {if (s ~ / bookworm( |$)/ && u != "") print u}' | head -n1)
    [[ -n $uri ]] || uri=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
    printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}
