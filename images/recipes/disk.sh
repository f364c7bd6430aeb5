#!/bin/bash
# Build linux/disk.ext4.xz: a small (16 MiB) ext4 disk that the init script mounts
# on /mnt when a virtio-blk device is present. Contents: a README, the test
# programs, and the glibc loader + libc so that `chroot /mnt /bin/hello-dynamic`
# exercises the dynamic-linking path inside the full-system guest.
# Reproducible: fixed UUID, hash seed, timestamps (E2FSPROGS_FAKE_TIME).
source "$(dirname "$0")/common.sh"

stage="$WORK/disk-root"
rm -rf "$stage"; mkdir -p "$stage/bin" "$stage/lib"
cat >"$stage/README" <<'TXT'
popek test disk
===============

This ext4 file system is images/linux/disk.ext4.xz from the popek repository,
built by images/recipes/disk.sh. The guest init mounts it on /mnt.

  /README              this file
  /bin/lua             Lua 5.4 (static)
  /bin/hello-static    hello world, static
  /bin/hello-dynamic   hello world, dynamic (glibc); run: chroot /mnt /bin/hello-dynamic
  /lib/                the glibc loader and libc.so.6 for hello-dynamic
TXT
install -m 0755 "$IMAGES/programs/lua" "$IMAGES/programs/hello-static" \
    "$IMAGES/programs/hello-dynamic" "$stage/bin/"
sysroot=/usr/riscv64-linux-gnu/lib
install -m 0755 "$sysroot/ld-linux-riscv64-lp64d.so.1" "$sysroot/libc.so.6" "$stage/lib/"
${CROSS}strip --strip-unneeded "$stage/lib/libc.so.6"
find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

img="$WORK/disk.ext4"
rm -f "$img"
E2FSPROGS_FAKE_TIME="$SOURCE_DATE_EPOCH" mke2fs -q -F -t ext4 -b 4096 -I 256 -N 256 \
    -L popek -U 706f7065-6b00-4000-8000-000000000001 \
    -E hash_seed=706f7065-6b00-4000-8000-000000000002,root_owner=0:0 \
    -d "$stage" "$img" 16M >/dev/null
# mke2fs -d copies each file's ctime from the host, and ctime cannot be set with
# touch: pin it afterwards with debugfs so the image is reproducible.
{ echo "sif / ctime @$SOURCE_DATE_EPOCH"; echo "sif /lost+found ctime @$SOURCE_DATE_EPOCH"
  (cd "$stage" && find . -mindepth 1 | sort | sed "s|^\.\(.*\)|sif \1 ctime @$SOURCE_DATE_EPOCH|")
} >"$WORK/disk-ctime.debugfs"
E2FSPROGS_FAKE_TIME="$SOURCE_DATE_EPOCH" debugfs -w -f "$WORK/disk-ctime.debugfs" "$img" >/dev/null 2>&1
e2fsck -fn "$img" >/dev/null 2>&1 || die "fresh disk image fails fsck"
xz -9 -T1 -c "$img" >"$IMAGES/linux/disk.ext4.xz"
log "disk: $(stat -c %s "$img") bytes -> linux/disk.ext4.xz ($(stat -c %s "$IMAGES/linux/disk.ext4.xz") bytes)"
