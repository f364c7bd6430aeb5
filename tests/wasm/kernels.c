/* Freestanding C kernels (no libc) compiled to WebAssembly by clang in the tests: each
 * exported function takes no arguments, so wabt's wasm-interp can run it as the oracle.
 * bench/wasm_kernels.py compiles them with -DSCALE=N to make them N times longer. */

#ifndef SCALE
#define SCALE 1
#endif

typedef unsigned int u32;
typedef unsigned long long u64;

static u32 seed = 12345;

static u32 next_random(void) {
    seed = seed * 1103515245u + 12345u;
    return seed >> 8;
}

static int data[256];

int sort_checksum(void) {
    int sum = 0;
    for (int round = 0; round < SCALE; round++) {
    for (int i = 0; i < 256; i++) data[i] = (int)(next_random() % 2001) - 1000;
    for (int i = 1; i < 256; i++) {  /* insertion sort */
        int v = data[i], j = i - 1;
        while (j >= 0 && data[j] > v) { data[j + 1] = data[j]; j--; }
        data[j + 1] = v;
    }
    for (int i = 0; i < 256; i++) sum = sum * 31 + data[i];
    }
    return sum;
}

u32 crc32_of_data(void) {
    const unsigned char *p = (const unsigned char *)data;
    u32 crc = 0xFFFFFFFFu;
    for (unsigned i = 0; i < sizeof data * SCALE; i++) {
        crc ^= p[i % sizeof data];
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & -(crc & 1));
    }
    return ~crc;
}

u64 mix64(void) {
    u64 x = 0x9E3779B97F4A7C15ull, acc = 0;
    for (int i = 0; i < 100 * SCALE; i++) {
        x ^= x >> 30; x *= 0xBF58476D1CE4E5B9ull;
        x ^= x >> 27; x *= 0x94D049BB133111EBull;
        x ^= x >> 31;
        acc += x / (u64)(i + 3) + (x % 1000003u) + (u64)((long long)x >> 7);
    }
    return acc;
}

double series(void) {
    double acc = 0;
    for (int i = 1; i <= 500 * SCALE; i++) acc += (i & 1 ? 1.0 : -1.0) / (2.0 * i - 1.0);
    return acc * 4.0;
}

float float_mix(void) {
    float f = 1.0f;
    for (int i = 0; i < 50 * SCALE; i++) f = f * 1.1f - (float)i / 7.0f + (float)(int)(f / 3.0f);
    return f;
}

static int apply(int (*fn)(int), int x) { return fn(x); }
static int twice(int x) { return 2 * x; }
static int square(int x) { return x * x; }
static int negate(int x) { return -x; }

int dispatch(void) {
    int (*table[3])(int) = {twice, square, negate};
    int acc = 0;
    for (int i = 0; i < 30 * SCALE; i++) acc += apply(table[i % 3], i);
    return acc;
}

static int collatz(long long n) {
    int steps = 0;
    while (n != 1) { n = n & 1 ? 3 * n + 1 : n / 2; steps++; }
    return steps;
}

int switchy(void) {
    int acc = 0;
    for (int i = 0; i < 40 * SCALE; i++) {
        switch (i % 7) {
        case 0: acc += collatz(i + 1); break;
        case 1: acc ^= i << 3; break;
        case 2: acc -= i / 3; break;
        case 3: acc = acc * 3 % 10007; break;
        case 5: acc += (int)(signed char)(i * 37); break;
        default: acc += 1;
        }
    }
    return acc;
}

static int fib(int n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }

int recursion(void) {
    int acc = 0;
    for (int i = 0; i < SCALE; i++) acc += fib(18);
    return acc;
}

long long conversions(void) {
    long long acc = 0;
    double d = -1e10;
    for (int i = 0; i < 40 * SCALE; i++, d = d * -0.37 + 12345.678) {
        acc += (long long)d + (int)(float)d / 3 + (unsigned char)(int)d;
    }
    return acc;
}

/* A bytecode interpreter: a switch with many cases (clang nests one block per case). */
static int run_bytecode(const unsigned char *code, int n) {
    int acc = 0, pc = 0, r[8] = {0};
    while (pc < n) {
        unsigned char op = code[pc++];
        switch (op & 31) {
        case 0: acc += 1; break;        case 1: acc -= 2; break;
        case 2: acc *= 3; break;        case 3: acc ^= 5; break;
        case 4: acc <<= 1; break;       case 5: acc >>= 1; break;
        case 6: r[op >> 5] = acc; break; case 7: acc = r[op >> 5]; break;
        case 8: acc += r[0]; break;     case 9: acc -= r[1]; break;
        case 10: acc |= 7; break;       case 11: acc &= 0xfff; break;
        case 12: acc = -acc; break;     case 13: acc = ~acc; break;
        case 14: acc += 100; break;     case 15: acc /= 3; break;
        case 16: acc %= 1000; break;    case 17: acc += pc; break;
        case 18: acc -= pc; break;      case 19: acc *= acc; break;
        case 20: acc += 20; /* falls through */
        case 21: acc -= 21; break;      case 22: acc ^= 22; break;
        case 23: acc += r[2]; break;    case 24: acc += r[3]; break;
        case 25: pc += 1; break;        case 26: acc += 26; break;
        case 27: acc -= 27; break;      case 28: acc *= 7; break;
        default: acc += op; break;
        }
    }
    return acc;
}

int bytecode(void) {
    static unsigned char program[512];
    for (int i = 0; i < 512; i++) program[i] = (unsigned char)(i * 37 + 11);
    int sum = 0;
    for (int k = 0; k < 2 * SCALE; k++) sum += run_bytecode(program, 512);
    return sum;
}
