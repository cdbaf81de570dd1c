// int8 for unstructured pruning: any 4 nonzeros of a row in one vpdpbusd ("gathered quads", docs/design.md item 37).
//
// The int8 kernels store 4 adjacent input channels per 32-bit word (quads), so one vpdpbusd takes a row's 4 weights
// of a quad; on unstructured 90% masks a stored quad holds 1.16 nonzeros, and int8 ran 1.2x our fp32 rows. Here
// the input is one byte per position (the padded planes as the fp32 kernels read them, in uint8), and each row's
// nonzeros are grouped by 4 whatever their channels and taps: per group and 16 output positions, the 16 bytes each
// of the 4 nonzeros reads are loaded (4 unaligned 16-byte loads), put side by side in a zmm (3 inserts) and
// interleaved so that lane i holds position i of all 4 (one vpermb, AVX-512 VBMI), then one vpdpbusd with the 4
// weights as one broadcast dword. Against the fp32 loop on the same rows (per nonzero one broadcast weight and one
// 16-lane FMA per 16 positions) and against the quads on the same rows (4 adjacent channels of one tap per word;
// per stored quad one broadcast dword and one 64-byte load and vpdpbusd per 16 positions), all with 2 rows x U
// vectors in registers, stride-1 3x3 convs, 90% random masks. Both int8 results are checked against a scalar
// reference on every shape. AVX-512 VNNI + VBMI hosts only.
//
//   gcc -O3 -march=native benchmarks/gathered_quads.c -o /tmp/gathered_quads && /tmp/gathered_quads
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define U 4   // 16-position vectors per register tile row
#define KI 2  // rows per register tile

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// every register tile of int32 sums (KI rows x U vectors of 16): zeroed, `...` run over the tile's entries, stored
#define INT8_TILES(out, ...)                                                                                   \
    for (int r0 = 0; r0 < k; r0 += KI)                                                                        \
        for (int ch = 0; ch < chunks; ch++) {                                                                 \
            __m512i acc[KI][U];                                                                               \
            for (int a = 0; a < KI; a++)                                                                      \
                for (int u = 0; u < U; u++) acc[a][u] = _mm512_setzero_si512();                                \
            __VA_ARGS__                                                                                       \
            for (int a = 0; a < KI; a++)                                                                      \
                for (int u = 0; u < U; u++) _mm512_store_si512(out + (size_t)(r0 + a) * q + ch * 16 * U + 16 * u, acc[a][u]); \
        }

static int run(int c, int k, int h) {
    int w = h, pitch = w + 2, plane = (h + 2) * pitch;
    int q = ((h * pitch + 16 * U - 1) / (16 * U)) * (16 * U), chunks = q / (16 * U);  // extended domain y*pitch + x
    int per = (c * 9 / 10 + 3) / 4 * 4;                                                   // 10% of the taps, whole groups
    size_t n = (size_t)c * plane + q + 64;
    float *xf = aligned_alloc(64, n * 4), *wf = malloc((size_t)k * per * 4), *of = aligned_alloc(64, (size_t)k * q * 4);
    uint8_t *xb = aligned_alloc(64, n);
    int8_t *wb = malloc((size_t)k * per);
    uint32_t *off = malloc((size_t)k * per * 4);
    int32_t *oi = aligned_alloc(64, (size_t)k * q * 4);
    for (size_t i = 0; i < n; i++) xb[i] = rand() % 256, xf[i] = xb[i];
    int *taps = malloc(sizeof(int) * c * 9);
    for (int r = 0; r < k; r++) {  // per row `per` distinct taps (a partial shuffle), in input order
        for (int t = 0; t < c * 9; t++) taps[t] = t;
        for (int j = 0; j < per; j++) {
            int pick = j + rand() % (c * 9 - j), t = taps[j];
            taps[j] = taps[pick], taps[pick] = t;
        }
        for (int j = 0; j < per; j++) {
            int t = taps[j], i = r * per + j;
            off[i] = t / 9 * plane + t % 9 / 3 * pitch + t % 3;
            wb[i] = (int8_t)(rand() % 255 - 127), wf[i] = wb[i];
        }
    }
    free(taps);
    // the same rows as quads: per row, its distinct (channel quad, tap) with the 4 weights (zeros where none)
    int cq = (c + 3) / 4, nq_max = per;
    uint8_t *x4 = aligned_alloc(64, ((size_t)cq * plane + q + 64) * 4);
    for (size_t i = 0; i < (size_t)cq * plane + q + 64; i++)
        for (int v = 0; v < 4; v++) {
            size_t ch = i / plane * 4 + v, pos = i % plane;
            x4[i * 4 + v] = ch < (size_t)c && i < (size_t)cq * plane ? xb[ch * plane + pos] : 0;
        }
    int *nq = calloc(k, sizeof(int));
    uint32_t *qoff = malloc((size_t)k * nq_max * 4);
    int32_t *qw = calloc((size_t)k * nq_max, 4);
    for (int r = 0; r < k; r++)
        for (int j = 0; j < per; j++) {
            int ch = off[r * per + j] / plane, tap = off[r * per + j] % plane, word = ch / 4 * plane + tap, e;
            for (e = 0; e < nq[r] && qoff[r * nq_max + e] != (uint32_t)word; e++) {}
            if (e == nq[r]) qoff[r * nq_max + nq[r]++] = word;
            ((int8_t *)&qw[r * nq_max + e])[ch % 4] = wb[r * per + j];
        }
    long stored = 0;
    for (int r = 0; r < k; r += KI) {  // each tile runs to its longer row, zero quads after a row's end
        int len = 0;
        for (int a = 0; a < KI; a++) len = nq[r + a] > len ? nq[r + a] : len;
        for (int a = 0; a < KI; a++)
            for (int e = nq[r + a]; e < len; e++) qoff[(r + a) * nq_max + e] = 0, qw[(r + a) * nq_max + e] = 0;
        for (int a = 0; a < KI; a++) nq[r + a] = len;
        stored += (long)len * KI;
    }
    int32_t *oq = aligned_alloc(64, (size_t)k * q * 4);
    uint8_t ix[64];
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 4; j++) ix[4 * i + j] = 16 * j + i;  // lane i, byte j <- input j, position i
    __m512i perm = _mm512_loadu_si512(ix);
    double best[3] = {1e9, 1e9, 1e9};
    for (int rep = 0; rep < 15; rep++) {
        double t0 = now();
        for (int r0 = 0; r0 < k; r0 += KI)
            for (int ch = 0; ch < chunks; ch++) {
                __m512 acc[KI][U];
                for (int a = 0; a < KI; a++)
                    for (int u = 0; u < U; u++) acc[a][u] = _mm512_setzero_ps();
                for (int j = 0; j < per; j++)
                    for (int a = 0; a < KI; a++) {
                        __m512 b = _mm512_set1_ps(wf[(r0 + a) * per + j]);
                        const float *p = xf + off[(r0 + a) * per + j] + ch * 16 * U;
                        for (int u = 0; u < U; u++) acc[a][u] = _mm512_fmadd_ps(_mm512_loadu_ps(p + 16 * u), b, acc[a][u]);
                    }
                for (int a = 0; a < KI; a++)
                    for (int u = 0; u < U; u++) _mm512_store_ps(of + (size_t)(r0 + a) * q + ch * 16 * U + 16 * u, acc[a][u]);
            }
        double t = now() - t0;
        if (t < best[0]) best[0] = t;
        t0 = now();
        INT8_TILES(oi, {
                for (int j = 0; j < per; j += 4)
                    for (int a = 0; a < KI; a++) {
                        const int8_t *g = wb + (r0 + a) * per + j;
                        __m512i b = _mm512_set1_epi32((int32_t)((uint8_t)g[0] | (uint8_t)g[1] << 8 | (uint8_t)g[2] << 16 | (uint32_t)(uint8_t)g[3] << 24));
                        const uint32_t *o = off + (r0 + a) * per + j;
                        const uint8_t *p0 = xb + o[0] + ch * 16 * U, *p1 = xb + o[1] + ch * 16 * U;
                        const uint8_t *p2 = xb + o[2] + ch * 16 * U, *p3 = xb + o[3] + ch * 16 * U;
                        for (int u = 0; u < U; u++) {
                            __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p0 + 16 * u)));
                            v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p1 + 16 * u)), 1);
                            v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p2 + 16 * u)), 2);
                            v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p3 + 16 * u)), 3);
                            acc[a][u] = _mm512_dpbusd_epi32(acc[a][u], _mm512_permutexvar_epi8(perm, v), b);
                        }
                    }
        })
        t = now() - t0;
        if (t < best[1]) best[1] = t;
        t0 = now();
        INT8_TILES(oq, {
                for (int e = 0; e < nq[r0]; e++)
                    for (int a = 0; a < KI; a++) {
                        __m512i b = _mm512_set1_epi32(qw[(r0 + a) * nq_max + e]);
                        const uint8_t *p = x4 + ((size_t)qoff[(r0 + a) * nq_max + e] + ch * 16 * U) * 4;
                        for (int u = 0; u < U; u++)
                            acc[a][u] = _mm512_dpbusd_epi32(acc[a][u], _mm512_loadu_si512(p + 64 * u), b);
                    }
        })
        t = now() - t0;
        if (t < best[2]) best[2] = t;
    }
    int bad = 0;  // every output position's sums against a scalar reference (fp32 too, exact at these magnitudes)
    for (int r = 0; r < k && !bad; r++)
        for (int p = 0; p < q; p++) {
            if (p / pitch >= h || p % pitch >= w) continue;  // thrown-away positions read other planes' bytes
            long ref = 0;
            for (int j = 0; j < per; j++) ref += (long)xb[off[r * per + j] + p] * wb[r * per + j];
            if (oi[(size_t)r * q + p] != ref || oq[(size_t)r * q + p] != ref || of[(size_t)r * q + p] != (float)ref) {
                bad = 1;
                break;
            }
        }
    printf("%4dx%-4d 3x3 on %2dx%-2d: fp32 %6.1f us, int8 quads %6.1f us (%.2f nonzeros per stored quad), gathered quads "
           "%6.1f us: %.2fx fp32, %.2fx the quads%s\n", k, c, h, w, best[0] * 1e6, best[2] * 1e6, (double)k * per / stored,
           best[1] * 1e6, best[0] / best[1], best[2] / best[1], bad ? "  WRONG" : "");
    return bad;
}

int main(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512vnni") || !__builtin_cpu_supports("avx512vbmi")) {
        fprintf(stderr, "gathered_quads needs AVX-512 VNNI and VBMI\n");
        return 2;
    }
    srand(1);
    const int shapes[][3] = {{64, 64, 32}, {128, 128, 16}, {256, 256, 8}, {256, 256, 14}, {512, 512, 7}};
    int bad = 0;
    for (int i = 0; i < 5; i++) bad |= run(shapes[i][0], shapes[i][1], shapes[i][2]);
    return bad;
}
