#!/bin/bash
# Build the hello world test programs from src/hello.c with Debian's cross gcc and
# riscv64 glibc (libc6-dev-riscv64-cross). Output: programs/hello-static, programs/hello-dynamic.
source "$(dirname "$0")/common.sh"

mkdir -p "$IMAGES/programs"
cc="${CROSS}gcc -O2 -Wall -Wextra -ffile-prefix-map=$IMAGES=."
$cc -static -o "$IMAGES/programs/hello-static" "$IMAGES/src/hello.c"
$cc -o "$IMAGES/programs/hello-dynamic" "$IMAGES/src/hello.c"
${CROSS}strip "$IMAGES/programs/hello-static" "$IMAGES/programs/hello-dynamic"
${CROSS}readelf -l "$IMAGES/programs/hello-dynamic" | grep -q '/lib/ld-linux-riscv64-lp64d.so.1' \
    || die "hello-dynamic has an unexpected interpreter"
log "hello: built hello-static and hello-dynamic"
