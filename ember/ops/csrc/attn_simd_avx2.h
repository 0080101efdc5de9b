// attn_simd.h's primitives on AVX2 + FMA + F16C (x86-64-v3, Haswell and later): 8 float32 lanes.
#pragma once
#include <immintrin.h>
#include <stdint.h>

#define ATTN_VF 8
#define ATTN_VALUE_SETS 1  // 8 vectors of a 64-wide head are 8 independent FMA chains already
#define ATTN_VALUE_SLICE 8  // 16 registers: 8 accumulators, the weight, the loads
#define ATTN_SCORE_ROWS 6
#define ATTN_SCORE_VECS 2  // 6 rows x 16 keys: 12 accumulators, 2 key vectors, the query
#define ATTN_TILE_ROWS 6  // 6 rows x 2 vectors: 12 accumulators, 2 values, the weight
#define ATTN_TILE_VECS 2
typedef __m256 attn_vf;

static inline attn_vf attn_vzero(void) { return _mm256_setzero_ps(); }
static inline attn_vf attn_vset1(float x) { return _mm256_set1_ps(x); }
static inline attn_vf attn_vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void attn_vstore(float* p, attn_vf v) { _mm256_storeu_ps(p, v); }
static inline void attn_vstore_n(float* p, attn_vf v, int n)
{
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_maskstore_ps(p, mask, v);
}
static inline attn_vf attn_vadd(attn_vf a, attn_vf b) { return _mm256_add_ps(a, b); }
static inline attn_vf attn_vmul(attn_vf a, attn_vf b) { return _mm256_mul_ps(a, b); }
static inline attn_vf attn_vfmadd(attn_vf a, attn_vf b, attn_vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline attn_vf attn_vload_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline void attn_vstore_f16(uint16_t* p, attn_vf v)
{
    _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// A transpose-and-add tree (8 sums in 21 shuffles and adds).
static inline attn_vf attn_vsum_lanes(const attn_vf v[8])
{
    __m256 w[4], u[2];
    for (int i = 0; i < 4; i++)  // per 128-bit half: (a0+a2, b0+b2, a1+a3, b1+b3) of v[2i] = a, v[2i+1] = b
        w[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 2; i++)  // per half: that half's sums of v[4i .. 4i+3]
        u[i] = _mm256_add_ps(_mm256_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44), _mm256_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
    return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
}
