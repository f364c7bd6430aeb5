"""Tiny bare-metal guests for the VMM and machine tests, compiled at test time.

Each is a few lines of C entered in S-mode at 0x8020_0000 by popek's SBI (as a kernel
would be, and as QEMU's OpenSBI enters it too): it writes the 16550 UART at 0x1000_0000
and powers off through the test finisher at 0x10_0000. They boot in milliseconds, where
Linux takes tens of seconds. The two-hart ones start hart 1 with SBI HSM, as Linux does.
"""

from __future__ import annotations

import functools
import subprocess
import tempfile
from pathlib import Path

GCC = "riscv64-linux-gnu-gcc"

_START = """
.section .text.start
.globl _start
_start:
  la sp, stack_top
  call main
1: j 1b
.bss
.align 12
.space 16384
stack_top:
"""

_LINK = """
ENTRY(_start)
SECTIONS {{
  . = {base:#x};
  .text : {{ *(.text.start) *(.text*) }}
  .rodata : {{ *(.rodata*) *(.srodata*) }}
  .data : {{ *(.data*) *(.sdata*) }}
  .bss : {{ *(.bss*) *(.sbss*) }}
}}
"""

_COMMON = r"""
#define UART ((volatile unsigned char *)0x10000000UL)
#define FINISHER ((volatile unsigned int *)0x100000UL)
static void put(char c) { UART[0] = c; }
static void say(const char *s) { while (*s) put(*s++); }
static void num(unsigned long n) {
    char b[24]; int i = 0;
    do { b[i++] = '0' + n % 10; n /= 10; } while (n);
    while (i) put(b[--i]);
}
static void delay(int n) { for (volatile int d = 0; d < n; d++) {} }
static void poweroff(unsigned code) {
    *FINISHER = code ? (code << 16) | 0x3333 : 0x5555;
    for (;;) {}
}
static unsigned long now(void) {  /* guest time, 10 MHz */
    unsigned long t;
    __asm__ volatile("rdtime %0" : "=r"(t));
    return t;
}
/* Sleep in WFI until guest time ``when`` (an SBI timer), as an idle kernel does: an idle
   guest's time follows the host's clock. */
static void sleep_until(unsigned long when) {
    __asm__ volatile("csrs sie, %0" : : "r"(1UL << 5));  /* STIE; SIE stays off */
    register unsigned long a0 __asm__("a0") = when;
    register unsigned long a6 __asm__("a6") = 0, a7 __asm__("a7") = 0x54494D45;
    __asm__ volatile("ecall" : "+r"(a0) : "r"(a6), "r"(a7) : "a1", "memory");
    unsigned long sip;
    do { __asm__ volatile("wfi\n csrr %0, sip" : "=r"(sip)); } while (!(sip & (1UL << 5)));
}
"""

# Hart 1 enters at second_start (SBI hart_start) with a stack of its own and runs second().
_SMP = r"""
unsigned long second_stack[2048];
void second(void);
__asm__(".text\n.globl second_start\nsecond_start:\n"
        "  la sp, second_stack + 16384\n  call second\n1: j 1b\n");
extern char second_start[];
static long start_hart1(void) {
    register long a0 __asm__("a0") = 1;
    register unsigned long a1 __asm__("a1") = (unsigned long)second_start;
    register unsigned long a2 __asm__("a2") = 0, a6 __asm__("a6") = 0;
    register unsigned long a7 __asm__("a7") = 0x48534D;  /* HSM hart_start */
    __asm__ volatile("ecall" : "+r"(a0), "+r"(a1) : "r"(a2), "r"(a6), "r"(a7) : "memory");
    return a0;
}
/* Flags that the harts pass each other, each in a 64-byte line of its own. */
#define FLAG(name) static volatile unsigned long name __attribute__((aligned(64)))
"""

PROGRAMS = {
    # Prints "tick N" lines forever; fills 1 MiB of RAM first, so snapshots hold data.
    "counter": r"""
static volatile unsigned long table[131072];
void main(void) {
    for (unsigned long i = 0; i < 131072; i++) table[i] = i * 2654435761UL + 1;
    say("counter ready\n");
    for (unsigned long n = 0;; n++) { say("tick "); num(n); put('\n'); delay(3000); }
}""",
    "hello": r"""
void main(void) { say("hello from the guest\n"); poweroff(0); }""",
    "exit7": r"""
void main(void) { say("exiting with 7\n"); poweroff(7); }""",
    # Powers off with status 5 once 3 s of guest time have passed.
    "exit5-later": r"""
void main(void) {
    say("waiting\n");
    sleep_until(now() + 30000000UL);
    say("bye\n");
    poweroff(5);
}""",
    # Computes primes, prints each 500th, forever: a different workload from the counter.
    "primes": r"""
void main(void) {
    unsigned long found = 0;
    for (unsigned long n = 3;; n += 2) {
        int prime = 1;
        for (unsigned long d = 3; d * d <= n; d += 2) if (n % d == 0) { prime = 0; break; }
        if (prime && ++found % 500 == 0) { say("prime "); num(n); put('\n'); }
    }
}""",
    # Says it is ready, then waits for interrupts that never come: an idle guest.
    "idle": r"""
void main(void) { say("idle ready\n"); for (;;) __asm__ volatile("wfi"); }""",
    "spin": r"""
void main(void) { say("spinning\n"); for (;;) {} }""",
    "flood": r"""
void main(void) { for (;;) say("flood flood flood flood flood flood flood flood\n"); }""",
    # Echoes its console; the line "poweroff" makes it say goodbye and power off.
    "echo": r"""
void main(void) {
    char line[64]; int n = 0;
    UART[1] = 1;  /* receive interrupt on: the sign popek waits for before it types */
    say("echo ready\n");
    for (;;) {
        if (!(UART[5] & 1)) continue;
        char c = UART[0];
        put(c);
        if (c == '\r' || c == '\n') {
            line[n] = 0;
            if (n == 8 && line[0] == 'p' && line[5] == 'o' && line[7] == 'f') {
                say("goodbye\n");
                poweroff(0);
            }
            n = 0;
        } else if (n < 63) {
            line[n++] = c;
        }
    }
}""",
    # Feeds every device but the finisher pseudo-random reads and writes, then says so.
    "garbage": r"""
static const unsigned long dev[][2] = {
    {0x101000, 0x1000}, {0x2000000, 0x10000}, {0xc000000, 0x600000},
    {0x10000000, 0x100}, {0x10001000, 0x1000}};  /* virtio slot 0: the rng */
void main(void) {
    unsigned long x = 88172645463325252UL;
    for (int i = 0; i < 200000; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        const unsigned long *d = dev[x % 5];
        volatile unsigned int *r = (volatile unsigned int *)(d[0] + ((x >> 8) % d[1] & ~3UL));
        if (x & 0x100000) *r = (unsigned int)(x >> 32); else (void)*r;
    }
    UART[3] = 3; UART[4] = 0; UART[1] = 0;  /* 8N1, no loopback, no interrupts */
    say("\nsurvived\n");
    for (;;) {}
}""",
    # Writes 16 MiB of straight-line code (4 Mi distinct lui instructions, then ret) and
    # runs it, over and over: every instruction is new to the emulator, which must decode
    # and keep it (its patched code alone is bounded by the code area's 64 MiB).
    "codebomb": r"""
void main(void) {
    volatile unsigned int *code = (volatile unsigned int *)0x80400000UL;
    unsigned long n = 4UL << 20;
    for (unsigned long i = 0; i < n; i++) code[i] = 0x37 | (i % 31 + 1) << 7 | i << 12;
    code[n] = 0x00008067;
    __asm__ volatile("fence.i");
    say("running the code\n");
    for (;;) ((void (*)(void))code)();
}""",
    # Write a status that only a test build's finisher knows (tests/vmm_test_build.py):
    # the worker then makes a system call its seccomp filter forbids, tries to open a
    # root-only file and powers off with the errno (0: it could), stops throttling
    # itself to its CPU cap (and the guest spins), or sends its VMM malformed statistics.
    "forbidden": r"""
void main(void) { say("about to misbehave\n"); delay(100000); *FINISHER = 0xbad0; for (;;) {} }""",
    "peek": r"""
void main(void) { say("peeking\n"); *FINISHER = 0xbad1; for (;;) {} }""",
    "greedy": r"""
void main(void) { *FINISHER = 0xbad2; say("spinning\n"); for (;;) {} }""",
    "liar": r"""
void main(void) { say("lying\n"); *FINISHER = 0xbad3; for (;;) {} }""",
    # Panics: jumps to address 0, where nothing answers, with no trap handler set up.
    "crash": r"""
void main(void) { say("crashing\n"); ((void (*)(void))0)(); }""",
    # Each hart (one, or two if hart 1 starts) busy-loops; prints the guest time and its
    # own instructions that the loop took, as "hart H time T instret I".
    "timeshare": _SMP + r"""
FLAG(started); FLAG(done);
static unsigned long took[2][2];
static void measure(int h) {
    unsigned long t0, i0, t1, i1;
    __asm__ volatile("rdtime %0\n rdinstret %1" : "=r"(t0), "=r"(i0));
    delay(50000);
    __asm__ volatile("rdtime %0\n rdinstret %1" : "=r"(t1), "=r"(i1));
    took[h][0] = t1 - t0;
    took[h][1] = i1 - i0;
}
void second(void) { started = 1; measure(1); done = 1; for (;;) __asm__ volatile("wfi"); }
void main(void) {
    int harts = start_hart1() == 0 ? 2 : 1;
    while (harts == 2 && !started) {}
    measure(0);
    while (harts == 2 && !done) {}
    for (int h = 0; h < harts; h++) {
        say("hart "); num(h); say(" time "); num(took[h][0]); say(" instret "); num(took[h][1]);
        put('\n');
    }
    poweroff(0);
}""",
    # Sleeps in WFI on an SBI timer a millisecond away, twenty times over, then powers off:
    # every wake-up is the guest's timer ending an idle host's wait.
    "timer": r"""
void main(void) {
    for (int i = 0; i < 20; i++) sleep_until(now() + 10000);
    say("woke 20 times\n");
    poweroff(0);
}""",
    # Each hart keeps incrementing bytes in its own half of 256 pages, a subset of the
    # pages that changes every 64 passes (QEMU's migration test idea): every store changes
    # a page, so the pages that changed are exactly the pages written.
    "dirtier": _SMP + r"""
#define PAGES 256
volatile unsigned char area[PAGES][4096] __attribute__((aligned(4096)));
static void dirty(unsigned long h) {
    for (unsigned long n = 0;; n++)
        for (unsigned long p = h; p < PAGES; p += 2)
            if ((p + n / 64) % 5 == 0) area[p][n % 4096]++;
}
void second(void) { dirty(1); }
void main(void) {
    start_hart1();
    say("dirtier ready\n");
    dirty(0);
}""",
    # Fills 2 MiB with the same non-zero pattern as every other copy of it, then checks
    # its console ten times a second from WFI: "w" changes one word of the first page,
    # "s" prints the pattern's checksum, so guests that share pages can prove they do
    # not see each other's writes.
    "sharer": r"""
#define WORDS (2UL << 20) / 8
static volatile unsigned long area[WORDS] __attribute__((aligned(4096)));
void main(void) {
    for (unsigned long i = 0; i < WORDS; i++) area[i] = i * 0x9E3779B97F4A7C15UL | 1;
    UART[1] = 1;  /* receive interrupt on: popek's console types once it is */
    say("sharer ready\n");
    for (;;) {
        sleep_until(now() + 1000000UL);
        while (UART[5] & 1) {
            char c = UART[0];
            if (c == 'w') { area[3] += 1; say("wrote\n"); }
            if (c == 's') {
                unsigned long sum = 0;
                for (unsigned long i = 0; i < WORDS; i++) sum = sum * 31 + area[i];
                say("sum "); num(sum); put('\n');
            }
        }
    }
}""",
    # QEMU's migration test idea: each hart (one, or two if hart 1 starts) increments the
    # first byte of every page of its share of 8 MiB at 0x8040_0000, pass after pass, and
    # checks each byte holds the pass it expects: a lost or repeated increment (a page
    # copied stale) stops it with MISMATCH. Hart 0 prints "pass N" every 16 passes.
    "migrant": _SMP + r"""
#define AREA ((volatile unsigned char *)0x80400000UL)
#define PAGES 2048
static int harts = 1;
static void increment(unsigned long h) {
    for (unsigned long pass = 0;; pass++) {
        for (unsigned long p = h; p < PAGES; p += harts) {
            if (AREA[p * 4096] != (unsigned char)pass) {
                say("MISMATCH page "); num(p); say(" pass "); num(pass); put('\n');
                poweroff(1);
            }
            AREA[p * 4096] = (unsigned char)(pass + 1);
        }
        if (h == 0 && pass % 16 == 0) { say("pass "); num(pass); put('\n'); }
    }
}
void second(void) { increment(1); }
void main(void) {
    harts = 2;
    if (start_hart1() != 0) harts = 1;
    say("migrant ready\n");
    increment(0);
}""",
    # The migrant's idea for a disk (virtio-blk in slot 0, polled): every pass reads each
    # 4 KiB block of the first 1 MiB, checks each of its sectors holds (pass, block) in
    # its first two bytes, and writes (pass + 1, block) back.
    "scribe": r"""
#define MMIO(off) (*(volatile unsigned int *)(0x10001000UL + (off)))
#define BLOCKS 256
struct desc { unsigned long addr; unsigned int len; unsigned short flags, next; };
static struct desc desc[4] __attribute__((aligned(16)));
static volatile struct { unsigned short flags, idx, ring[4], event; } avail
    __attribute__((aligned(2)));
static volatile struct { unsigned short flags, idx; struct { unsigned int id, len; } ring[4];
                         unsigned short event; } used __attribute__((aligned(4)));
static struct { unsigned int type, reserved; unsigned long sector; } req;
static unsigned char buf[4096] __attribute__((aligned(4096)));
static volatile unsigned char status;
static void request(unsigned int type, unsigned long sector) {
    unsigned short seen = used.idx;
    req.type = type; req.reserved = 0; req.sector = sector;
    desc[0] = (struct desc){(unsigned long)&req, 16, 1, 1};
    desc[1] = (struct desc){(unsigned long)buf, 4096, type == 0 ? 3 : 1, 2};
    desc[2] = (struct desc){(unsigned long)&status, 1, 2, 0};
    status = 0xff;
    avail.ring[avail.idx % 4] = 0;
    __asm__ volatile("fence" ::: "memory");
    avail.idx++;
    __asm__ volatile("fence" ::: "memory");
    MMIO(0x50) = 0;
    while (used.idx == seen) {}
    __asm__ volatile("fence" ::: "memory");
    if (status != 0) { say("IOERR\n"); poweroff(1); }
}
void main(void) {
    if (MMIO(0) != 0x74726976 || MMIO(8) != 2) { say("no disk\n"); poweroff(1); }
    MMIO(0x70) = 0; MMIO(0x70) = 1; MMIO(0x70) = 3;
    MMIO(0x24) = 1; MMIO(0x20) = 1;  /* VIRTIO_F_VERSION_1, nothing else */
    MMIO(0x24) = 0; MMIO(0x20) = 0;
    MMIO(0x70) = 11;
    MMIO(0x30) = 0; MMIO(0x38) = 4;
    MMIO(0x80) = (unsigned long)desc; MMIO(0x84) = 0;
    MMIO(0x90) = (unsigned long)&avail; MMIO(0x94) = 0;
    MMIO(0xa0) = (unsigned long)&used; MMIO(0xa4) = 0;
    MMIO(0x44) = 1;
    MMIO(0x70) = 15;
    say("scribe ready\n");
    for (unsigned long pass = 0;; pass++) {
        for (unsigned long b = 0; b < BLOCKS; b++) {
            request(0, b * 8);
            for (int i = 0; i < 4096; i += 512) {
                if (buf[i] != (unsigned char)pass || buf[i + 1] != (unsigned char)b) {
                    say("MISMATCH block "); num(b); say(" pass "); num(pass); put('\n');
                    poweroff(1);
                }
                buf[i] = (unsigned char)(pass + 1);
            }
            request(1, b * 8);
        }
        if (pass % 4 == 0) { say("disk pass "); num(pass); put('\n'); }
    }
}""",
    # Programs its timer through Sstc's stimecmp (as Linux does when the ISA has sstc): STIP
    # pends at the deadline and not before, a write clears it, the interrupt is taken, and
    # an SBI set_timer (which popek's SBI now forwards to stimecmp) still wakes it.
    "sstc": r"""
static unsigned long sip(void) {
    unsigned long v; __asm__ volatile("csrr %0, sip" : "=r"(v)); return v; }
static unsigned long stimecmp(void) {
    unsigned long v; __asm__ volatile("csrr %0, 0x14d" : "=r"(v)); return v; }
static void set_stimecmp(unsigned long v) { __asm__ volatile("csrw 0x14d, %0" : : "r"(v)); }
static void fail(int n) { say("FAIL "); num(n); put('\n'); poweroff(1); }
static volatile unsigned long fired, fired_at;
void on_timer(void) __attribute__((interrupt("supervisor"), aligned(4)));
void on_timer(void) { fired_at = now(); fired++; set_stimecmp(-1UL); }
void main(void) {
    set_stimecmp(-1UL);
    if (sip() & 32) fail(1);
    unsigned long deadline = now() + 20000;  /* 2 ms */
    set_stimecmp(deadline);
    if (stimecmp() != deadline) fail(2);
    __asm__ volatile("csrs sie, %0" : : "r"(32UL));  /* STIE; SIE stays off */
    while (!(sip() & 32)) __asm__ volatile("wfi");
    if (now() < deadline) fail(3);
    say("pending at the deadline\n");
    set_stimecmp(-1UL);
    if (sip() & 32) fail(4);
    say("cleared by a write\n");
    __asm__ volatile("csrw stvec, %0\n csrs sstatus, 2" : : "r"(on_timer));
    deadline = now() + 10000;
    set_stimecmp(deadline);
    while (!fired) __asm__ volatile("wfi");
    if (fired != 1 || fired_at < deadline) fail(5);
    say("interrupt taken\n");
    __asm__ volatile("csrc sstatus, 2");
    sleep_until(now() + 10000);
    say("sbi timer\n");
    poweroff(0);
}""",
    # Hart 0 reserves a word with lr.w, hart 1 stores to it, then hart 0's sc.w must fail.
    "lrsc": _SMP + r"""
FLAG(word); FLAG(reserved); FLAG(stored);
void second(void) {
    while (!reserved) {}
    word = 1;
    stored = 1;
    for (;;) __asm__ volatile("wfi");
}
void main(void) {
    unsigned long old, failed;
    start_hart1();
    __asm__ volatile("lr.d %0, (%1)" : "=r"(old) : "r"(&word) : "memory");
    reserved = 1;
    while (!stored) {}
    __asm__ volatile("sc.d %0, %2, (%1)" : "=r"(failed) : "r"(&word), "r"(old + 2) : "memory");
    say(failed ? "sc failed\n" : "sc succeeded\n");
    poweroff(0);
}""",
}


@functools.cache
def _build_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="popek-guests-"))


@functools.cache
def guest(name: str) -> Path:
    """The ELF of guest program ``name`` (built once per test process)."""
    out = _build_dir() / name
    return build(out, {"start.S": _START, f"{name}.c": _COMMON + PROGRAMS[name]}, 0x8020_0000)


def build(out: Path, sources: dict[str, str], base: int) -> Path:
    """Compile ``sources`` (file name: text) into the freestanding ELF ``out``, linked at
    ``base`` with ``.text.start`` first."""
    for file, text in sources.items():
        (out.parent / file).write_text(text)
    link = out.parent / f"{out.name}.ld"
    link.write_text(_LINK.format(base=base))
    subprocess.run([GCC, "-O2", "-march=rv64gc", "-mabi=lp64d", "-mcmodel=medany",
                    "-ffreestanding", "-nostdlib", "-static", "-fno-pie", "-no-pie",
                    "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments", "-T", str(link),
                    *(str(out.parent / file) for file in sources), "-o", str(out)],
                   check=True, capture_output=True)
    return out
