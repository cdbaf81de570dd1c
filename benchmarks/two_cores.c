/* Are the VM's two vCPUs two cores or one core's two SMT threads? A chain-free vpdpbusd loop timed on one
thread, then on two pinned to CPUs 0 and 1: per-thread throughput that halves means one core shared.

    cc -O2 -mavx512f -mavx512vnni -pthread -o two_cores benchmarks/two_cores.c && ./two_cores && ./two_cores 2

On the 2-vCPU Zen 4 VM (2026-12-07): 1.46 per ns alone, 1.54 and 1.42 side by side: two cores. */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static volatile int sink;
static void* work(void* arg){
  int cpu=(int)(long)arg; cpu_set_t s; CPU_ZERO(&s); CPU_SET(cpu,&s); pthread_setaffinity_np(pthread_self(),sizeof s,&s);
  __m512i a[8]; for(int i=0;i<8;i++) a[i]=_mm512_set1_epi32(i);
  __m512i b=_mm512_set1_epi32(3), c=_mm512_set1_epi32(5);
  double t=now();
  for(long n=0;n<50000000;n++){ for(int i=0;i<8;i++) a[i]=_mm512_dpbusd_epi32(a[i],b,c); }
  double dt=now()-t; int r=0; for(int i=0;i<8;i++) r+=_mm512_reduce_add_epi32(a[i]); sink=r;
  printf("cpu %d: %.3f s, %.2f vpdpbusd/ns\n", cpu, dt, 8*50000000/dt/1e9); return 0;
}
int main(int argc,char**argv){
  pthread_t t[2]; int n=argc>1?2:1;
  for(int i=0;i<n;i++) pthread_create(&t[i],0,work,(void*)(long)i);
  for(int i=0;i<n;i++) pthread_join(t[i],0);
}
