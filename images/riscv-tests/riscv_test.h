/* popek's own "p" environment for the official RISC-V ISA tests
 * (github.com/riscv-software-src/riscv-tests), for QEMU's virt board with -bios none
 * (popek run --bios none) instead of spike's HTIF: a test ends by writing the virt
 * board's test finisher at 0x100000, 0x5555 when it passed, (TESTNUM << 16) | 0x3333
 * when it failed. Everything else behaves as the tests expect of their "p" environment:
 * physical addresses, one hart (the others park), the test body in U-, S- or M-mode as
 * its RVTEST_RV64* line asks, and a test's own mtvec_handler/stvec_handler called for
 * the traps it provokes. The constants come from the suite's env/encoding.h. */
#ifndef POPEK_RISCV_TEST_H
#define POPEK_RISCV_TEST_H

#include "encoding.h"

#define FINISHER_ADDR 0x100000
#define FINISHER_PASS 0x5555
#define FINISHER_FAIL 0x3333

#define TESTNUM gp

/* What the test body needs once the machine is set up; run in M-mode before the mret
 * that enters the body (whose mode is mstatus.MPP, U unless set here). */
#define RVTEST_RV64U .macro init; .endm
#define RVTEST_RV32U RVTEST_RV64U
#define RVTEST_RV64UF .macro init; popek_fp_on; .endm
#define RVTEST_RV32UF RVTEST_RV64UF
#define RVTEST_RV64S .macro init; popek_body_in_s; .endm
#define RVTEST_RV32S RVTEST_RV64S
#define RVTEST_RV64M .macro init; popek_body_in_m; .endm
#define RVTEST_RV32M RVTEST_RV64M

#define RVTEST_CODE_BEGIN \
        .macro popek_fp_on; \
          li a0, MSTATUS_FS & (MSTATUS_FS >> 1); csrs mstatus, a0; csrwi fcsr, 0; \
        .endm; \
        .macro popek_body_in_s; \
          li a0, MSTATUS_MPP & (MSTATUS_MPP >> 1); csrs mstatus, a0; \
          li a0, SIP_SSIP | SIP_STIP; csrs mideleg, a0; \
        .endm; \
        .macro popek_body_in_m; \
          li a0, MSTATUS_MPP; csrs mstatus, a0; \
        .endm; \
        .section .text.init; \
        .align 6; \
        .weak mtvec_handler; \
        .weak stvec_handler; \
        .globl _start; \
_start: \
        j popek_reset; \
        .align 2; \
popek_trap: \
        /* An ecall from any mode is RVTEST_PASS or RVTEST_FAIL: TESTNUM says which. */ \
        csrr t5, mcause; \
        li t6, CAUSE_USER_ECALL; beq t5, t6, popek_finish; \
        li t6, CAUSE_SUPERVISOR_ECALL; beq t5, t6, popek_finish; \
        li t6, CAUSE_MACHINE_ECALL; beq t5, t6, popek_finish; \
        la t5, mtvec_handler; \
        beqz t5, popek_unexpected; \
        jr t5; \
popek_unexpected: \
        /* A trap the test did not ask for (an interrupt or an exception): it fails. */ \
        ori TESTNUM, TESTNUM, 1337; \
popek_finish: \
        li t5, FINISHER_ADDR; \
        li t6, 1; \
        bne TESTNUM, t6, 1f; \
        li t6, FINISHER_PASS; \
        j 2f; \
1:      slli t6, TESTNUM, 16; \
        li t4, FINISHER_FAIL; \
        or t6, t6, t4; \
2:      sw t6, 0(t5); \
3:      j 3b; \
popek_reset: \
        .irp reg, 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31; \
          li x\reg, 0; \
        .endr; \
        /* One hart runs the test; any other waits forever. */ \
        csrr a0, mhartid; \
        beqz a0, 4f; \
        wfi; \
        j popek_reset; \
4:      /* CSRs a hart may lack trap to the next label and are skipped. */ \
        la t0, 5f; csrw mtvec, t0; \
        csrwi satp, 0; \
        .align 2; \
5:      la t0, 6f; csrw mtvec, t0; \
        li t0, -1; srli t0, t0, 10; csrw pmpaddr0, t0; \
        li t0, PMP_NAPOT | PMP_R | PMP_W | PMP_X; csrw pmpcfg0, t0; \
        .align 2; \
6:      csrwi mie, 0; \
        csrwi medeleg, 0; \
        csrwi mideleg, 0; \
        li TESTNUM, 0; \
        la t0, popek_trap; csrw mtvec, t0; \
        /* A test with an stvec_handler takes these traps in S-mode. */ \
        la t0, stvec_handler; \
        beqz t0, 7f; \
        csrw stvec, t0; \
        li t0, (1 << CAUSE_LOAD_PAGE_FAULT) | (1 << CAUSE_STORE_PAGE_FAULT) | \
               (1 << CAUSE_FETCH_PAGE_FAULT) | (1 << CAUSE_MISALIGNED_FETCH) | \
               (1 << CAUSE_USER_ECALL) | (1 << CAUSE_BREAKPOINT); \
        csrw medeleg, t0; \
7:      csrwi mstatus, 0; \
        init; \
        la t0, 8f; csrw mepc, t0; \
        csrr a0, mhartid; \
        mret; \
8:

#define RVTEST_CODE_END unimp

#define RVTEST_PASS \
        fence; \
        li TESTNUM, 1; \
        li a7, 93; \
        li a0, 0; \
        ecall

#define RVTEST_FAIL \
        fence; \
9:      beqz TESTNUM, 9b; \
        sll TESTNUM, TESTNUM, 1; \
        or TESTNUM, TESTNUM, 1; \
        li a7, 93; \
        addi a0, TESTNUM, 0; \
        ecall

#define EXTRA_DATA
#define RVTEST_DATA_BEGIN EXTRA_DATA .align 4; .global begin_signature; begin_signature:
#define RVTEST_DATA_END .align 4; .global end_signature; end_signature:

#endif
