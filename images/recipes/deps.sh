#!/bin/bash
# Install the Debian 12 packages the recipes need (only when root; otherwise just
# check), and make sure apt knows deb-src so `apt-get source` works.
source "$(dirname "$0")/common.sh"

PKGS=(gcc-riscv64-linux-gnu binutils-riscv64-linux-gnu libc6-dev-riscv64-cross
      linux-source-6.1 bc bison flex libssl-dev cpio dpkg-dev gcc make xz-utils file
      e2fsprogs qemu-user qemu-system-misc opensbi passt python3)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

have_src() { grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; }

if [ "$(id -u)" = 0 ]; then
    updated=0
    if ! have_src; then
        log "deps: adding deb-src entries (/etc/apt/sources.list.d/popek-deb-src.sources)"
        # Mirror every enabled Debian 'deb' stanza as 'deb-src'.
        for f in /etc/apt/sources.list.d/*.sources; do
            [ "${f##*/}" = popek-deb-src.sources ] && continue
            [ -f "$f" ] && grep -q 'deb.debian.org\|debian' "$f" && awk '
                BEGIN { RS=""; ORS="\n\n" }
                /Types:[^\n]*deb/ && /debian/ { sub(/Types:[^\n]*/, "Types: deb-src"); print }' "$f"
        done >/etc/apt/sources.list.d/popek-deb-src.sources
        if [ -f /etc/apt/sources.list ]; then
            sed -n 's/^deb \(.*debian.*\)/deb-src \1/p' /etc/apt/sources.list >/etc/apt/sources.list.d/popek-deb-src.list
        fi
        apt-get update -qq; updated=1
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        log "deps: installing ${missing[*]}"
        [ "$updated" = 1 ] || apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
else
    [ ${#missing[@]} -eq 0 ] || die "missing packages (run as root to install): ${missing[*]}"
    have_src || die "no deb-src entries in apt sources (run as root to add them)"
fi
log "deps: all packages present"
