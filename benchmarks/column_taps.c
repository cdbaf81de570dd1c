// A 3x3's column taps read with split loads, or with aligned loads and `valignd` (design.md item 58). On a plane of
// whole-vector rows (a 14x14 map's 16-position pitch) tap (c, r, s) starts s positions past a line: the kernels
// load it split across two lines. The alternative: U + 1 aligned loads per quad and U `valignd` by s (one code
// path per s; a kernel would store each row's quads grouped by s). The quads loop of vnni_loads.c otherwise (two
// rows, 26 stored quads, 7 vectors, 256 rows in tasks of 16, s uniform in 0..2); best of 15 passes. Modes: 0 split
// loads, 1 aligned loads + valignd (the same sums: equal checksums), 2 every tap aligned (s ignored: the bound).
//
//   gcc -O2 -march=native benchmarks/column_taps.c -o /tmp/column_taps
//   for c in 16 64 256; do for m in 0 1 2; do /tmp/column_taps $c $m; done; done
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#define U 7
#define ROWS 256
#define QUADS 26
#define TASK 16
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  if(argc!=3){fprintf(stderr,"usage: %s CHANNEL_QUADS MODE(0|1|2)\n",argv[0]);return 2;}
  int c=atoi(argv[1]), mode=atoi(argv[2]), sorted=1;
  size_t plane=(size_t)U*64+64; size_t tile=(size_t)c*plane;
  uint8_t*in=aligned_alloc(64,tile+128);
  uint16_t*off=malloc(2*ROWS*QUADS); uint8_t*sh=malloc(ROWS*QUADS); int32_t*w=malloc(4*ROWS*QUADS);
  int32_t*out=aligned_alloc(64,(size_t)ROWS*U*64);
  srand(1); for(size_t i=0;i<tile+128;i++)in[i]=(uint8_t)(i*7);
  for(int r=0;r<ROWS;r++){ for(int j=0;j<QUADS;j++){ off[r*QUADS+j]=rand()%c; sh[r*QUADS+j]=rand()%3; w[r*QUADS+j]=rand(); }
    if(sorted){ // quads grouped by s within the row (a kernel would store them so)
      for(int a=0;a<QUADS;a++)for(int b=a+1;b<QUADS;b++) if(sh[r*QUADS+b]<sh[r*QUADS+a]){uint8_t t=sh[r*QUADS+a];sh[r*QUADS+a]=sh[r*QUADS+b];sh[r*QUADS+b]=t;}
    }}
  double best=1e9;
  for(int rep=0;rep<15;rep++){ double t=now();
    for(int task=0;task<ROWS;task+=TASK) for(int r=task;r<task+TASK;r+=2){
      __m512i a[2][U];
#pragma GCC unroll 2
      for(int k=0;k<2;k++)
#pragma GCC unroll 16
        for(int u=0;u<U;u++)a[k][u]=_mm512_setzero_si512();
      for(int j=0;j<QUADS;j++){
#pragma GCC unroll 2
        for(int k=0;k<2;k++){
          int q=(r+k)*QUADS+j; int s=sh[q];
          const uint8_t*p=in+(size_t)off[q]*plane; __m512i wb=_mm512_set1_epi32(w[q]);
          if(mode==0){ // split loads: the tap's vectors start s positions (4s bytes) past a line
#pragma GCC unroll 16
            for(int u=0;u<U;u++)a[k][u]=_mm512_dpbusd_epi32(a[k][u],_mm512_loadu_si512(p+4*s+64*u),wb);
          } else if(mode==1){ // aligned loads + valignd by s (three code paths, one per s)
            if(s==0){
#pragma GCC unroll 16
              for(int u=0;u<U;u++)a[k][u]=_mm512_dpbusd_epi32(a[k][u],_mm512_load_si512(p+64*u),wb);
            } else if(s==1){
              __m512i lo=_mm512_load_si512(p);
#pragma GCC unroll 16
              for(int u=0;u<U;u++){__m512i hi=_mm512_load_si512(p+64*u+64);a[k][u]=_mm512_dpbusd_epi32(a[k][u],_mm512_alignr_epi32(hi,lo,1),wb);lo=hi;}
            } else {
              __m512i lo=_mm512_load_si512(p);
#pragma GCC unroll 16
              for(int u=0;u<U;u++){__m512i hi=_mm512_load_si512(p+64*u+64);a[k][u]=_mm512_dpbusd_epi32(a[k][u],_mm512_alignr_epi32(hi,lo,2),wb);lo=hi;}
            }
          } else { // all aligned (s ignored): the bound
#pragma GCC unroll 16
            for(int u=0;u<U;u++)a[k][u]=_mm512_dpbusd_epi32(a[k][u],_mm512_load_si512(p+64*u),wb);
          }
        }
      }
#pragma GCC unroll 2
      for(int k=0;k<2;k++)
#pragma GCC unroll 16
        for(int u=0;u<U;u++)_mm512_store_si512(out+(((size_t)r+k)*U+u)*16,a[k][u]);
    }
    t=now()-t; if(t<best)best=t;}
  long sum=0; for(size_t i=0;i<(size_t)ROWS*U*16;i++)sum+=out[i];
  printf("quads %4d tile %3zu KB mode %d (%s) sorted %d: %.3f ns per vpdpbusd (%ld)\n",c,tile/1024,mode,mode==0?"split loads":mode==1?"aligned+valignd":"aligned, s ignored",sorted,best*1e9/((double)ROWS*QUADS*U),sum);
}
