// AVX2 + FMA + F16C primitives (x86-64-v3): a 16-lane vector is a pair of ymm registers, columns 0-7 and
// 8-15 (isa_portable.h documents each primitive). Int8 dot products as llama.cpp's AVX2 path: vpmaddubsw
// (u8 x s8 pairs to 16 bits) into 16-bit sums, widened once a block by vpmaddwd; 8-bit weights with the sign
// trick (|q| times x signed as q: no 16-bit saturation). With AVX-VNNI (__AVXVNNI__), 256-bit vpdpbusd.
// Half the registers of AVX-512 (16) and twice as many per vector: smaller tiles.
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVXVNNI__)
#define ISA_NAME "avx2_vnni"
#else
#define ISA_NAME "avx2"
#endif
#define ISA_INT8_VECTOR 1
#define ISA_TILE static inline __attribute__((always_inline))
#define AI static inline __attribute__((always_inline))
#ifndef QL_DIRECT_VECS
#define QL_DIRECT_VECS 2
#endif
#ifndef QL_PANEL_VECS
#define QL_PANEL_VECS 1
#endif
#ifndef QL_TILE_ROWS
#define QL_TILE_ROWS 6
#endif
#ifndef I8_TILE_ROWS
#define I8_TILE_ROWS 4
#endif
#ifndef I8_TILE_VECS
#define I8_TILE_VECS 1
#endif

typedef struct { __m256 a, b; } vec;
AI vec ZERO(void) { return (vec){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
AI vec LOAD(const float* p) { return (vec){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
AI void STORE(float* p, vec v) { _mm256_storeu_ps(p, v.a), _mm256_storeu_ps(p + 8, v.b); }
AI vec BCAST(const float* p) { const __m256 s = _mm256_broadcast_ss(p); return (vec){s, s}; }
AI vec FMA(vec a, vec b, vec c) { return (vec){_mm256_fmadd_ps(a.a, b.a, c.a), _mm256_fmadd_ps(a.b, b.b, c.b)}; }
AI vec MUL(vec a, vec b) { return (vec){_mm256_mul_ps(a.a, b.a), _mm256_mul_ps(a.b, b.b)}; }

AI void q4_pair(const uint8_t* bytes, vec d, vec m, vec* lo, vec* hi)
{
    const __m128i raw = _mm_loadu_si128((const __m128i*)bytes);
    const __m256i qa = _mm256_cvtepu8_epi32(raw), qb = _mm256_cvtepu8_epi32(_mm_srli_si128(raw, 8));
    const __m256i nibble = _mm256_set1_epi32(0x0F);
    lo->a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(qa, nibble)), d.a, m.a);
    lo->b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(qb, nibble)), d.b, m.b);
    hi->a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(qa, 4)), d.a, m.a);
    hi->b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(qb, 4)), d.b, m.b);
}

AI vec q8_row(const int8_t* q)
{
    return (vec){_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)q))),
                 _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + 8))))};
}

typedef struct { __m256i a, b; } ivec;
typedef ivec bvec;
typedef ivec dacc;
typedef __m256i xvec;
AI ivec I32_ZERO(void) { return (ivec){_mm256_setzero_si256(), _mm256_setzero_si256()}; }
AI ivec I32_SET1(int32_t v) { const __m256i s = _mm256_set1_epi32(v); return (ivec){s, s}; }
AI vec I32_TO_F(ivec v) { return (vec){_mm256_cvtepi32_ps(v.a), _mm256_cvtepi32_ps(v.b)}; }
AI bvec B_LOAD(const uint8_t* p)
{
    return (bvec){_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)(p + 32))};
}
AI bvec B_LO(bvec w)
{
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    return (bvec){_mm256_and_si256(w.a, nibble), _mm256_and_si256(w.b, nibble)};
}
AI bvec B_HI(bvec w)
{
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    return (bvec){_mm256_and_si256(_mm256_srli_epi16(w.a, 4), nibble), _mm256_and_si256(_mm256_srli_epi16(w.b, 4), nibble)};
}
AI xvec X_BCAST4(const int8_t* p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}
#define DACC_ZERO() I32_ZERO()

#if defined(__AVXVNNI__)
typedef bvec q8w;
AI dacc DOT_U4(dacc acc, bvec w, xvec x)
{
    return (dacc){_mm256_dpbusd_avx_epi32(acc.a, w.a, x), _mm256_dpbusd_avx_epi32(acc.b, w.b, x)};
}
#define DACC_SUM(acc) (acc)
#define Q8_PREP(w) (w)
#define Q8_INIT(sum_x) I32_SET1(-128 * (sum_x))
#define DOT_Q8(acc, w, x) DOT_U4(acc, w, x)
#else
typedef struct { __m256i abs_a, abs_b, q_a, q_b; } q8w;  // |q| and q (the sign trick: |q| * (x signed as q) = q x)
AI dacc DOT_U4(dacc acc, bvec w, xvec x)
{
    return (dacc){_mm256_add_epi16(acc.a, _mm256_maddubs_epi16(w.a, x)),
                  _mm256_add_epi16(acc.b, _mm256_maddubs_epi16(w.b, x))};
}
AI ivec DACC_SUM(dacc acc)
{
    const __m256i ones = _mm256_set1_epi16(1);
    return (ivec){_mm256_madd_epi16(acc.a, ones), _mm256_madd_epi16(acc.b, ones)};
}
AI q8w Q8_PREP(bvec w)
{
    const __m256i offset = _mm256_set1_epi8((char)0x80);
    const __m256i qa = _mm256_xor_si256(w.a, offset), qb = _mm256_xor_si256(w.b, offset);
    return (q8w){_mm256_abs_epi8(qa), _mm256_abs_epi8(qb), qa, qb};
}
#define Q8_INIT(sum_x) ((void)(sum_x), I32_ZERO())
AI ivec DOT_Q8(ivec acc, q8w w, xvec x)
{
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i pa = _mm256_maddubs_epi16(w.abs_a, _mm256_sign_epi8(x, w.q_a));
    const __m256i pb = _mm256_maddubs_epi16(w.abs_b, _mm256_sign_epi8(x, w.q_b));
    return (ivec){_mm256_add_epi32(acc.a, _mm256_madd_epi16(pa, ones)), _mm256_add_epi32(acc.b, _mm256_madd_epi16(pb, ones))};
}
#endif

AI void quantize_block(const float* p, int8_t* q, float* dx, int32_t* sum)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], amax8 = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(p + 8 * i), amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, v[i]));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    __m256i qi[4];
    for (int i = 0; i < 4; i++) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // to nearest even
    // to int8 saturated (as vpmovsdb): packs interleave 128-bit lanes, the permutation restores the order
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
    _mm256_storeu_si256((__m256i*)q, _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    *dx = amax / 127.0f, *sum = _mm_cvtsi128_si32(s4);
}
#undef AI
