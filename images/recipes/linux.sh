#!/bin/bash
# Cross-build the guest kernel from Debian's linux-source-6.1.
# usage: linux.sh virt|virt-smp
#   virt      tinyconfig + config/linux-virt.config                      -> linux/Image.xz
#   virt-smp  tinyconfig + config/linux-virt.config + linux-virt-smp.config -> linux/Image-smp.xz
# The build tree (O=) persists under work/, so reruns are incremental.
source "$(dirname "$0")/common.sh"

variant="${1:?usage: linux.sh virt|virt-smp}"
case "$variant" in
    virt)     frags=("$IMAGES/config/linux-virt.config"); out=Image ;;
    virt-smp) frags=("$IMAGES/config/linux-virt.config" "$IMAGES/config/linux-virt-smp.config"); out=Image-smp ;;
    *) die "unknown variant $variant" ;;
esac

ksrc="$WORK/linux-source-6.1"
if [ ! -f "$ksrc/Makefile" ]; then
    log "unpacking /usr/src/linux-source-6.1.tar.xz"
    tar -C "$WORK" -xf /usr/src/linux-source-6.1.tar.xz
fi
kout="$WORK/build-linux-$variant"
mkdir -p "$kout"
kmake() { $MAKE -C "$ksrc" O="$kout" ARCH=riscv CROSS_COMPILE="$CROSS" "$@"; }

# Regenerate .config from scratch each time: the committed fragments are the truth.
log "linux $variant: configuring"
kmake -s tinyconfig >/dev/null
(cd "$kout" && ARCH=riscv CROSS_COMPILE="$CROSS" \
    "$ksrc/scripts/kconfig/merge_config.sh" -m -O "$kout" .config "${frags[@]}" >/dev/null)
kmake -s olddefconfig >/dev/null

# merge_config only warns; insist that every requested setting is really in effect.
# Later fragments override earlier ones, as in merge_config.
declare -A want=()
for f in "${frags[@]}"; do
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*) want[${line%%=*}]=$line ;;
            "# CONFIG_"*" is not set") sym=${line#\# }; want[${sym%% *}]=$line ;;
        esac
    done < "$f"
done
bad=0
for sym in "${!want[@]}"; do
    line=${want[$sym]}
    if [[ "$line" == "#"* ]]; then
        grep -q "^$sym=" "$kout/.config" && { log "config forced on: $sym"; bad=1; }
    else
        grep -qxF "$line" "$kout/.config" || { log "config lost: $line"; bad=1; }
    fi
done
[ "$bad" = 0 ] || die "kernel config $variant does not match the fragments"

log "linux $variant: building (log: $kout/build.log)"
start=$(date +%s)
kmake Image >"$kout/build.log" 2>&1 || { tail -n 40 "$kout/build.log"; die "kernel build failed"; }
log "linux $variant: built in $(( $(date +%s) - start ))s"

mkdir -p "$IMAGES/linux"
cp "$kout/.config" "$IMAGES/linux/$out.config"
xz -9 -T1 -c "$kout/arch/riscv/boot/Image" >"$IMAGES/linux/$out.xz.tmp"
mv "$IMAGES/linux/$out.xz.tmp" "$IMAGES/linux/$out.xz"
log "linux $variant: $(stat -c %s "$kout/arch/riscv/boot/Image") bytes -> linux/$out.xz ($(stat -c %s "$IMAGES/linux/$out.xz") bytes)"
