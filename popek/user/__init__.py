"""The process VM: run one riscv64 Linux program as an ordinary host application.

The hart and every execution tier are the system emulator's; only address
translation (the process's own mappings instead of page tables) and trap handling
(system calls and signals instead of a trap vector) are specific to user mode.
"""
