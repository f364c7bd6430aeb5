#!/bin/bash
# Cross-build a static riscv64 Lua 5.4 interpreter from Debian's lua5.4 source
# package (Debian patches applied by `apt-get source`). Debian's own build goes
# through libtool and produces a shared liblua; for a single static binary we
# compile the same sources directly, every file at -O2.
# Output: programs/lua (stripped).
source "$(dirname "$0")/common.sh"

lsrc=$(srcdir lua5.4)
lout="$WORK/build-lua"
rm -rf "$lout"; mkdir -p "$lout"
# Debian's luaconf.h includes this generated header (normally written by debian/rules).
cat >"$lout/lua5.4-deb-multiarch.h" <<'H'
#ifndef _LUA_DEB_MULTIARCH_
#define _LUA_DEB_MULTIARCH_
#define DEB_HOST_MULTIARCH "riscv64-linux-gnu"
#endif
H
# All library and core files plus lua.c; luac.c is the separate compiler (not built).
mapfile -t files < <(cd "$lsrc/src" && ls *.c | grep -vx 'luac.c' | sort)
log "lua: compiling ${#files[@]} files"
start=$(date +%s)
(cd "$lsrc/src" && nice -n 10 ${CROSS}gcc -std=gnu99 -O2 -Wall -Wextra \
    -DLUA_COMPAT_5_3 -DLUA_USE_POSIX -I"$lout" -ffile-prefix-map="$lsrc"=lua5.4 \
    -static -o "$lout/lua" "${files[@]}" -lm)
log "lua: built in $(( $(date +%s) - start ))s"
${CROSS}strip -o "$IMAGES/programs/lua" "$lout/lua"
