/* What a store costs when the other core holds the line (design.md item 56).

Two threads, pinned to CPUs 0 and 1, each write their half of an 800 KB buffer in 64-byte vector stores
(what a relay or a conv's write-back does), timed per thread, in three cases:
  shared:  both threads first read the whole buffer (as two threads that split a conv by output channels
           each read every input channel), so every line sits in both cores' caches;
  private: each thread first reads only its own half;
and, with argument "nt", the same with non-temporal stores.

    cc -O2 -mavx512f -pthread -o shared_writes benchmarks/shared_writes.c && ./shared_writes [nt]
    (-mavx2 instead of -mavx512f on an AVX2-only host)

On the 2-vCPU Zen 4 VM (2026-12-07): shared 38-47 us, private 4.0-5.3 us per half; non-temporal 21-27 us in
both (they go to memory). On the 2-vCPU Zen 3 VM, AVX2 build (2026-12-08, 8 runs): shared 12.6-25.8 us,
private 7.3-9.7; non-temporal 19-38 (design.md item 66). */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SIZE (800 * 1024)
#define ROUNDS 200
static uint8_t *shared_buf, *private_buf;
static pthread_barrier_t barrier;
static double per_thread[2][2];
static int nontemporal;
static volatile uint64_t sink;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void read_range(const uint8_t *p, size_t from, size_t to) {
  uint64_t s = 0;
  for (size_t i = from; i < to; i += 64) s += p[i];
  sink += s;
}

static void write_half(uint8_t *p, int t) {
#ifdef __AVX512F__
  __m512i v = _mm512_set1_epi8((char)(t + 1));
  for (size_t i = t * SIZE / 2; i < (size_t)(t + 1) * SIZE / 2; i += 64) {
    if (nontemporal) _mm512_stream_si512((void *)(p + i), v);
    else _mm512_storeu_si512(p + i, v);
  }
#else  /* AVX2 hosts (-mavx2): a 64-byte line in two 32-byte stores, as AVX2 code writes it */
  __m256i v = _mm256_set1_epi8((char)(t + 1));
  for (size_t i = t * SIZE / 2; i < (size_t)(t + 1) * SIZE / 2; i += 64) {
    if (nontemporal) { _mm256_stream_si256((void *)(p + i), v); _mm256_stream_si256((void *)(p + i + 32), v); }
    else { _mm256_storeu_si256((void *)(p + i), v); _mm256_storeu_si256((void *)(p + i + 32), v); }
  }
#endif
  if (nontemporal) _mm_sfence();
}

static void *worker(void *arg) {
  int t = (int)(long)arg;
  cpu_set_t cpus;
  CPU_ZERO(&cpus);
  CPU_SET(t, &cpus);
  pthread_setaffinity_np(pthread_self(), sizeof cpus, &cpus);
  double shared = 0, private = 0;
  for (int r = 0; r < ROUNDS; r++) {
    read_range(shared_buf, 0, SIZE);  /* both threads read every line */
    pthread_barrier_wait(&barrier);
    double a = now();
    write_half(shared_buf, t);
    shared += now() - a;
    pthread_barrier_wait(&barrier);
    read_range(private_buf, t * SIZE / 2, (size_t)(t + 1) * SIZE / 2);  /* each reads only its own half */
    pthread_barrier_wait(&barrier);
    a = now();
    write_half(private_buf, t);
    private += now() - a;
    pthread_barrier_wait(&barrier);
  }
  per_thread[t][0] = shared / ROUNDS * 1e6;
  per_thread[t][1] = private / ROUNDS * 1e6;
  return 0;
}

int main(int argc, char **argv) {
  nontemporal = argc > 1 && strcmp(argv[1], "nt") == 0;
  shared_buf = aligned_alloc(64, SIZE);
  private_buf = aligned_alloc(64, SIZE);
  memset(shared_buf, 0, SIZE);
  memset(private_buf, 0, SIZE);
  pthread_barrier_init(&barrier, 0, 2);
  pthread_t threads[2];
  for (long t = 0; t < 2; t++) pthread_create(&threads[t], 0, worker, (void *)t);
  for (int t = 0; t < 2; t++) pthread_join(threads[t], 0);
  printf("%s stores, 400 KB per thread: after both read every line %.1f / %.1f us; after each read its own half "
         "%.1f / %.1f us\n", nontemporal ? "non-temporal" : "ordinary", per_thread[0][0], per_thread[1][0],
         per_thread[0][1], per_thread[1][1]);
  return 0;
}
