/* FP arithmetic as a compiler emits it, in every rounding mode: every result's bits and
 * the exception flags each operation raised, for comparison with qemu-riscv64.
 * Operands go through volatile so nothing is folded at compile time; each pass runs the
 * same code again, so that the emulator's faster tiers take over. */
#include <fenv.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static volatile double dv[] = {0.0, -0.0, 1.0, -1.5, 2.5, 3.0, 1.0 / 3.0, 0x1p-1074,
                               0x1p-1022, 0x1.fffffffffffffp-1023, 0x1.fffffffffffffp1023,
                               -0x1p63, 0x1p64, 4294967295.5, 1e300, 1e-300, INFINITY,
                               -INFINITY, NAN, 0x1.0000000000001p0, 0x1p-53};
static volatile float fv[] = {0.0f, -0.0f, 1.0f, -1.5f, 2.5f, 3.0f, 1.0f / 3.0f, 0x1p-149f,
                              0x1p-126f, 0x1.fffffep127f, -0x1p31f, 0x1p32f, INFINITY, NAN,
                              0x1.000002p0f, 0x1p-24f};
static volatile int64_t iv[] = {0, 1, -1, 9007199254740993LL, INT64_MAX, INT64_MIN,
                                16777217, -16777217, 4294967295LL};

#define ND (sizeof dv / sizeof dv[0])
#define NF (sizeof fv / sizeof fv[0])
#define NI (sizeof iv / sizeof iv[0])

static uint64_t hash = 1469598103934665603ULL;

static void mix(uint64_t v) {
    for (int i = 0; i < 8; i++) {
        hash ^= (v >> (8 * i)) & 0xff;
        hash *= 1099511628211ULL;
    }
}

static uint64_t bits(double d) {
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u;
}

static uint64_t fbits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* The flags an operation raised, mixed in after its result. */
static void flags(void) {
    mix((uint64_t)fetestexcept(FE_ALL_EXCEPT));
    feclearexcept(FE_ALL_EXCEPT);
}

static void doubles(void) {
    for (unsigned i = 0; i < ND; i++) {
        double a = dv[i];
        mix(bits(sqrt(a))), flags();
        mix((uint64_t)(int64_t)a), flags();  /* rtz, static */
        mix((uint64_t)llrint(a)), flags();   /* the dynamic mode */
        mix((uint64_t)(uint32_t)a), flags();
        mix(fbits((float)a)), flags();
        mix((uint64_t)(unsigned long)a), flags();
        for (unsigned j = 0; j < ND; j++) {
            double b = dv[j];
            mix(bits(a + b)), flags();
            mix(bits(a - b)), flags();
            mix(bits(a * b)), flags();
            mix(bits(a / b)), flags();
            mix(bits(fmin(a, b))), flags();
            mix(bits(fmax(a, b))), flags();
            mix((uint64_t)(a < b) << 2 | (uint64_t)(a <= b) << 1 | (a == b)), flags();
            mix(bits(fma(a, b, dv[(i + j) % ND]))), flags();
            mix(bits(-fma(a, b, -dv[(i * j) % ND]))), flags();
        }
    }
}

static void floats(void) {
    for (unsigned i = 0; i < NF; i++) {
        float a = fv[i];
        mix(fbits(sqrtf(a))), flags();
        mix((uint64_t)(int32_t)a), flags();
        mix((uint64_t)lrintf(a)), flags();
        mix(bits((double)a)), flags();
        for (unsigned j = 0; j < NF; j++) {
            float b = fv[j];
            mix(fbits(a + b)), flags();
            mix(fbits(a * b)), flags();
            mix(fbits(a / b)), flags();
            mix(fbits(fminf(a, b))), flags();
            mix((uint64_t)(a < b) << 1 | (a == b)), flags();
            mix(fbits(fmaf(a, b, fv[(i + j) % NF]))), flags();
        }
    }
}

static void integers(void) {
    for (unsigned i = 0; i < NI; i++) {
        mix(bits((double)iv[i])), flags();
        mix(bits((double)(uint64_t)iv[i])), flags();
        mix(fbits((float)iv[i])), flags();
        mix(fbits((float)(uint32_t)iv[i])), flags();
    }
}

int main(void) {
    static const int modes[] = {FE_TONEAREST, FE_TOWARDZERO, FE_DOWNWARD, FE_UPWARD};
    static const char *names[] = {"nearest", "toward zero", "downward", "upward",
                                  "nearest, ties away"};
    for (int pass = 0; pass < 3; pass++) {
        for (int m = 0; m < 5; m++) {
            if (m < 4)
                fesetround(modes[m]);
            else
                __asm__ volatile("fsrmi 4");  /* RMM: no fenv.h name */
            feclearexcept(FE_ALL_EXCEPT);
            hash = 1469598103934665603ULL;
            doubles();
            floats();
            integers();
            if (pass == 2)
                printf("%-20s %016llx\n", names[m], (unsigned long long)hash);
        }
    }
    return 0;
}
