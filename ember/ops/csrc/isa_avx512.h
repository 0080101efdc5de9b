// AVX-512 (F + BW) primitives: one zmm register a 16-lane vector (isa_portable.h documents each primitive).
// Int8 dot products with AVX512-VNNI: vpdpbusd (64 multiply-adds an instruction); without it vpmaddubsw into
// 16-bit pair sums, widened once a block by vpmaddwd.
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512VNNI__)
#define ISA_NAME "avx512_vnni"
#else
#define ISA_NAME "avx512"
#endif
#define ISA_INT8_VECTOR 1
#define ISA_TILE static inline __attribute__((always_inline))
#define QL_DIRECT_VECS 4
#define QL_PANEL_VECS 3
#define QL_TILE_ROWS 8
#ifndef I8_TILE_ROWS
#define I8_TILE_ROWS 4
#endif
#ifndef I8_TILE_VECS
#define I8_TILE_VECS 3
#endif

typedef __m512 vec;
#define ZERO() _mm512_setzero_ps()
#define LOAD(p) _mm512_loadu_ps(p)
#define STORE(p, v) _mm512_storeu_ps(p, v)
#define BCAST(p) _mm512_set1_ps(*(p))
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define MUL(a, b) _mm512_mul_ps(a, b)

static inline __attribute__((always_inline)) void q4_pair(const uint8_t* bytes, vec d, vec m, vec* lo, vec* hi)
{
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)bytes));
    *lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0x0F))), d, m);
    *hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), d, m);
}

static inline __attribute__((always_inline)) vec q8_row(const int8_t* q)
{
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)q)));
}

typedef __m512i ivec;
typedef __m512i bvec;
typedef __m512i xvec;
typedef __m512i dacc;
#define I32_ZERO() _mm512_setzero_si512()
#define I32_SET1(a) _mm512_set1_epi32(a)
#define I32_TO_F(a) _mm512_cvtepi32_ps(a)
#define B_LOAD(p) _mm512_loadu_si512((const void*)(p))
#define B_LO(w) _mm512_and_si512(w, _mm512_set1_epi8(0x0F))
#define B_HI(w) _mm512_and_si512(_mm512_srli_epi16(w, 4), _mm512_set1_epi8(0x0F))
static inline __attribute__((always_inline)) xvec X_BCAST4(const int8_t* p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}
#define DACC_ZERO() _mm512_setzero_si512()

#if defined(__AVX512VNNI__)
typedef __m512i q8w;
#define DOT_U4(acc, w, x) _mm512_dpbusd_epi32(acc, w, x)
#define DACC_SUM(acc) (acc)
#define Q8_PREP(w) (w)
#define Q8_INIT(sum_x) _mm512_set1_epi32(-128 * (sum_x))
#define DOT_Q8(acc, w, x) _mm512_dpbusd_epi32(acc, w, x)
#else
typedef struct { __m512i abs, q; } q8w;  // |q| and q (the sign trick: |q| * (x signed as q) = q x)
#define DOT_U4(acc, w, x) _mm512_add_epi16(acc, _mm512_maddubs_epi16(w, x))
#define DACC_SUM(acc) _mm512_madd_epi16(acc, _mm512_set1_epi16(1))
static inline __attribute__((always_inline)) q8w Q8_PREP(__m512i w)
{
    const __m512i q = _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80));
    return (q8w){_mm512_abs_epi8(q), q};
}
#define Q8_INIT(sum_x) ((void)(sum_x), _mm512_setzero_si512())
static inline __attribute__((always_inline)) __m512i DOT_Q8(__m512i acc, q8w w, __m512i x)
{
    const __m512i sx = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w.q), _mm512_setzero_si512(), x);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w.abs, sx), _mm512_set1_epi16(1)));
}
#endif

static inline __attribute__((always_inline)) void quantize_block(const float* p, int8_t* q, float* dx, int32_t* sum)
{
    const __m512 lo = _mm512_loadu_ps(p), hi = _mm512_loadu_ps(p + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
    _mm_storeu_si128((__m128i*)q, _mm512_cvtsepi32_epi8(qlo));
    _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtsepi32_epi8(qhi));
    *dx = amax / 127.0f;
    *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
}
