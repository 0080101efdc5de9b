// attn_simd.h's primitives on AVX-512F: 16 float32 lanes.
#pragma once
#include <immintrin.h>
#include <stdint.h>

#define ATTN_VF 16
#define ATTN_VALUE_SETS 2
#define ATTN_VALUE_SLICE 16
#define ATTN_SCORE_ROWS 8
#define ATTN_SCORE_VECS 1
#define ATTN_TILE_ROWS 4
#define ATTN_TILE_VECS 4
typedef __m512 attn_vf;

static inline attn_vf attn_vzero(void) { return _mm512_setzero_ps(); }
static inline attn_vf attn_vset1(float x) { return _mm512_set1_ps(x); }
static inline attn_vf attn_vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void attn_vstore(float* p, attn_vf v) { _mm512_storeu_ps(p, v); }
static inline void attn_vstore_n(float* p, attn_vf v, int n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), v); }
static inline attn_vf attn_vadd(attn_vf a, attn_vf b) { return _mm512_add_ps(a, b); }
static inline attn_vf attn_vmul(attn_vf a, attn_vf b) { return _mm512_mul_ps(a, b); }
static inline attn_vf attn_vfmadd(attn_vf a, attn_vf b, attn_vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline attn_vf attn_vload_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline void attn_vstore_f16(uint16_t* p, attn_vf v)
{
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// A transpose-and-add tree: 45 shuffles and adds for 16 sums, against ~8 each for a horizontal sum per vector.
static inline attn_vf attn_vsum_lanes(const attn_vf v[16])
{
    __m512 w[8], u[4];
    for (int i = 0; i < 8; i++)  // lane k: (a0+a2, b0+b2, a1+a3, b1+b3) of v[2i] = a, v[2i+1] = b
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  // lane k: the lane's partial sums of v[4i .. 4i+3]
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44), _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}
