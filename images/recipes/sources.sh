#!/bin/bash
# Fetch and unpack the Debian source packages (with Debian's patches applied) into
# work/src. The kernel source comes from the linux-source-6.1 binary package and
# is unpacked by recipes/linux.sh. Skips packages already unpacked.
source "$(dirname "$0")/common.sh"

mkdir -p "$SRC"
for pkg in busybox lua5.4; do
    if find "$SRC" -mindepth 1 -maxdepth 1 -type d -name "$pkg-*" | grep -q .; then
        log "sources: $pkg already unpacked ($(srcversion "$pkg"))"
        continue
    fi
    log "sources: apt-get source $pkg"
    (cd "$SRC" && apt-get source -qq "$pkg" >/dev/null 2>&1) || die "apt-get source $pkg failed"
    log "sources: $pkg $(srcversion "$pkg")"
done
