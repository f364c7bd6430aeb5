#!/bin/bash
# Check the committed artifacts with QEMU, the reference that popek is measured
# against: user programs under qemu-riscv64, kernels + initramfs + disk under
# qemu-system-riscv64 -M virt. Works from the committed files alone (no build tree).
# usage: verify.sh [--quick]   (--quick: skip the SMP kernel and the OpenSBI fw_jump boot)
source "$(dirname "$0")/common.sh"

quick=0; [ "${1:-}" = --quick ] && quick=1
vdir="$WORK/verify"
rm -rf "$vdir"; mkdir -p "$vdir"
P="$IMAGES/programs" L="$IMAGES/linux"
fails=0
pass() { log "PASS $*"; }
fail() { log "FAIL $*"; fails=$((fails + 1)); }

# ---- user mode -------------------------------------------------------------
out=$(timeout 60 qemu-riscv64 "$P/hello-static" x 2>&1) && [[ "$out" == "Hello from riscv64, argc=2"* ]] \
    && pass "hello-static: $out" || fail "hello-static: $out"
out=$(timeout 60 qemu-riscv64 -L /usr/riscv64-linux-gnu "$P/hello-dynamic" 2>&1) && [[ "$out" == "Hello from riscv64"* ]] \
    && pass "hello-dynamic: $out" || fail "hello-dynamic: $out"
out=$(timeout 60 qemu-riscv64 "$P/lua" -e 'print(_VERSION, 6*7, ("x"):rep(3))' 2>&1) && [ "$out" = $'Lua 5.4\t42\txxx' ] \
    && pass "lua: $out" || fail "lua: $out"
out=$(printf 'b a\nc\n' | timeout 60 qemu-riscv64 "$P/busybox" awk '{print NF":"$1}' 2>&1) && [ "$out" = $'2:b\n1:c' ] \
    && pass "busybox awk" || fail "busybox awk: $out"
out=$(printf 'abc' | timeout 60 qemu-riscv64 "$P/busybox" sha256sum 2>&1) \
    && [[ "$out" == ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad* ]] \
    && pass "busybox sha256sum" || fail "busybox sha256sum: $out"

# ---- full system -----------------------------------------------------------
xz -dc "$L/Image.xz" >"$vdir/Image"
xz -dc "$L/disk.ext4.xz" >"$vdir/disk.ext4"
[ -f "$L/Image-smp.xz" ] && xz -dc "$L/Image-smp.xz" >"$vdir/Image-smp"

# boot KERNEL EXTRA_QEMU_ARGS... -- SHELL_COMMAND   -> sets $out and $rc
# ($append, if set, goes on the kernel command line too.)
boot() {
    local kernel=$1; shift
    local args=()
    while [ "$1" != -- ]; do args+=("$1"); shift; done; shift
    local b64; b64=$(printf '%s' "$1" | base64 -w0)
    xz -dc "$L/disk.ext4.xz" >"$vdir/disk.ext4"    # fresh disk each boot
    local t0; t0=$(date +%s.%N)
    set +e
    out=$(timeout 120 qemu-system-riscv64 -M virt -m 256M -nographic "${args[@]}" \
        -kernel "$kernel" -initrd "$L/initramfs.cpio.gz" \
        -append "console=ttyS0 ${append:-}popek.cmd=$b64" \
        -drive file="$vdir/disk.ext4",format=raw,if=none,id=d0 -device virtio-blk-device,drive=d0 \
        -device virtio-rng-device </dev/null 2>&1 | tr -d '\r')
    rc=${PIPESTATUS[0]}
    set -e
    secs=$(echo "$(date +%s.%N) - $t0" | bc)
    printf '%s\n' "$out" >"$vdir/last-boot.log"
}
# Text printed between the markers.
between() { printf '%s\n' "$out" | sed -n '/^POPEK-CMD-BEGIN$/,/^POPEK-CMD-END /p' | sed '1d;$d'; }

boot "$vdir/Image" -- 'uname -m; cat /proc/cpuinfo'
if [ "$rc" = 0 ] && between | head -n1 | grep -qx riscv64 && printf '%s\n' "$out" | grep -qx 'POPEK-CMD-END 0'; then
    pass "boot Image: riscv64 between markers, qemu exit 0 (${secs}s)"
else fail "boot Image: rc=$rc"; cat "$vdir/last-boot.log"; fi
cp "$vdir/last-boot.log" "$vdir/boot-Image.log"

boot "$vdir/Image" -- 'echo failing on purpose; exit 7'
[ "$rc" = 7 ] && printf '%s\n' "$out" | grep -qx 'POPEK-CMD-END 7' \
    && pass "exit status 7 -> finisher 0x73333 -> qemu exit 7" || fail "exit status: rc=$rc"

boot "$vdir/Image" -- 'cat /mnt/README | head -n1; chroot /mnt /bin/hello-dynamic; /mnt/bin/lua -e "print(1+1)"; ls /dev/hwrng; date +%Y'
exp=$'popek test disk\nHello from riscv64, argc=1 argv[0]=/bin/hello-dynamic\n2\n/dev/hwrng'
got=$(between | head -n4)
[ "$rc" = 0 ] && [ "$got" = "$exp" ] && between | tail -n1 | grep -qx '20[0-9][0-9]' \
    && pass "disk, dynamic glibc program, lua, hwrng, goldfish rtc" || { fail "disk: rc=$rc"; cat "$vdir/last-boot.log"; }

boot "$vdir/Image" -no-reboot -- 'echo rebooting; reboot -f'
[ "$rc" = 0 ] && printf '%s\n' "$out" | grep -q 'reboot: Restarting system' \
    && pass "reboot -f (syscon reboot, qemu -no-reboot exits 0)" || { fail "reboot: rc=$rc"; tail -5 "$vdir/last-boot.log"; }

# Interactive mode: no popek.cmd, commands typed on the serial console. Input is
# sent only once the banner is out: the 8250 driver discards whatever arrived in
# the UART before the shell opened the tty.
rm -f "$vdir/console.in"; mkfifo "$vdir/console.in"
timeout 120 qemu-system-riscv64 -M virt -m 256M -nographic \
    -kernel "$vdir/Image" -initrd "$L/initramfs.cpio.gz" -append console=ttyS0 \
    <"$vdir/console.in" >"$vdir/boot-interactive.log" 2>&1 &
qpid=$!
exec 9>"$vdir/console.in"
for _ in $(seq 600); do grep -q 'popek guest:' "$vdir/boot-interactive.log" && break; sleep 0.1; done
sleep 0.5
printf 'echo inter$((20+1))active\nexit\n' >&9
set +e; wait "$qpid"; rc=$?; set -e
exec 9>&-
out=$(tr -d '\r' <"$vdir/boot-interactive.log")
[ "$rc" = 0 ] && printf '%s\n' "$out" | grep -qx 'inter21active' \
    && pass "interactive shell on ttyS0, poweroff on exit" || { fail "interactive: rc=$rc"; tail -20 "$vdir/boot-interactive.log"; }

# Networking, as a QEMU user expects it: the guest's /init gets 10.0.2.15/24 by DHCP
# and says so; the guest fetches from a web server on the host's loopback through the
# gateway 10.0.2.2, and serves a page (busybox httpd, one connection through nc -e) that
# the host fetches through a forwarded port. netboot NAME NETDEV_ARGS... runs it.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
mkdir -p "$vdir/www"; echo "host page $$" >"$vdir/www/index.html"
web_port=$(free_port)
python3 -m http.server "$web_port" --bind 127.0.0.1 --directory "$vdir/www" >"$vdir/http.log" 2>&1 &
web_pid=$!
for _ in $(seq 100); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$web_port/')" 2>/dev/null && break; sleep 0.1; done
netboot() {
    local name=$1; shift
    local cmd="mkdir -p /tmp/w; echo guest page > /tmp/w/index.html
timeout 60 nc -l -p 80 -e httpd -i -h /tmp/w & wget -q -O- http://10.0.2.2:$web_port/; echo GUEST-SERVING; wait"
    local log="$vdir/boot-net-$name.log" t0; t0=$(date +%s.%N)
    rm -f "$log"
    timeout 120 qemu-system-riscv64 -M virt -m 256M -nographic -kernel "$vdir/Image" \
        -initrd "$L/initramfs.cpio.gz" -append "console=ttyS0 popek.cmd=$(printf '%s' "$cmd" | base64 -w0)" \
        -device virtio-net-device,netdev=n0 "$@" </dev/null >"$log" 2>&1 &
    local qpid=$!
    for _ in $(seq 600); do grep -qs GUEST-SERVING "$log" && break; sleep 0.1; done
    local fetched; fetched=$(python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$fwd_port/', timeout=10).read().decode(), end='')" 2>&1)
    set +e; wait "$qpid"; rc=$?; set -e
    secs=$(echo "$(date +%s.%N) - $t0" | bc)
    out=$(tr -d '\r' <"$log")
    net_line=$(printf '%s\n' "$out" | grep '^eth0: ' || true)
    if [ "$rc" = 0 ] && [[ "$net_line" == "eth0: 10.0.2.15/24 via 10.0.2.2, "* ]] \
        && between | head -n1 | grep -qxF "host page $$" && [ "$fetched" = "guest page" ]; then
        pass "network ($name): '$net_line', wget from the host's loopback, host fetch through port forward (${secs}s)"
    else fail "network ($name): rc=$rc net='$net_line' fetched='$fetched'"; cat "$log"; fi
}
fwd_port=$(free_port)
netboot user -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$fwd_port-:80"
# The same through Debian's passt, told QEMU's user-network addresses (see README).
if command -v passt >/dev/null; then
    fwd_port=$(free_port)
    # As root, passt drops to user nobody before it binds its socket: give it a directory
    # nobody can write to.
    sockdir=$(mktemp -d /tmp/popek-verify.XXXXXX); chmod 0777 "$sockdir"; sock="$sockdir/passt.sock"
    passt -f -1 -4 -a 10.0.2.15 -n 24 -g 10.0.2.2 -t "127.0.0.1/$fwd_port:80" -u none \
        -s "$sock" -l "$vdir/passt.log" >/dev/null 2>&1 &
    passt_pid=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
    netboot passt -netdev "stream,id=n0,server=off,addr.type=unix,addr.path=$sock"
    # -1 (one client): passt exits once QEMU has closed the socket.
    for _ in $(seq 50); do kill -0 "$passt_pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$passt_pid" 2>/dev/null && { fail "passt still running after QEMU exited"; kill "$passt_pid"; }
    rm -rf "$sockdir"
else
    fail "network (passt): passt is not installed (apt-get install passt)"
fi
kill "$web_pid"

grep -q '^eth0:' "$vdir/boot-Image.log" && fail "a boot without a NIC printed an eth0 line"

if [ "$quick" = 0 ]; then
    fw=/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_jump.bin
    boot "$vdir/Image" -bios "$fw" -- 'uname -m'
    [ "$rc" = 0 ] && [ "$(between)" = riscv64 ] && printf '%s\n' "$out" | grep -q 'OpenSBI' \
        && pass "boot with Debian OpenSBI fw_jump.bin (${secs}s)" || { fail "fw_jump: rc=$rc"; cat "$vdir/last-boot.log"; }

    if [ -f "$vdir/Image-smp" ]; then
        # ...configured by the kernel (ip=dhcp) this time.
        append="ip=dhcp " boot "$vdir/Image-smp" -smp 2 -device virtio-net-device,netdev=n0 -netdev user,id=n0 -- \
            'grep -c ^processor /proc/cpuinfo; uname -m; cat /etc/resolv.conf'
        [ "$rc" = 0 ] && [ "$(between)" = $'2\nriscv64\nnameserver 10.0.2.3' ] \
            && printf '%s\n' "$out" | grep -q 'IP-Config: Complete' \
            && printf '%s\n' "$out" | grep -qx 'eth0: 10.0.2.15/24 via 10.0.2.2, mtu 1500, dns 10.0.2.3' \
            && pass "boot Image-smp -smp 2, virtio-net configured by ip=dhcp (${secs}s)" || { fail "smp: rc=$rc"; cat "$vdir/last-boot.log"; }
        cp "$vdir/last-boot.log" "$vdir/boot-Image-smp.log"
    fi
fi

[ "$fails" = 0 ] || die "$fails verification(s) failed (logs in $vdir)"
log "verify: all checks passed"
