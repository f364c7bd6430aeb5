/* The program gdb sessions debug, built twice: as a static riscv64 Linux program
 * (popek exec / qemu-riscv64 -g) and, with -DBARE_METAL, as a bare-metal ELF at the virt
 * board's RAM base (popek run / qemu-system-riscv64 -bios none -kernel). It sets up its
 * own stack and clears every register first, so the same code sees the same registers
 * under both emulators whatever their loaders or firmware left behind. A warm-up runs
 * mix() hot enough that every tier has translated (or compiled) it before the session
 * puts breakpoints inside it. */
unsigned long stack[2048] __attribute__((aligned(16)));
volatile unsigned long counter;
volatile unsigned long watched;

__attribute__((noinline)) unsigned long mix(unsigned long a, unsigned long b) {
    return (a * 31 + b) ^ (a >> 3);
}

__attribute__((noinline)) unsigned long warm(unsigned long n) {
    unsigned long acc = 1;
    for (unsigned long i = 0; i < n; i++)
        acc = mix(acc, i);
    return acc;
}

__attribute__((noinline)) unsigned long work(unsigned long n) {
    unsigned long acc = 7;
    for (unsigned long i = 0; i < n; i++) {
        acc = mix(acc, i);
        counter = counter + 1;
    }
    watched = acc;
    return acc;
}

__attribute__((noinline)) void finish(unsigned long code) {
#ifdef BARE_METAL
    /* The virt board's test finisher: 0x5555 powers off, (code << 16) | 0x3333 fails. */
    *(volatile unsigned int *)0x100000 = code ? (unsigned int)(code << 16) | 0x3333 : 0x5555;
#else
    register long a0 asm("a0") = (long)code;
    register long a7 asm("a7") = 93; /* exit */
    asm volatile("ecall" : : "r"(a0), "r"(a7));
#endif
    for (;;) {}
}

#ifndef SPIN
#define SPIN "0"
#endif

void start_c(unsigned long spin) {
    unsigned long r = warm(20000);
    r ^= work(20);
    while (spin)  /* until a debugger changes its mind (or interrupts it) */
        counter = counter + 1;
    finish(r & 0x3f);
}

asm(".section .text.start\n.globl _start\n_start:\n"
#ifdef BARE_METAL
    "  li a0, " SPIN "\n"  /* -DSPIN="1": the VMM's guest waits for its debugger */
#else
    "  ld a0, 0(sp)\n"
    "  addi a0, a0, -1\n"  /* spin if given an argument */
#endif
    "  li ra, 0\n  li sp, 0\n  li gp, 0\n  li tp, 0\n  li t0, 0\n  li t1, 0\n  li t2, 0\n"
    "  li s0, 0\n  li s1, 0\n  li a1, 0\n  li a2, 0\n  li a3, 0\n  li a4, 0\n  li a5, 0\n"
    "  li a6, 0\n  li a7, 0\n  li s2, 0\n  li s3, 0\n  li s4, 0\n  li s5, 0\n  li s6, 0\n"
    "  li s7, 0\n  li s8, 0\n  li s9, 0\n  li s10, 0\n  li s11, 0\n  li t3, 0\n  li t4, 0\n"
    "  li t5, 0\n  li t6, 0\n"
    "  la sp, stack + 16384\n"
    "  call start_c\n"
    ".text\n");
