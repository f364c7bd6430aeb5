#!/bin/bash
# Cross-build a static riscv64 busybox from Debian's busybox source package,
# configured by config/busybox.config. Output: programs/busybox (stripped).
source "$(dirname "$0")/common.sh"

bsrc=$(srcdir busybox)
bout="$WORK/build-busybox"
mkdir -p "$bout"
bmake() {
    $MAKE -C "$bsrc" O="$bout" CROSS_COMPILE="$CROSS" \
        BB_EXTRA_VERSION="Debian $(srcversion busybox), popek" "$@"
}
# Reconfigure only when the committed config changed: oldconfig rewrites .config,
# which would make every rerun a full rebuild.
if ! cmp -s "$IMAGES/config/busybox.config" "$bout/.config.popek" || [ ! -f "$bout/.config" ]; then
    log "busybox: configuring"
    cp "$IMAGES/config/busybox.config" "$bout/.config"
    { yes "" || true; } | bmake oldconfig >/dev/null
    cp "$IMAGES/config/busybox.config" "$bout/.config.popek"
fi

# oldconfig must not have had to invent answers: the committed config is complete.
for sym in STATIC ASH SH_IS_ASH LS SORT AWK SED SHA256SUM GZIP GUNZIP FIND DEVMEM \
           CTTYHACK SETSID BASE64 POWEROFF REBOOT MOUNT UNAME CAT DD HEXDUMP SYNC; do
    grep -qx "CONFIG_$sym=y" "$bout/.config" || die "busybox config lacks CONFIG_$sym=y"
done
log "busybox: building"
start=$(date +%s)
bmake >"$bout/build.log" 2>&1 || { tail -n 40 "$bout/build.log"; die "busybox build failed"; }
bmake busybox.links >>"$bout/build.log" 2>&1 || die "make busybox.links failed"
log "busybox: built in $(( $(date +%s) - start ))s"
mkdir -p "$IMAGES/programs"
${CROSS}strip -o "$IMAGES/programs/busybox" "$bout/busybox_unstripped"
# The applet list (one install path per line) lets recipes/initramfs.sh create the
# symlinks without running the riscv64 binary.
cp "$bout/busybox.links" "$IMAGES/programs/busybox.links"
file "$IMAGES/programs/busybox" | grep -q "statically linked" || die "busybox is not static"
