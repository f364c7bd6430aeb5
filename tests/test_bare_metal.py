"""``--bios none``: a bare-metal ELF from reset in M-mode on every hart, as QEMU runs it.

The guest walks xv6-riscv's boot path (xv6 itself is built and run by hand, see the
README): every hart starts at the ELF's entry in M-mode with a0 = its hartid and a1 =
the device tree, sets up S-mode (delegation, PMP, satp 0), arms its CLINT timer with an
M-mode handler that passes each tick on as a supervisor software interrupt, and `mret`s
to S-mode; there hart 0 drives the virtio-blk disk on slot 0 (modern MMIO, without
VERSION_1, as xv6 does) with PLIC interrupts, and reads an empty slot's registers, until
every hart has seen its ticks. The same ELF and disk run on qemu-system-riscv64 and must
print the same.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from popek.cpu.state import CTL_INSTRET
from popek.engine.engine import TIERS
from popek.machine.config import DiskSpec, MachineConfig
from popek.machine.virt import VirtMachine
from tests.linux_guest import popek_run
from tests.vmm_guests import GCC, build

CPUS = 3
MEM = 128 << 20
SECTOR0 = b"popek bare metal sector zero\n".ljust(512, b".")

_START = r"""
.section .text.start
.globl _start
_start:                     # every hart, in M-mode: a0 = hartid, a1 = device tree
  la sp, stacks
  addi t0, a0, 1
  slli t0, t0, 12
  add sp, sp, t0
  call mstart
1: j 1b

.text
.align 4
.globl timervec
timervec:                   # M-mode: the next tick, and a software interrupt for S-mode
  csrrw a0, mscratch, a0
  sd a1, 0(a0)
  sd a2, 8(a0)
  sd a3, 16(a0)
  ld a1, 24(a0)             # this hart's mtimecmp
  ld a2, 32(a0)             # the interval
  ld a3, 0(a1)
  add a3, a3, a2
  sd a3, 0(a1)
  li a1, 2
  csrw sip, a1
  ld a3, 16(a0)
  ld a2, 8(a0)
  ld a1, 0(a0)
  csrrw a0, mscratch, a0
  mret

.align 4
.globl kernelvec
kernelvec:                  # S-mode traps: save what C may clobber, call strap
  addi sp, sp, -128
  .irp r, ra,t0,t1,t2,t3,t4,t5,t6,a0,a1,a2,a3,a4,a5,a6,a7
  addi sp, sp, -8
  sd \r, 0(sp)
  .endr
  call strap
  .irp r, a7,a6,a5,a4,a3,a2,a1,a0,t6,t5,t4,t3,t2,t1,t0,ra
  ld \r, 0(sp)
  addi sp, sp, 8
  .endr
  addi sp, sp, 128
  sret

.bss
.align 12
.globl stacks
stacks: .space 4096 * 4
"""

_PRINT = r"""  /* what both guests print with */
#define UART ((volatile unsigned char *)0x10000000UL)
static void put(char c) { *UART = c; }
static void say(const char *s) { while (*s) put(*s++); }
static void hex(unsigned long n) {
    say("0x");
    for (int i = 60; i >= 0; i -= 4) if (n >> i || !i) put("0123456789abcdef"[(n >> i) & 15]);
}
"""

_GUEST = r"""
#define NCPU 3
#define TICKS 4
#define INTERVAL 20000UL                   /* 2 ms of guest time */
#define FINISHER ((volatile unsigned int *)0x100000UL)
#define MTIMECMP(h) ((volatile unsigned long *)(0x2004000UL + 8 * (h)))
#define MTIME ((volatile unsigned long *)0x200bff8UL)
#define PLIC(off) ((volatile unsigned int *)(0x0c000000UL + (off)))
#define VIRTIO(off) ((volatile unsigned int *)(0x10001000UL + (off)))
#define CSRR(name, v) __asm__ volatile("csrr %0, " #name : "=r"(v))
#define CSRW(name, v) __asm__ volatile("csrw " #name ", %0" : : "r"(v))
#define CSRS(name, v) __asm__ volatile("csrs " #name ", %0" : : "r"(v))
#define CSRC(name, v) __asm__ volatile("csrc " #name ", %0" : : "r"(v))
#define FENCE() __asm__ volatile("fence" : : : "memory")
""" + _PRINT + r"""
static void poweroff(unsigned code) {
    *FINISHER = code ? (code << 16) | 0x3333 : 0x5555;
    for (;;) {}
}
static unsigned long hartid(void) {
    unsigned long t;
    __asm__ volatile("mv %0, tp" : "=r"(t));
    return t;
}

extern char timervec[], kernelvec[];
void smain(void);
static unsigned long boot_a0[NCPU], boot_a1[NCPU], scratch[NCPU][5];
static volatile unsigned long ticks[NCPU] __attribute__((aligned(64)));
static volatile unsigned long arrived[NCPU] __attribute__((aligned(64)));
static volatile unsigned long done[NCPU] __attribute__((aligned(64)));
static volatile unsigned long disk_irqs;

void mstart(unsigned long a0, unsigned long a1) {       /* M-mode, as xv6's start() */
    unsigned long id, x;
    CSRR(mhartid, id);
    boot_a0[id] = a0;
    boot_a1[id] = a1;
    CSRR(mstatus, x);
    x = (x & ~(3UL << 11)) | (1UL << 11);               /* MPP = S */
    CSRW(mstatus, x);
    CSRW(mepc, (unsigned long)smain);
    CSRW(satp, 0UL);
    CSRW(medeleg, 0xffffUL);
    CSRW(mideleg, 0xffffUL);
    CSRS(sie, (1UL << 9) | (1UL << 5) | (1UL << 1));    /* SEIE, STIE, SSIE */
    CSRW(pmpaddr0, 0x3fffffffffffffUL);
    CSRW(pmpcfg0, 0xfUL);
    *MTIMECMP(id) = *MTIME + INTERVAL;
    scratch[id][3] = (unsigned long)MTIMECMP(id);
    scratch[id][4] = INTERVAL;
    CSRW(mscratch, (unsigned long)scratch[id]);
    CSRW(mtvec, (unsigned long)timervec);
    CSRS(mstatus, 1UL << 3);                            /* MIE */
    CSRS(mie, 1UL << 7);                                /* MTIE */
    __asm__ volatile("mv tp, %0\n mret" : : "r"(id));
}

void strap(void) {                                      /* S-mode, as xv6's devintr() */
    unsigned long cause;
    CSRR(scause, cause);
    if (cause == ((1UL << 63) | 1)) {                   /* the tick, passed on by M-mode */
        ticks[hartid()]++;
        CSRC(sip, 2UL);
    } else if (cause == ((1UL << 63) | 9)) {            /* the PLIC */
        unsigned int irq = *PLIC(0x201004 + 0x2000 * hartid());
        if (irq == 1) {
            *VIRTIO(0x064) = *VIRTIO(0x060) & 3;
            disk_irqs++;
        }
        if (irq) *PLIC(0x201004 + 0x2000 * hartid()) = irq;
    } else {
        say("unexpected trap "); hex(cause); put('\n');
        poweroff(99);
    }
}

struct desc { unsigned long addr; unsigned int len; unsigned short flags, next; };
static struct desc desc[8] __attribute__((aligned(4096)));
static struct { unsigned short flags, idx, ring[8], event; } avail __attribute__((aligned(4096)));
static struct { unsigned short flags, idx; struct { unsigned int id, len; } ring[8]; }
    used __attribute__((aligned(4096)));
static struct { unsigned int type, reserved; unsigned long sector; } req;
static unsigned char data[512];
static volatile unsigned char status;

static void disk_io(int write, unsigned long sector) {  /* one request, as xv6's virtio_disk_rw */
    req.type = write; req.reserved = 0; req.sector = sector;
    status = 0xff;
    desc[0] = (struct desc){(unsigned long)&req, sizeof req, 1, 1};
    desc[1] = (struct desc){(unsigned long)data, 512, write ? 1 : 3, 2};
    desc[2] = (struct desc){(unsigned long)&status, 1, 2, 0};
    unsigned long irqs = disk_irqs;
    avail.ring[avail.idx % 8] = 0;
    FENCE();
    avail.idx++;
    FENCE();
    *VIRTIO(0x050) = 0;
    while (disk_irqs == irqs) __asm__ volatile("wfi");
    FENCE();
    say(write ? "write " : "read "); hex(sector); say(" status "); hex(status);
    say(" used "); hex(used.idx); put('\n');
}

static void disk(void) {
    say("virtio magic "); hex(*VIRTIO(0)); say(" version "); hex(*VIRTIO(4));
    say(" device "); hex(*VIRTIO(8)); put('\n');
    say("empty slot 7 magic "); hex(*VIRTIO(0x7000)); say(" version "); hex(*VIRTIO(0x7004));
    say(" device "); hex(*VIRTIO(0x7008)); say(" vendor "); hex(*VIRTIO(0x700c)); put('\n');
    unsigned int s = 0;
    *VIRTIO(0x070) = s;
    *VIRTIO(0x070) = s |= 1;
    *VIRTIO(0x070) = s |= 2;
    unsigned int features = *VIRTIO(0x010);
    features &= ~((1u << 5) | (1u << 7) | (1u << 11) | (1u << 12) | (1u << 27) | (1u << 28)
                  | (1u << 29));
    *VIRTIO(0x020) = features;
    *VIRTIO(0x070) = s |= 8;
    say("features ok "); hex(!!(*VIRTIO(0x070) & 8)); put('\n');
    *VIRTIO(0x030) = 0;
    say("queue ready "); hex(*VIRTIO(0x044)); say(" max>=8 "); hex(*VIRTIO(0x034) >= 8); put('\n');
    *VIRTIO(0x038) = 8;
    *VIRTIO(0x080) = (unsigned long)desc; *VIRTIO(0x084) = 0;
    *VIRTIO(0x090) = (unsigned long)&avail; *VIRTIO(0x094) = 0;
    *VIRTIO(0x0a0) = (unsigned long)&used; *VIRTIO(0x0a4) = 0;
    *VIRTIO(0x044) = 1;
    *VIRTIO(0x070) = s |= 4;
    *PLIC(4 * 1) = 1;                                   /* priority of source 1 */
    *PLIC(0x2080) = 1u << 1;                            /* hart 0's S context takes it */
    *PLIC(0x201000) = 0;                                /* its threshold */
    disk_io(0, 0);
    say("sector 0: ");
    for (int i = 0; data[i] != '\n'; i++) put(data[i]);
    put('\n');
    for (int i = 0; i < 512; i++) data[i] = (unsigned char)(i * 7 + 1);
    disk_io(1, 1);
}

void smain(void) {                                      /* S-mode, every hart */
    unsigned long id = hartid();
    CSRW(stvec, (unsigned long)kernelvec);
    CSRS(sstatus, 2UL);                                 /* SIE */
    FENCE();
    arrived[id] = 1;
    if (id != 0) {
        while (ticks[id] < TICKS) __asm__ volatile("wfi");
        done[id] = 1;
        for (;;) __asm__ volatile("wfi");
    }
    for (unsigned long h = 0; h < NCPU; h++) {
        while (!arrived[h]) __asm__ volatile("wfi");
        say("hart "); hex(h); say(" a0 "); hex(boot_a0[h]); say(" a1 "); hex(boot_a1[h]);
        say(" fdt magic "); hex(*(volatile unsigned int *)boot_a1[h]); put('\n');
    }
    disk();
    while (ticks[0] < TICKS) __asm__ volatile("wfi");
    for (unsigned long h = 1; h < NCPU; h++) while (!done[h]) __asm__ volatile("wfi");
    say("every hart ticked in S-mode\n");
    poweroff(0);
}
"""

@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which(GCC) is None:
        pytest.fail(f"{GCC} is missing: apt-get install gcc-riscv64-linux-gnu (./quickstart)")
    out = tmp_path_factory.mktemp("bare") / "guest"
    return build(out, {"start.S": _START, "guest.c": _GUEST}, 0x8000_0000)


def _disk(path: Path) -> Path:
    path.write_bytes(SECTOR0 + bytes(512 * 15))
    return path


def _expected_sector1() -> bytes:
    return bytes((i * 7 + 1) & 0xFF for i in range(512))


@pytest.fixture(scope="module")
def qemu_output(guest: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """What QEMU's virt board prints for the guest, booted as xv6's Makefile boots xv6."""
    disk = _disk(tmp_path_factory.mktemp("qemu") / "disk.img")
    done = subprocess.run(
        ["qemu-system-riscv64", "-M", "virt", "-bios", "none", "-kernel", str(guest),
         "-smp", str(CPUS), "-m", f"{MEM >> 20}M", "-display", "none", "-serial", "stdio",
         "-monitor", "none", "-global", "virtio-mmio.force-legacy=false",
         "-drive", f"file={disk},if=none,format=raw,id=x0",
         "-device", "virtio-blk-device,drive=x0,bus=virtio-mmio-bus.0"],
        capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert disk.read_bytes()[512:1024] == _expected_sector1()
    return done.stdout.decode()


@pytest.mark.parametrize("tier", TIERS)
def test_xv6_boot_path_prints_what_qemu_prints(guest: Path, qemu_output: str, tier: str,
                                               tmp_path: Path) -> None:
    disk = _disk(tmp_path / "disk.img")
    config = MachineConfig(kernel=guest, bios="none", cpus=CPUS, mem=MEM, engine=tier,
                           disks=[DiskSpec(disk)])
    out = bytearray()
    machine = VirtMachine(config, out.extend)
    deadline = time.monotonic() + 60
    while machine.exit is None and time.monotonic() < deadline:
        if not machine.run_slice():
            time.sleep(min(machine.idle_seconds() or 0.001, 0.01))
    machine.close()
    assert machine.exit == ("poweroff", 0), out.decode(errors="replace")
    assert out.decode() == qemu_output
    assert "hart 0x2 a0 0x2 a1 0x87e00000 fdt magic 0xedfe0dd0" in qemu_output
    assert "sector 0: popek bare metal sector zero" in qemu_output
    assert disk.read_bytes()[512:1024] == _expected_sector1()


def _elf_at(tmp_path: Path, address: int, *flags: str) -> Path:
    """A one-instruction ELF linked at ``address``."""
    src = tmp_path / "t.S"
    src.write_text(".globl _start\n_start: j _start\n")
    elf = tmp_path / "t.elf"
    subprocess.run([GCC, "-nostdlib", "-static", "-no-pie", f"-Wl,-Ttext={address:#x}",
                    "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments", "-Wl,-N", *flags,
                    str(src), "-o", str(elf)], check=True, capture_output=True)
    return elf


@pytest.mark.parametrize(("make", "error"), [
    (lambda tmp: _disk(tmp / "raw.bin"),
     " is not an ELF file (--bios none runs an ELF from its entry)"),
    (lambda tmp: _elf_at(tmp, 0x4000_0000),
     " loads at 0x40000000, outside guest RAM (0x80000000-0x87ffffff)"),
    (lambda tmp: _elf_at(tmp, 0x8800_0000),
     " loads at 0x88000000, outside guest RAM (0x80000000-0x87ffffff)"),
    (lambda tmp: _elf_at(tmp, 0x8000_0000, "-Wl,--entry=0x80100000"),
     ": its entry 0x80100000 is not in what it loads"),
])
def test_bad_bare_metal_kernel_gets_one_line(tmp_path: Path, make, error: str) -> None:
    kernel = make(tmp_path)
    done = popek_run("--bios", "none", "--kernel", str(kernel), "--mem", "128M", timeout=60)
    assert done.returncode == 2
    assert done.stderr.decode() == f"popek run: error: kernel {kernel}{error}\n"


# Spinning harts (popek.engine.spin): three harts in M-mode take turns at one lock, as
# xv6's harts do, then hart 0 computes alone while harts 1 and 2 poll a table of
# locked slots for a job, as xv6's idle scheduler polls its process table, until hart 0
# posts one. Everything the guest prints is the same however the harts interleave.
_SPIN_START = r"""
.section .text.start
.globl _start
_start:                     # every hart, in M-mode: a0 = hartid
  la sp, stacks
  addi t0, a0, 1
  slli t0, t0, 12
  add sp, sp, t0
  call hart_main
1: j 1b

.bss
.align 12
stacks: .space 4096 * 4
"""

_SPIN_GUEST = r"""
#define NCPU 3
#define ROUNDS 100                              /* critical sections per hart */
#define SLOTS 16
#define WORK 30000                              /* hart 0's steps alone */
#define FINISHER ((volatile unsigned int *)0x100000UL)
""" + _PRINT + r"""

static unsigned long acquire(volatile unsigned int *lock) {   /* as xv6's: interrupts off */
    unsigned long saved;
    __asm__ volatile("csrrci %0, mstatus, 8" : "=r"(saved) : : "memory");
    while (__sync_lock_test_and_set(lock, 1) != 0) {}
    __sync_synchronize();
    return saved;
}

static void release(volatile unsigned int *lock, unsigned long saved) {
    __sync_synchronize();
    __sync_lock_release(lock);
    __asm__ volatile("csrs mstatus, %0" : : "r"(saved & 8) : "memory");
}

static volatile unsigned int counter_lock;
static volatile unsigned long counter, arrived, stop, stopped[NCPU];
static struct { volatile unsigned int lock; volatile unsigned long job, result; }
    slots[SLOTS] __attribute__((aligned(64)));

static unsigned long work(void) {               /* xorshift: something to compute */
    unsigned long x = 88172645463325252UL;
    for (int i = 0; i < WORK; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; }
    return x;
}

void hart_main(unsigned long id) {
    for (int round = 0; round < ROUNDS; round++) {
        unsigned long saved = acquire(&counter_lock);
        unsigned long value = counter;
        for (int i = 0; i < 50; i++) __asm__ volatile("");
        counter = value + 1;
        release(&counter_lock, saved);
    }
    __sync_fetch_and_add(&arrived, 1);
    while (arrived < NCPU) {}
    if (id != 0) {                              /* idle: poll every slot for a job */
        while (!stop) {
            for (int s = 0; s < SLOTS; s++) {
                unsigned long saved = acquire(&slots[s].lock);
                if (slots[s].job) {
                    slots[s].result = slots[s].job * 3 + 1;
                    slots[s].job = 0;
                }
                release(&slots[s].lock, saved);
            }
        }
        stopped[id] = 1;
        for (;;) __asm__ volatile("wfi");
    }
    say("counter "); hex(counter); put('\n');
    unsigned long job = work();
    unsigned long saved = acquire(&slots[5].lock);
    slots[5].job = job;
    release(&slots[5].lock, saved);
    while (!slots[5].result) {}
    say("job "); hex(job); say(" result "); hex(slots[5].result); put('\n');
    stop = 1;
    for (int h = 1; h < NCPU; h++) while (!stopped[h]) {}
    say("idle harts stopped\n");
    *FINISHER = 0x5555;
    for (;;) {}
}
"""


@pytest.fixture(scope="module")
def spin_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which(GCC) is None:
        pytest.fail(f"{GCC} is missing: apt-get install gcc-riscv64-linux-gnu (./quickstart)")
    out = tmp_path_factory.mktemp("spin") / "guest"
    return build(out, {"start.S": _SPIN_START, "guest.c": _SPIN_GUEST}, 0x8000_0000)


@pytest.fixture(scope="module")
def spin_qemu_output(spin_guest: Path) -> str:
    qemu = subprocess.run(
        ["qemu-system-riscv64", "-M", "virt", "-bios", "none", "-kernel", str(spin_guest),
         "-smp", str(CPUS), "-m", f"{MEM >> 20}M", "-display", "none", "-serial", "stdio",
         "-monitor", "none"], capture_output=True, timeout=60)
    assert qemu.returncode == 0, qemu.stderr.decode()
    return qemu.stdout.decode()


@pytest.mark.parametrize("tier", TIERS)
def test_spinning_harts_give_way_and_compute_what_qemu_computes(
        spin_guest: Path, spin_qemu_output: str, tier: str) -> None:
    config = MachineConfig(kernel=spin_guest, bios="none", cpus=CPUS, mem=MEM, engine=tier)
    out = bytearray()
    machine = VirtMachine(config, out.extend)
    deadline = time.monotonic() + 120
    while machine.exit is None and time.monotonic() < deadline:
        machine.run_slice()
    machine.close()
    assert machine.exit == ("poweroff", 0), out.decode(errors="replace")
    assert out.decode() == spin_qemu_output
    assert "counter 0x12c\n" in out.decode()
    # Harts 1 and 2 polled for as long as hart 0 computed: without giving way they
    # retire about as many instructions as it does (each gets the same slices).
    retired = [hart.ctl[CTL_INSTRET] for hart in machine.harts]
    assert machine.spin_yields > 0 and machine.spin_rests > 0
    assert max(retired[1:]) < retired[0] // 4, retired
