// Whether an int8 conv could write its consumer's quads itself instead of a relay doing it after (design.md item 58).
// Per 4 output channels x 16 positions (64 outputs; sums, outputs in L1, best of 300 passes over 4096 vectors):
//   0  the write-back as the kernels run it: requantise each row's 16 sums and store 16 bytes per row (NCHW)
//   1  requantise the 4 rows, interleave their bytes by unpacks and inserts, one 64-byte store (the quad layout)
//   2  the same interleave by three inserts and one vpermb (AVX-512 VBMI)
//   3  the relay of the result: 4 rows of 16 bytes loaded, interleaved, stored (ops/quad_relay.py's shuffle)
// Modes 0-2 write the same bytes (equal sums).
//
//   gcc -O2 -march=native benchmarks/quad_writeback.c -o /tmp/quad_writeback && for m in 0 1 2 3; do /tmp/quad_writeback $m; done
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#define NV 4096   // vectors of 16 positions per row
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static inline __m128i req(__m512i acc, __m512 s, __m512 b){
  __m512 y=_mm512_max_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(acc),s,b),_mm512_setzero_ps());
  return _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(y));
}
int main(int argc,char**argv){
  if(argc!=2){fprintf(stderr,"usage: %s MODE(0-3)\n",argv[0]);return 2;}
  int mode=atoi(argv[1]);
  int32_t*acc=aligned_alloc(64,4*NV*64); uint8_t*out=aligned_alloc(64,4*NV*16); uint8_t*q=aligned_alloc(64,4*NV*16);
  for(int i=0;i<4*NV*16;i++){acc[i]=rand()%20000-10000; out[i]=rand();}
  __m512 S=_mm512_set1_ps(0.01f),B=_mm512_set1_ps(3.f);
  double best=1e9;
  for(int rep=0;rep<300;rep++){ double t=now();
    if(mode==0){ for(int v=0;v<NV;v++) for(int k=0;k<4;k++) _mm512_mask_cvtusepi32_storeu_epi8(out+k*NV*16+v*16,0xffff,_mm512_cvtps_epi32(_mm512_max_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(acc+(k*NV+v)*16)),S,B),_mm512_setzero_ps()))); }
    else if(mode==1){ for(int v=0;v<NV;v++){ __m128i r0=req(_mm512_load_si512(acc+(0*NV+v)*16),S,B),r1=req(_mm512_load_si512(acc+(1*NV+v)*16),S,B),r2=req(_mm512_load_si512(acc+(2*NV+v)*16),S,B),r3=req(_mm512_load_si512(acc+(3*NV+v)*16),S,B);
        __m128i a=_mm_unpacklo_epi8(r0,r1),b=_mm_unpackhi_epi8(r0,r1),c=_mm_unpacklo_epi8(r2,r3),d=_mm_unpackhi_epi8(r2,r3);
        __m128i e0=_mm_unpacklo_epi16(a,c),e1=_mm_unpackhi_epi16(a,c),e2=_mm_unpacklo_epi16(b,d),e3=_mm_unpackhi_epi16(b,d);
        __m512i z=_mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(e0),e1,1),e2,2),e3,3);
        _mm512_store_si512(q+v*64,z);} }
    else if(mode==2){ // mode 1 with vpermt2b/vpermb interleave: 4 xmm -> zmm by two inserts + one vpermb
        const __m512i idx=_mm512_set_epi8(63,47,31,15,62,46,30,14,61,45,29,13,60,44,28,12,59,43,27,11,58,42,26,10,57,41,25,9,56,40,24,8,55,39,23,7,54,38,22,6,53,37,21,5,52,36,20,4,51,35,19,3,50,34,18,2,49,33,17,1,48,32,16,0);
        for(int v=0;v<NV;v++){ __m128i r0=req(_mm512_load_si512(acc+(0*NV+v)*16),S,B),r1=req(_mm512_load_si512(acc+(1*NV+v)*16),S,B),r2=req(_mm512_load_si512(acc+(2*NV+v)*16),S,B),r3=req(_mm512_load_si512(acc+(3*NV+v)*16),S,B);
        __m512i z=_mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(r0),r1,1),r2,2),r3,3);
        _mm512_store_si512(q+v*64,_mm512_permutexvar_epi8(idx,z));} }
    else { // the relay: NCHW bytes (4 channel rows) -> quads, as quad_relay does
        for(int v=0;v<NV;v++){ __m128i r0=_mm_load_si128((const __m128i*)(out+0*NV*16+v*16)),r1=_mm_load_si128((const __m128i*)(out+1*NV*16+v*16)),r2=_mm_load_si128((const __m128i*)(out+2*NV*16+v*16)),r3=_mm_load_si128((const __m128i*)(out+3*NV*16+v*16));
        __m128i a=_mm_unpacklo_epi8(r0,r1),b=_mm_unpackhi_epi8(r0,r1),c=_mm_unpacklo_epi8(r2,r3),d=_mm_unpackhi_epi8(r2,r3);
        __m128i e0=_mm_unpacklo_epi16(a,c),e1=_mm_unpackhi_epi16(a,c),e2=_mm_unpacklo_epi16(b,d),e3=_mm_unpackhi_epi16(b,d);
        _mm512_store_si512(q+v*64,_mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(e0),e1,1),e2,2),e3,3));} }
    t=now()-t; if(t<best)best=t; }
  long s=0; for(int i=0;i<4*NV*16;i++) s+= (mode==0?out[i]:q[i]);
  printf("mode %d (%s): %.3f ns per 64 outputs (sum %ld)\n",mode,mode==0?"write-back to NCHW rows":mode==1?"write-back to quads, unpacks":mode==2?"write-back to quads, vpermb":"relay NCHW -> quads",best*1e9/NV,s);
}
