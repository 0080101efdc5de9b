// attn_simd.h's primitives in GCC / Clang generic vectors (4 float32 lanes): SSE2 on baseline x86-64, NEON on
// AArch64, scalar code elsewhere. a * b + c contracts to a fused multiply-add where the target has one.
#pragma once
#include <stdint.h>
#include <string.h>

#define ATTN_VF 4
#define ATTN_VALUE_SETS 2
#define ATTN_VALUE_SLICE 4
#define ATTN_SCORE_ROWS 6
#define ATTN_SCORE_VECS 2
#define ATTN_TILE_ROWS 6
#define ATTN_TILE_VECS 2
typedef float attn_vf __attribute__((vector_size(16)));

static inline attn_vf attn_vzero(void) { return (attn_vf){0.0f, 0.0f, 0.0f, 0.0f}; }
static inline attn_vf attn_vset1(float x) { return (attn_vf){x, x, x, x}; }
static inline attn_vf attn_vload(const float* p)
{
    attn_vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void attn_vstore(float* p, attn_vf v) { memcpy(p, &v, sizeof v); }
static inline void attn_vstore_n(float* p, attn_vf v, int n)
{
    for (int i = 0; i < n; i++) p[i] = v[i];
}
static inline attn_vf attn_vadd(attn_vf a, attn_vf b) { return a + b; }
static inline attn_vf attn_vmul(attn_vf a, attn_vf b) { return a * b; }
static inline attn_vf attn_vfmadd(attn_vf a, attn_vf b, attn_vf c) { return a * b + c; }
// Half floats widened in integer and float lanes (no F16C on baseline x86-64, where a _Float16 conversion is a
// libgcc call per element): exponent and mantissa shifted into place, then scaled by 2^112 (exact for normal
// and subnormal halves), infinities and NaNs given float32's all-ones exponent.
static inline attn_vf attn_vload_f16(const uint16_t* p)
{
    typedef uint32_t attn_vu __attribute__((vector_size(16)));
    const attn_vu h = {p[0], p[1], p[2], p[3]}, em = h & 0x7fff;
    attn_vf f;
    const attn_vu shifted = em << 13;
    memcpy(&f, &shifted, sizeof f);
    f = f * attn_vset1(0x1p112f);
    attn_vu bits;
    memcpy(&bits, &f, sizeof bits);
    const attn_vu special = (attn_vu)(em >= 0x7c00);  // all ones where infinite or NaN
    bits = (bits & ~special) | ((shifted | 0x7f800000u) & special);
    bits |= (h & 0x8000) << 16;
    memcpy(&f, &bits, sizeof f);
    return f;
}
static inline void attn_vstore_f16(uint16_t* p, attn_vf v)
{
    _Float16* h = (_Float16*)p;
    for (int i = 0; i < 4; i++) h[i] = (_Float16)v[i];
}

static inline attn_vf attn_vsum_lanes(const attn_vf v[4])
{
    attn_vf s;
    for (int i = 0; i < 4; i++) s[i] = (v[i][0] + v[i][2]) + (v[i][1] + v[i][3]);
    return s;
}
