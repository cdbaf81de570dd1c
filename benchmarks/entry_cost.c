// What one stored weight costs in the sparse kernels' inner loop, and which changes to that loop pay, on the
// CPU it runs on (docs/design.md item 36). Each experiment is a C replica of a loop the x86 schedules generate,
// next to a variant; times are the best of several runs, per stored weight or per vector FMA. AVX-512 hosts only.
//
//   gcc -O3 -march=native benchmarks/entry_cost.c -o /tmp/entry_cost && /tmp/entry_cost
//
//   peak       one 16-lane FMA per step: registers only; with an aligned load from L1; plus a weight broadcast
//              from memory (what every stored weight pays); the weight instead taken from a vector of 8 loaded
//              once (vpermps)
//   map4x4     vgg16-cifar's 512x512 3x3 on a 4x4 map at 90%: 8 rows x 1 vector, one aligned patch per weight,
//              16-bit offsets; offsets loaded one by one vs 8 at a time and extracted (what LLVM emits); the
//              weights streamed (the whole layer) vs 16 rows' worth re-read (in L1/L2); the rows cut into B
//              input-channel blocks run block by block (their partial sums stored between blocks)
//   map2x2     the same layer on a 2x2 map (one 4-lane FMA per weight) vs 4 rows per 16-lane vector, each
//              row's input inserted (row lanes for ungrouped rows)
//   aligned    a stride-1 3x3 on 32x32 (64 -> 64 channels) and 16x16 (128 -> 128) at 90%, two output rows x 2
//              or 4 vectors: the padded plane (pitch W+2, most loads split across two cache lines) vs three
//              copies shifted by a column each at pitch W (every load aligned; the copies not counted); here
//              the weight is one constant held in a register, so only the input loads differ
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define BEST(var, reps, ...)                       \
    do {                                           \
        var = 1e9;                                 \
        for (int rep_ = 0; rep_ < (reps); rep_++) { \
            double t0_ = now();                    \
            __VA_ARGS__;                           \
            double t_ = now() - t0_;               \
            if (t_ < var) var = t_;                \
        }                                          \
    } while (0)

static float sink;

static void peak(void) {
    static float buf[8192] __attribute__((aligned(64))), wb[512] __attribute__((aligned(64)));
    for (int i = 0; i < 8192; i++) buf[i] = 1e-6f * i;
    for (int i = 0; i < 512; i++) wb[i] = 0.999f;
    const long n = 20000000;
    double t;
    long v = 1;
    BEST(t, 3, for (long i = 0; i < n; i++) __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(v)));
    double ghz = 4.0 * n / t / 1e9;
    printf("peak: clock %.2f GHz (a dependent add per cycle)\n", ghz);
    __m512i idx[8];
    for (int k = 0; k < 8; k++) idx[k] = _mm512_set1_epi32(k);
#define PEAK(name, ...)                                                                                   \
    do {                                                                                                  \
        __m512 a[8];                                                                                      \
        for (int k = 0; k < 8; k++) a[k] = _mm512_set1_ps(1.0f);                                           \
        BEST(t, 3, for (long i = 0; i < n; i++) {                                                         \
            const float *p = buf + ((i * 37) & 63) * 64, *w = wb + (i & 63) * 8;                          \
            (void)p; (void)w;                                                                             \
            __VA_ARGS__                                                                                   \
        });                                                                                               \
        for (int k = 0; k < 8; k++) sink += a[k][0];                                                      \
        printf("  %-40s %.3f ns per FMA, %.2f cycles\n", name, t / (n * 8) * 1e9, t / (n * 8) * ghz * 1e9); \
    } while (0)
    __m512 m = _mm512_set1_ps(0.9999999f);
    PEAK("registers only", for (int k = 0; k < 8; k++) a[k] = _mm512_fmadd_ps(a[k], m, m););
    PEAK("aligned load from L1, weight in a register",
         for (int k = 0; k < 8; k++) a[k] = _mm512_fmadd_ps(_mm512_load_ps(p + 16 * k), m, a[k]););
    PEAK("... and the weight broadcast from memory",
         for (int k = 0; k < 8; k++) a[k] = _mm512_fmadd_ps(_mm512_load_ps(p + 16 * k), _mm512_set1_ps(w[k]), a[k]););
    PEAK("... the weight from 8 loaded once (vpermps)",
         __m512 wv = _mm512_castps256_ps512(_mm256_load_ps(w));
         for (int k = 0; k < 8; k++) a[k] = _mm512_fmadd_ps(_mm512_load_ps(p + 16 * k), _mm512_permutexvar_ps(idx[k], wv), a[k]););
}

static int cmp_u16(const void *a, const void *b) { return *(const uint16_t *)a - *(const uint16_t *)b; }

// rows of `per` random patch numbers (sorted, as the rewrite stores them), stored by tiles of 8 rows and B
// channel blocks: [tile][block][entry][8], each (tile, block) padded to its longest row with zero weights
typedef struct {
    int tiles, blocks, *len;
    long *start, stored;
    uint16_t *off;
    float *w;
} Rows;

static Rows make_rows(int k, int per, int patches, int blocks) {
    uint16_t *rows = malloc((size_t)k * per * 2);
    for (int r = 0; r < k; r++) {
        for (int j = 0; j < per; j++) rows[r * per + j] = rand() % patches;
        qsort(rows + r * per, per, 2, cmp_u16);
    }
    Rows s = {k / 8, blocks, malloc(sizeof(int) * k / 8 * blocks), malloc(sizeof(long) * k / 8 * blocks), 0,
              malloc((size_t)k * per * 4), malloc((size_t)k * per * 8)};
    for (int t = 0; t < s.tiles; t++)
        for (int b = 0; b < blocks; b++) {
            int lo = b * patches / blocks, hi = (b + 1) * patches / blocks, first[8], count[8], len = 0;
            for (int r = 0; r < 8; r++) {
                const uint16_t *row = rows + (t * 8 + r) * per;
                int j = 0;
                while (j < per && row[j] < lo) j++;
                first[r] = j;
                while (j < per && row[j] < hi) j++;
                count[r] = j - first[r];
                if (count[r] > len) len = count[r];
            }
            s.len[t * blocks + b] = len;
            s.start[t * blocks + b] = s.stored;
            for (int j = 0; j < len; j++)
                for (int r = 0; r < 8; r++, s.stored++) {
                    s.off[s.stored] = j < count[r] ? rows[(t * 8 + r) * per + first[r] + j] : 0;
                    s.w[s.stored] = j < count[r] ? 1e-3f : 0.0f;
                }
        }
    free(rows);
    return s;
}

// one pass over the rows: 8 accumulators (a tile's rows) of one 16-lane vector, partial sums kept between blocks
static void pass4x4(const Rows *s, const float *x, float *part, int vector_offsets) {
    for (int b = 0; b < s->blocks; b++)
        for (int t = 0; t < s->tiles; t++) {
            __m512 acc[8];
            for (int r = 0; r < 8; r++) acc[r] = b ? _mm512_load_ps(part + (t * 8 + r) * 16) : _mm512_setzero_ps();
            const uint16_t *o = s->off + s->start[t * s->blocks + b];
            const float *w = s->w + s->start[t * s->blocks + b];
            int len = s->len[t * s->blocks + b];
            if (vector_offsets) {  // 8 offsets in one load, shifted, then extracted one by one
                for (int j = 0; j < len; j++) {
                    __m256i ov = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(o + j * 8))), 6);
                    __m128i lo = _mm256_castsi256_si128(ov), hi = _mm256_extracti128_si256(ov, 1);
                    int oo[8] = {_mm_cvtsi128_si32(lo), _mm_extract_epi32(lo, 1), _mm_extract_epi32(lo, 2),
                                 _mm_extract_epi32(lo, 3), _mm_cvtsi128_si32(hi), _mm_extract_epi32(hi, 1),
                                 _mm_extract_epi32(hi, 2), _mm_extract_epi32(hi, 3)};
                    for (int r = 0; r < 8; r++)
                        acc[r] = _mm512_fmadd_ps(_mm512_load_ps((const float *)((const char *)x + oo[r])),
                                                 _mm512_set1_ps(w[j * 8 + r]), acc[r]);
                }
            } else {
                for (int j = 0; j < len; j++)
                    for (int r = 0; r < 8; r++)
                        acc[r] = _mm512_fmadd_ps(_mm512_load_ps(x + 16 * (size_t)o[j * 8 + r]), _mm512_set1_ps(w[j * 8 + r]), acc[r]);
            }
            for (int r = 0; r < 8; r++) _mm512_store_ps(part + (t * 8 + r) * 16, acc[r]);
        }
}

static void map4x4(void) {
    const int patches = 512 * 9, per = 461;  // 512 channels x 9 taps; 10% of them per row
    float *x = aligned_alloc(64, (size_t)patches * 64), *part = aligned_alloc(64, 512 * 64);
    for (int i = 0; i < patches * 16; i++) x[i] = 1e-3f * (i % 7);
    printf("map4x4: 512x512 3x3 on 4x4 at 90%%, one aligned 16-lane patch per stored weight (patches %d KB)\n",
           patches * 64 / 1024);
    const int cases[][3] = {{512, 1, 0}, {512, 1, 1}, {16, 1, 0}, {512, 4, 0}, {512, 12, 0}};  // rows, blocks, vector offsets
    for (int c = 0; c < 5; c++) {
        Rows s = make_rows(cases[c][0], per, patches, cases[c][1]);
        int passes = 512 / cases[c][0];
        double t;
        BEST(t, 30, for (int p = 0; p < passes; p++) pass4x4(&s, x, part, cases[c][2]));
        sink += part[0];
        printf("  %4d rows (weights %4ld KB), %2d channel block(s), offsets %-9s %.3f ns per stored weight "
               "(%.3f of the nonzeros stored)\n", cases[c][0], s.stored * 6 / 1024, cases[c][1],
               cases[c][2] ? "by vector" : "one by one", t / passes / s.stored * 1e9, (double)s.stored / (cases[c][0] * per));
    }
}

static void map2x2(void) {
    const long n = 248192;
    const int patches = 512 * 9;
    float *x = aligned_alloc(64, (size_t)patches * 16), *w = aligned_alloc(64, n * 4);
    uint16_t *off = aligned_alloc(64, n * 2);
    for (int i = 0; i < patches * 4; i++) x[i] = 1e-3f * (i % 7);
    for (long i = 0; i < n; i++) off[i] = rand() % patches, w[i] = 1e-3f;
    const __m512i rep4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    double ta, tb;
    BEST(ta, 30, for (long j = 0; j < n; j += 512) {
        __m128 acc[8];
        for (int r = 0; r < 8; r++) acc[r] = _mm_setzero_ps();
        for (long e = j; e < j + 512 && e < n; e += 8)
            for (int r = 0; r < 8; r++) acc[r] = _mm_fmadd_ps(_mm_load_ps(x + 4 * (size_t)off[e + r]), _mm_set1_ps(w[e + r]), acc[r]);
        for (int r = 0; r < 8; r++) sink += acc[r][0];
    });
    BEST(tb, 30, for (long j = 0; j < n; j += 512) {
        __m512 acc[4];
        for (int g = 0; g < 4; g++) acc[g] = _mm512_setzero_ps();
        for (long e = j; e < j + 512 && e < n; e += 16)
            for (int g = 0; g < 4; g++) {
                const uint16_t *o = off + e + 4 * g;
                __m512 v = _mm512_castps128_ps512(_mm_load_ps(x + 4 * (size_t)o[0]));
                v = _mm512_insertf32x4(v, _mm_load_ps(x + 4 * (size_t)o[1]), 1);
                v = _mm512_insertf32x4(v, _mm_load_ps(x + 4 * (size_t)o[2]), 2);
                v = _mm512_insertf32x4(v, _mm_load_ps(x + 4 * (size_t)o[3]), 3);
                __m512 wv = _mm512_permutexvar_ps(rep4, _mm512_broadcast_f32x4(_mm_load_ps(w + e + 4 * g)));
                acc[g] = _mm512_fmadd_ps(v, wv, acc[g]);
            }
        for (int g = 0; g < 4; g++) sink += acc[g][0];
    });
    printf("map2x2: 512x512 3x3 on 2x2 at 90%%: one 4-lane FMA per weight %.3f ns, 4 rows per 16-lane vector "
           "%.3f ns per stored weight (%.2fx)\n", ta / n * 1e9, tb / n * 1e9, ta / tb);
}

// stride-1 3x3, row domain, 2 rows interleaved x U vectors (U/VPR output rows per tile)
#define STRIDE1(U, VPR)                                                                                        \
    static double stride1_##U(const float *x, const uint32_t *off, int per, int k, int h, int pitch, float *out) { \
        double t;                                                                                              \
        BEST(t, 15, for (int r0 = 0; r0 < k; r0 += 2) for (int y0 = 0; y0 < h; y0 += (U) / (VPR)) {            \
            __m512 acc[2][U];                                                                                  \
            for (int a = 0; a < 2; a++) for (int u = 0; u < (U); u++) acc[a][u] = _mm512_setzero_ps();           \
            for (int j = 0; j < per; j++) for (int a = 0; a < 2; a++) {                                         \
                __m512 b = _mm512_set1_ps(1e-3f);                                                              \
                const float *p = x + off[(r0 + a) * per + j] + y0 * pitch;                                      \
                for (int u = 0; u < (U); u++)                                                                  \
                    acc[a][u] = _mm512_fmadd_ps(_mm512_loadu_ps(p + (u / (VPR)) * pitch + (u % (VPR)) * 16), b, acc[a][u]); \
            }                                                                                                  \
            for (int a = 0; a < 2; a++) for (int u = 0; u < (U); u++)                                          \
                _mm512_store_ps(out + ((size_t)(r0 + a) * h + y0 + u / (VPR)) * h + (u % (VPR)) * 16, acc[a][u]); \
        });                                                                                                    \
        return t;                                                                                              \
    }
STRIDE1(8, 2)
STRIDE1(4, 1)

static void aligned(void) {
    const int shapes[][3] = {{64, 64, 32}, {128, 128, 16}};
    for (int c = 0; c < 2; c++) {
        int ch = shapes[c][0], k = shapes[c][1], h = shapes[c][2], per = ch * 9 / 10;
        size_t plane = (size_t)ch * (h + 2) * (h + 2) + 64, copies = 3 * (size_t)ch * (h + 2) * h + 64;
        float *xa = aligned_alloc(64, plane * 4), *xb = aligned_alloc(64, copies * 4);
        float *out = aligned_alloc(64, (size_t)k * h * h * 4);
        uint32_t *oa = malloc((size_t)k * per * 4), *ob = malloc((size_t)k * per * 4);
        for (size_t i = 0; i < plane; i++) xa[i] = 1e-3f * (i % 7);
        for (size_t i = 0; i < copies; i++) xb[i] = 1e-3f * (i % 7);
        for (int j = 0; j < k * per; j++) {
            int cc = rand() % ch, r = rand() % 3, s = rand() % 3;
            oa[j] = cc * (h + 2) * (h + 2) + r * (h + 2) + s;
            ob[j] = (s * ch + cc) * (h + 2) * h + r * h;
        }
        double ta = h == 32 ? stride1_8(xa, oa, per, k, h, h + 2, out) : stride1_4(xa, oa, per, k, h, h + 2, out);
        double tb = h == 32 ? stride1_8(xb, ob, per, k, h, h, out) : stride1_4(xb, ob, per, k, h, h, out);
        double fmas = (double)k * per * h * h / 16;
        sink += out[0];
        printf("aligned: %dx%d 3x3 on %dx%d at 90%%: padded plane (%zu KB) %.3f ns per vector FMA, three aligned "
               "copies (%zu KB) %.3f ns (%.2fx)\n", k, ch, h, h, plane * 4 / 1024, ta / fmas * 1e9, copies * 4 / 1024,
               tb / fmas * 1e9, ta / tb);
    }
}

int main(int argc, char **argv) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f")) {
        fprintf(stderr, "entry_cost needs an AVX-512 CPU\n");
        return 2;
    }
    const char *only = argc > 1 ? argv[1] : "";
    srand(1);
    if (!*only || !strcmp(only, "peak")) peak();
    if (!*only || !strcmp(only, "map4x4")) map4x4();
    if (!*only || !strcmp(only, "map2x2")) map2x2();
    if (!*only || !strcmp(only, "aligned")) aligned();
    if (sink == 12345.0f) printf(" ");
    return 0;
}
