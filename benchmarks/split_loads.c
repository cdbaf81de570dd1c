// What the sparse conv kernels' inner loop costs when its vector loads are aligned or not (docs/design.md
// item 29): per stored weight, one broadcast and 7 FMAs on 7 consecutive 16-lane vectors of the input at a
// random offset, 4 rows interleaved (28 accumulators), as the x86 schedule generates it for a 14x14 map.
// Offsets either multiples of 16 floats (aligned) or any float (most 64-byte loads then cross a cache line);
// the input spans 32 KB (L1), 256 KB (L2) or 1 MB. Best of 50 runs; AVX-512 hosts only.
//
//   gcc -O3 -march=native benchmarks/split_loads.c -o /tmp/split_loads
//   for span in 8192 65536 262144; do /tmp/split_loads 0 $span; /tmp/split_loads 1 $span; done
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MISALIGNED(0|1) SPAN_FLOATS\n", argv[0]);
        return 2;
    }
    int misaligned = atoi(argv[1]), span = atoi(argv[2]);
    if (span < 1024 || span > 1 << 24) {
        fprintf(stderr, "SPAN_FLOATS must be in [1024, 16M]\n");
        return 2;
    }
    float *x = aligned_alloc(64, (size_t)(span + 256) * 4);
    for (int i = 0; i < span + 256; i++) x[i] = 1e-3f * (i % 7);
    enum { N = 4096 };
    static uint32_t off[N];
    static float w[N];
    srand(1);
    for (int i = 0; i < N; i++) {
        off[i] = (uint32_t)((rand() % (span / 16 - 8)) * 16 + (misaligned ? rand() % 16 : 0));
        w[i] = 1e-3f;
    }
    __m512 acc[28];
    for (int i = 0; i < 28; i++) acc[i] = _mm512_setzero_ps();
    double best = 1e9;
    for (int rep = 0; rep < 50; rep++) {
        double t0 = now();
        for (int it = 0; it < 20; it++)
            for (int j = 0; j < N; j += 4)
                for (int r = 0; r < 4; r++) {
                    __m512 b = _mm512_set1_ps(w[j + r]);
                    const float *p = x + off[j + r];
                    for (int u = 0; u < 7; u++) acc[r * 7 + u] = _mm512_fmadd_ps(_mm512_loadu_ps(p + 16 * u), b, acc[r * 7 + u]);
                }
        double t = now() - t0;
        if (t < best) best = t;
    }
    float s = 0;
    for (int i = 0; i < 28; i++) s += _mm512_reduce_add_ps(acc[i]);
    printf("%s loads, input %d KB: %.2f G vector FMAs/s (checksum %g)\n", misaligned ? "unaligned" : "aligned",
           span * 4 / 1024, 20.0 * N * 7 / best / 1e9, s);
    return 0;
}
