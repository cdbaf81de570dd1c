// What one vpdpbusd of the int8 quads kernels costs on this CPU, by where its input comes from (design.md item 58).
// The register tile of sparse_conv2d_int8 on a 14x14 map (its assembly: schedules/sparse_conv2d_int8_cpu.py):
// two rows interleaved, per stored quad of a row one 16-bit offset, one broadcast weight dword and U = 7 vectors
// of 16 uint8 quads (64 bytes each) loaded at that offset and multiplied (14 accumulators); rows in tasks of 16,
// each task running the map's steps. Input: C channel quads x U vectors per step (the step's tile), offsets random.
//   misalign  bytes the input starts past a cache line (a 3x3's column taps, a 14x14 plane's 196-position pitch)
//   flush     1: 64 MB written before each pass (weights and offsets from DRAM, input read back into cache first)
// Prints ns and cycles per vpdpbusd (cycles at the clock measured by a dependent add chain), best of 15 passes.
//
//   gcc -O2 -march=native benchmarks/vnni_loads.c -o /tmp/vnni_loads
//   for c in 16 64 256; do /tmp/vnni_loads $c 0 0; /tmp/vnni_loads $c 4 0; done; /tmp/vnni_loads 256 0 1
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define U 7        // vectors per stored quad (a 14x14 map: 14 vectors in 2 steps)
#define ROWS 256   // output channels
#define QUADS 26   // stored quads per row (10% of 256 channel quads)
#define STEPS 2
#define TASK 16    // rows per parallel task

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double clock_ghz(void) {  // 4 dependent adds per iteration: one cycle each
    long n = 200000000, x = 0;
    double t = now();
    __asm__ volatile("1: add $1,%0; add $1,%0; add $1,%0; add $1,%0; sub $1,%1; jnz 1b" : "+r"(x), "+r"(n));
    return 4 * 200000000.0 / (now() - t) / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s CHANNEL_QUADS MISALIGN_BYTES FLUSH(0|1)\n", argv[0]);
        return 2;
    }
    int c = atoi(argv[1]), mis = atoi(argv[2]), flush = atoi(argv[3]);
    size_t tile = (size_t)c * U * 64;
    uint8_t *base = aligned_alloc(64, tile * STEPS + 64), *in = base + mis;
    uint16_t *off = malloc(sizeof(uint16_t) * ROWS * QUADS);
    int32_t *w = malloc(sizeof(int32_t) * ROWS * QUADS);
    int32_t *out = aligned_alloc(64, (size_t)ROWS * U * 64 * STEPS);
    char *junk = flush ? malloc(64 << 20) : NULL;
    srand(1);
    for (size_t i = 0; i < tile * STEPS; i++) in[i] = (uint8_t)(i * 7);
    for (int i = 0; i < ROWS * QUADS; i++) {
        off[i] = (uint16_t)(rand() % c);
        w[i] = rand();
    }
    double best = 1e9;
    for (int rep = 0; rep < 15; rep++) {
        if (flush) {  // everything out of the caches, then the input (a previous kernel's output) back in
            for (size_t i = 0; i < (64u << 20); i += 64) junk[i]++;
            volatile uint8_t z = 0;
            for (size_t i = 0; i < tile * STEPS; i += 64) z += in[i];
        }
        double t = now();
        for (int task = 0; task < ROWS; task += TASK)
            for (int s = 0; s < STEPS; s++)
                for (int r = task; r < task + TASK; r += 2) {
                    __m512i a[2][U];
#pragma GCC unroll 2
                    for (int k = 0; k < 2; k++)
#pragma GCC unroll 16
                        for (int u = 0; u < U; u++) a[k][u] = _mm512_setzero_si512();
                    for (int j = 0; j < QUADS; j++)
#pragma GCC unroll 2
                        for (int k = 0; k < 2; k++) {
                            const uint8_t *p = in + tile * s + (size_t)off[(r + k) * QUADS + j] * U * 64;
                            __m512i wb = _mm512_set1_epi32(w[(r + k) * QUADS + j]);
#pragma GCC unroll 16  // the accumulators in registers, as the kernel's tensorized loop
                            for (int u = 0; u < U; u++)
                                a[k][u] = _mm512_dpbusd_epi32(a[k][u], _mm512_loadu_si512(p + 64 * u), wb);
                        }
#pragma GCC unroll 2
                    for (int k = 0; k < 2; k++)
#pragma GCC unroll 16
                        for (int u = 0; u < U; u++)
                            _mm512_store_si512(out + (((size_t)s * ROWS + r + k) * U + u) * 16, a[k][u]);
                }
        t = now() - t;
        best = t < best ? t : best;
    }
    long sum = 0;
    for (size_t i = 0; i < (size_t)ROWS * U * 16 * STEPS; i++) sum += out[i];
    double per = best * 1e9 / ((double)ROWS * QUADS * U * STEPS);
    printf("channel quads %4d (step tile %3zu KB), misaligned by %2d B, flush %d: %.3f ns = %.2f cycles per vpdpbusd"
           " (checksum %ld)\n", c, tile / 1024, mis, flush, per, per * clock_ghz(), sum);
    return 0;
}
