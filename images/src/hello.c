/* popek guest test program: the smallest useful C program.
 * Built twice by recipes/hello.sh: statically (hello-static) and dynamically
 * against Debian's riscv64 glibc (hello-dynamic, interpreter
 * /lib/ld-linux-riscv64-lp64d.so.1), so the user-mode emulator can be tested on
 * both the plain ELF path and the PT_INTERP / shared-library path. */
#include <stdio.h>

int main(int argc, char **argv)
{
    printf("Hello from riscv64, argc=%d argv[0]=%s\n", argc, argc > 0 ? argv[0] : "");
    return 0;
}
