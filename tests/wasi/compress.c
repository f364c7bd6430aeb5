/* CPU-bound work as real programs do it: an LZ77 compressor (hash chains, greedy matches)
 * and its decompressor over generated text, checked by CRC-32; and a numeric kernel
 * (an n-body simulation in double precision). Prints sizes, checksums and energies,
 * which any correct runtime prints the same.
 *
 *     compress lz KIB      compress, decompress and check KIB KiB of text
 *     compress nbody STEPS simulate the five Jovian bodies for STEPS steps
 *
 * The same work is exported as lz_crc(KIB) and nbody_nanojoules(STEPS) for runtimes that
 * call a function rather than run a WASI command (bench/wasm.py, on wasm3). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WINDOW 4096
#define MIN_MATCH 3
#define MAX_MATCH 18
#define HASH_BITS 12
#define MAX_CHAIN 16

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32(const uint8_t *p, size_t n) {
    uint32_t c = 0xffffffffu;
    while (n--) c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

static uint32_t rng = 12345;
static uint32_t next_random(void) { rng = rng * 1103515245u + 12345u; return rng >> 16; }

/* words from a small vocabulary, so that there is something to compress */
static void make_text(uint8_t *out, size_t n) {
    static const char *words[] = {"the", "virtual", "machine", "popek", "goldberg", "an",
        "efficient", "isolated", "duplicate", "of", "a", "real", "webassembly", "module",
        "interpreter", "translation", "native", "code", "trap", "memory"};
    size_t i = 0;
    while (i < n) {
        const char *w = words[next_random() % 20];
        while (*w && i < n) out[i++] = (uint8_t)*w++;
        if (i < n) out[i++] = next_random() % 11 ? ' ' : '\n';
    }
}

/* Output: groups of 8 items behind a flag byte; a literal is one byte, a match two
 * (12-bit distance - 1, 4-bit length - MIN_MATCH). */
static size_t lz_compress(const uint8_t *in, size_t n, uint8_t *out) {
    static int32_t head[1 << HASH_BITS];
    static int32_t prev[WINDOW];
    memset(head, 0xff, sizeof head);
    size_t o = 0, i = 0;
    while (i < n) {
        size_t flag_at = o++;
        uint8_t flags = 0;
        for (int bit = 0; bit < 8 && i < n; bit++) {
            size_t best_len = 0, best_dist = 0;
            if (i + MIN_MATCH <= n) {
                uint32_t h = ((in[i] << 8) ^ (in[i + 1] << 4) ^ in[i + 2]) & ((1 << HASH_BITS) - 1);
                int32_t cand = head[h];
                for (int chain = 0; cand >= 0 && i - cand <= WINDOW && chain < MAX_CHAIN; chain++) {
                    size_t len = 0;
                    while (len < MAX_MATCH && i + len < n && in[cand + len] == in[i + len]) len++;
                    if (len > best_len) { best_len = len; best_dist = i - cand; }
                    int32_t older = prev[cand % WINDOW];
                    if (older >= cand) break;
                    cand = older;
                }
                prev[i % WINDOW] = head[h];
                head[h] = (int32_t)i;
            }
            if (best_len >= MIN_MATCH) {
                flags |= 1 << bit;
                out[o++] = (uint8_t)((best_dist - 1) >> 4);
                out[o++] = (uint8_t)(((best_dist - 1) & 15) << 4 | (best_len - MIN_MATCH));
                for (size_t k = 1; k < best_len; k++) {
                    size_t j = i + k;
                    if (j + MIN_MATCH <= n) {
                        uint32_t h = ((in[j] << 8) ^ (in[j + 1] << 4) ^ in[j + 2]) & ((1 << HASH_BITS) - 1);
                        prev[j % WINDOW] = head[h];
                        head[h] = (int32_t)j;
                    }
                }
                i += best_len;
            } else {
                out[o++] = in[i++];
            }
        }
        out[flag_at] = flags;
    }
    return o;
}

static size_t lz_decompress(const uint8_t *in, size_t n, uint8_t *out) {
    size_t i = 0, o = 0;
    while (i < n) {
        uint8_t flags = in[i++];
        for (int bit = 0; bit < 8 && i < n; bit++) {
            if (flags & (1 << bit)) {
                size_t dist = ((size_t)in[i] << 4 | in[i + 1] >> 4) + 1;
                size_t len = (in[i + 1] & 15) + MIN_MATCH;
                i += 2;
                for (size_t k = 0; k < len; k++, o++) out[o] = out[o - dist];
            } else {
                out[o++] = in[i++];
            }
        }
    }
    return o;
}

struct lz_result { size_t size, packed_size; uint32_t crc, packed_crc; int same; };

static int lz_run(size_t kib, struct lz_result *r) {
    size_t n = kib * 1024;
    uint8_t *text = malloc(n), *packed = malloc(n + n / 8 + 16), *back = malloc(n);
    if (!text || !packed || !back) return -1;
    rng = 12345;
    crc_init();
    make_text(text, n);
    size_t m = lz_compress(text, n, packed);
    size_t k = lz_decompress(packed, m, back);
    *r = (struct lz_result){n, m, crc32(text, n), crc32(packed, m),
                            k == n && memcmp(text, back, n) == 0};
    free(text); free(packed); free(back);
    return 0;
}

__attribute__((export_name("lz_crc"))) uint32_t lz_crc(int kib) {
    struct lz_result r;
    return lz_run((size_t)kib, &r) == 0 && r.same ? r.packed_crc : 0;
}

static int lz(size_t kib) {
    struct lz_result r;
    if (lz_run(kib, &r)) { fprintf(stderr, "out of memory\n"); return 1; }
    printf("lz: %zu bytes -> %zu bytes (%.1f%%), crc %08x, packed crc %08x\n",
           r.size, r.packed_size, 100.0 * r.packed_size / r.size, r.crc, r.packed_crc);
    printf("round trip: %s\n", r.same ? "identical" : "DIFFERENT");
    return r.same ? 0 : 1;
}

struct body { double x, y, z, vx, vy, vz, mass; };

static double energy(struct body *b, int n) {
    double e = 0;
    for (int i = 0; i < n; i++) {
        e += 0.5 * b[i].mass * (b[i].vx * b[i].vx + b[i].vy * b[i].vy + b[i].vz * b[i].vz);
        for (int j = i + 1; j < n; j++) {
            double dx = b[i].x - b[j].x, dy = b[i].y - b[j].y, dz = b[i].z - b[j].z;
            e -= b[i].mass * b[j].mass / sqrt(dx * dx + dy * dy + dz * dz);
        }
    }
    return e;
}

static double nbody_energy(int steps, double *before) {
    const double pi = 3.141592653589793, days = 365.24, solar = 4 * pi * pi;
    struct body b[5] = {
        {0, 0, 0, 0, 0, 0, solar},
        {4.84143144246472090e+00, -1.16032004402742839e+00, -1.03622044471123109e-01,
         1.66007664274403694e-03 * days, 7.69901118419740425e-03 * days,
         -6.90460016972063023e-05 * days, 9.54791938424326609e-04 * solar},
        {8.34336671824457987e+00, 4.12479856412430479e+00, -4.03523417114321381e-01,
         -2.76742510726862411e-03 * days, 4.99852801234917238e-03 * days,
         2.30417297573763929e-05 * days, 2.85885980666130812e-04 * solar},
        {1.28943695621391310e+01, -1.51111514016986312e+01, -2.23307578892655734e-01,
         2.96460137564761618e-03 * days, 2.37847173959480950e-03 * days,
         -2.96589568540237556e-05 * days, 4.36624404335156298e-05 * solar},
        {1.53796971148509165e+01, -2.59193146099879641e+01, 1.79258772950371181e-01,
         2.68067772490389322e-03 * days, 1.62824170038242295e-03 * days,
         -9.51592254519715870e-05 * days, 5.15138902046611451e-05 * solar}};
    double px = 0, py = 0, pz = 0;
    for (int i = 0; i < 5; i++) { px += b[i].vx * b[i].mass; py += b[i].vy * b[i].mass; pz += b[i].vz * b[i].mass; }
    b[0].vx = -px / solar; b[0].vy = -py / solar; b[0].vz = -pz / solar;
    *before = energy(b, 5);
    for (int s = 0; s < steps; s++) {
        for (int i = 0; i < 5; i++)
            for (int j = i + 1; j < 5; j++) {
                double dx = b[i].x - b[j].x, dy = b[i].y - b[j].y, dz = b[i].z - b[j].z;
                double d2 = dx * dx + dy * dy + dz * dz;
                double mag = 0.01 / (d2 * sqrt(d2));
                b[i].vx -= dx * b[j].mass * mag; b[i].vy -= dy * b[j].mass * mag; b[i].vz -= dz * b[j].mass * mag;
                b[j].vx += dx * b[i].mass * mag; b[j].vy += dy * b[i].mass * mag; b[j].vz += dz * b[i].mass * mag;
            }
        for (int i = 0; i < 5; i++) { b[i].x += 0.01 * b[i].vx; b[i].y += 0.01 * b[i].vy; b[i].z += 0.01 * b[i].vz; }
    }
    return energy(b, 5);
}

__attribute__((export_name("nbody_nanojoules"))) int64_t nbody_nanojoules(int steps) {
    double before;
    return (int64_t)(nbody_energy(steps, &before) * 1e9);
}

static int nbody(int steps) {
    double before, after = nbody_energy(steps, &before);
    printf("nbody: energy before %.9f\n", before);
    printf("nbody: energy after %d steps %.9f\n", steps, after);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "lz") == 0) return lz((size_t)atol(argv[2]));
    if (argc == 3 && strcmp(argv[1], "nbody") == 0) return nbody(atoi(argv[2]));
    fprintf(stderr, "usage: compress lz KIB | compress nbody STEPS\n");
    return 2;
}
