# Shared settings for the popek image recipes. Sourced, not run.
# Every path is derived from this file's location so a fresh clone works anywhere.
set -euo pipefail

IMAGES="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${POPEK_IMAGES_WORK:-$IMAGES/work}"     # build trees, gitignored
SRC="$WORK/src"                                # unpacked Debian source packages
mkdir -p "$WORK"
CROSS=riscv64-linux-gnu-
JOBS="${JOBS:-2}"
MAKE="nice -n 10 make -j$JOBS"

# Reproducible builds: fixed timestamps/identities so a rebuild yields identical
# bytes and `git status` stays clean when nothing really changed.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1700000000}"   # 2023-11-14T22:13:20Z
export KBUILD_BUILD_TIMESTAMP="@$SOURCE_DATE_EPOCH"
export KBUILD_BUILD_USER=popek KBUILD_BUILD_HOST=popek KBUILD_BUILD_VERSION=1
export LC_ALL=C TZ=UTC

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Path of the unpacked Debian source tree of package $1 (e.g. busybox -> .../busybox-1.35.0).
srcdir() {
    local d
    d=$(find "$SRC" -mindepth 1 -maxdepth 1 -type d -name "$1-*" | sort | tail -n1)
    [ -n "$d" ] || die "source of $1 not unpacked; run recipes/sources.sh"
    echo "$d"
}

# Version of Debian source package $1 as recorded in its .dsc (e.g. 1:1.35.0-4+deb12u1).
srcversion() {
    local dsc
    dsc=$(find "$SRC" -maxdepth 1 -name "$1_*.dsc" | sort | tail -n1)
    [ -n "$dsc" ] || die "no .dsc for $1"
    sed -n 's/^Version: //p' "$dsc"
}
