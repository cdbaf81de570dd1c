// What the int8 convs' requantising write-back costs per 16 outputs on this CPU, and one bit-exact alternative
// (docs/results.md, 2026-12-07 02:37- UTC). Per vector of 16 int32 sums: dequantise (FMA with the row's scale
// and bias), add a uint8 residual (widened, converted, FMA), then
//   mode 0  requantise as the kernels do (ops.sparse_int8.quantize: * 1/s, clamp to [0, 255], + rounding bias)
//           and store the low bytes (vpmovdb)
//   mode 1  the same with a zero point of 0 and a ReLU: * 1/s, max 0, vcvtps2udq (rounds half to even as the
//           bias does), vpmovusdb (saturates at 255): one op less, the same bytes (checked: equal sums)
// Sums, residuals and output in L1 (1024 vectors); best of 2000 passes. AVX-512 hosts only.
//
//   gcc -O3 -march=native benchmarks/epilogue_ops.c -o /tmp/epilogue_ops && /tmp/epilogue_ops 0 && /tmp/epilogue_ops 1
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define NV 1024

static int32_t acc[NV * 16] __attribute__((aligned(64)));
static uint8_t res[NV * 16] __attribute__((aligned(64)));
static uint8_t out[NV * 16] __attribute__((aligned(64)));

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static inline __m512 dequantised(int i) {  // sum * scale + bias + residual * its scale
    __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(acc + i * 16)), _mm512_set1_ps(0.01f),
                               _mm512_set1_ps(0.5f));
    __m512 r = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(res + i * 16))));
    return _mm512_mul_ps(_mm512_fmadd_ps(r, _mm512_set1_ps(0.02f), v), _mm512_set1_ps(8.f));  // * 1/s
}

int main(int argc, char **argv) {
    if (argc != 2 || (argv[1][0] != '0' && argv[1][0] != '1')) {
        fprintf(stderr, "usage: %s MODE (0: the kernels' requantisation, 1: vcvtps2udq + vpmovusdb)\n", argv[0]);
        return 2;
    }
    int mode = atoi(argv[1]);
    srand(1);
    for (int i = 0; i < NV * 16; i++) {
        acc[i] = rand() % 2000 - 1000;
        res[i] = (uint8_t)rand();
    }
    double best = 1e9;
    for (int rep = 0; rep < 2000; rep++) {
        double t = now();
        for (int i = 0; i < NV; i++) {
            __m512 y = dequantised(i);
            if (mode == 0) {  // clamp, + 1.5 * 2^23 - 512: the float's low byte is the rounded value
                y = _mm512_max_ps(_mm512_min_ps(y, _mm512_set1_ps(255.f)), _mm512_setzero_ps());
                y = _mm512_add_ps(y, _mm512_set1_ps(12582400.f));
                _mm512_mask_cvtepi32_storeu_epi8(out + i * 16, 0xffff, _mm512_castps_si512(y));
            } else {
                __m512i u = _mm512_cvtps_epu32(_mm512_max_ps(y, _mm512_setzero_ps()));
                _mm512_mask_cvtusepi32_storeu_epi8(out + i * 16, 0xffff, u);
            }
        }
        t = now() - t;
        if (t < best) best = t;
    }
    long sum = 0;
    for (int i = 0; i < NV * 16; i++) sum += out[i];
    printf("mode %d: %.3f ns per 16 outputs (byte sum %ld)\n", mode, best * 1e9 / NV, sum);
    return 0;
}
