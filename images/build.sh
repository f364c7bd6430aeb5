#!/bin/bash
# Rebuild every popek guest artifact from Debian packages, then verify with QEMU.
#   images/build.sh            everything (deps, sources, programs, kernels, initramfs, disk, verify, manifest)
#   images/build.sh STEP...    only the named steps, in the given order
# Steps: deps sources busybox lua hello agent linux linux-smp initramfs disk verify manifest
# Idempotent: build trees persist in images/work/ (gitignored) and outputs are
# reproducible, so a rerun leaves `git status` clean.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
R="$here/recipes"

run_step() {
    local t0=$SECONDS
    case "$1" in
        deps)      bash "$R/deps.sh" ;;
        sources)   bash "$R/sources.sh" ;;
        busybox)   bash "$R/busybox.sh" ;;
        lua)       bash "$R/lua.sh" ;;
        hello)     bash "$R/hello.sh" ;;
        agent)     bash "$R/agent.sh" ;;
        linux)     bash "$R/linux.sh" virt ;;
        linux-smp) bash "$R/linux.sh" virt-smp ;;
        initramfs) bash "$R/initramfs.sh" ;;
        disk)      bash "$R/disk.sh" ;;
        verify)    bash "$R/verify.sh" ;;
        manifest)  python3 "$R/manifest.py" ;;
        *) echo "unknown step: $1" >&2; exit 2 ;;
    esac
    echo "== step $1 done in $((SECONDS - t0))s" >&2
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(deps sources busybox lua hello agent linux linux-smp initramfs disk verify manifest)
for s in "${steps[@]}"; do run_step "$s"; done
