#!/bin/bash
# Build the guest agent from src/popek-agent.c with Debian's cross gcc and riscv64 glibc,
# static. Output: programs/popek-agent (the initramfs carries it as /sbin/popek-agent).
source "$(dirname "$0")/common.sh"

mkdir -p "$IMAGES/programs"
${CROSS}gcc -O2 -Wall -Wextra -Werror -static -ffile-prefix-map="$IMAGES=." \
    -o "$IMAGES/programs/popek-agent" "$IMAGES/src/popek-agent.c"
${CROSS}strip "$IMAGES/programs/popek-agent"
log "agent: built popek-agent ($(stat -c %s "$IMAGES/programs/popek-agent") bytes)"
