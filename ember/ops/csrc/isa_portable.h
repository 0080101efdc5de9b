// Portable C primitives (and the reference for what every isa_*.h defines); the compiler vectorises what it can.
//
// Float, for qlinear.c and qlinear_i8.c's scales: `vec`, 16 float32 lanes (one per output column of a group):
//   ZERO() LOAD(p) STORE(p, v) BCAST(p) (every lane *p) FMA(a, b, c) (a * b + c, fused) MUL(a, b)
//   q4_pair(bytes, d, m, &lo, &hi): 16 bytes (column c's inputs j in the low nibble, j + 16 in the high)
//       dequantized to d * q + m; q8_row(q): 16 int8 as floats.
//   QL_DIRECT_VECS, QL_PANEL_VECS, QL_TILE_ROWS: qlinear.c's register tiles (bounded by the register file).
// Int8 dot products, for qlinear_i8.c (each of 16 int32 lanes the dot product of 4 consecutive bytes):
//   ivec: 16 int32 lanes; I32_ZERO() I32_SET1(v) I32_TO_F(i) (to a vec);
//   bvec: 64 weight bytes, 4 for each lane; B_LOAD(p), B_LO(w) / B_HI(w) (low / high nibbles of each byte);
//   xvec: 4 int8 activations (given to every lane): X_BCAST4(p);
//   dacc: a block's accumulator for 4-bit weights; DACC_ZERO(), DOT_U4(acc, w, x) (acc + w . x, w in 0..15:
//       at most 8 calls between DACC_ZERO and DACC_SUM: 16 products a 16-bit pair, |sum| <= 30480),
//       DACC_SUM(acc) its ivec;
//   q8w: a 64-byte row of offset 8-bit weights (q + 128) prepared by Q8_PREP(w);
//       Q8_INIT(sum_x) the accumulator a block starts from, DOT_Q8(acc, w, x) (so that the block's result is
//       sum(q x) exactly: with vpdpbusd, Q8_INIT = -128 * sum(x) and w used unsigned);
//   quantize_block(p, q, &dx, &sum): 32 floats to int8, q = round-to-nearest-even(p * 127 / max|p|) (0 for
//       an all-zero block), dx = max|p| / 127, sum = sum(q): bit-identical on every ISA.
//   I8_TILE_ROWS, I8_TILE_VECS: qlinear_i8.c's tile; ISA_INT8_VECTOR: 1 where the int8 kernels are vectorised.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#define ISA_NAME "portable"
#define ISA_INT8_VECTOR 0
#define ISA_TILE static inline  // (forced inlining of every tile shape takes GCC ~15 s here)
#define QL_DIRECT_VECS 4
#define QL_PANEL_VECS 3
#define QL_TILE_ROWS 8
#define I8_TILE_ROWS 4
#define I8_TILE_VECS 3

typedef struct { float v[16]; } vec;
static inline vec ZERO(void) { vec r = {{0}}; return r; }
static inline vec LOAD(const float* p) { vec r; for (int i = 0; i < 16; i++) r.v[i] = p[i]; return r; }
static inline void STORE(float* p, vec a) { for (int i = 0; i < 16; i++) p[i] = a.v[i]; }
static inline vec BCAST(const float* p) { vec r; for (int i = 0; i < 16; i++) r.v[i] = *p; return r; }
static inline vec FMA(vec a, vec b, vec c)
{
    for (int i = 0; i < 16; i++) c.v[i] = __builtin_fmaf(a.v[i], b.v[i], c.v[i]);
    return c;
}
static inline vec MUL(vec a, vec b) { for (int i = 0; i < 16; i++) a.v[i] *= b.v[i]; return a; }

static inline void q4_pair(const uint8_t* bytes, vec d, vec m, vec* lo, vec* hi)
{
    for (int i = 0; i < 16; i++) {
        lo->v[i] = __builtin_fmaf((float)(bytes[i] & 0x0F), d.v[i], m.v[i]);
        hi->v[i] = __builtin_fmaf((float)(bytes[i] >> 4), d.v[i], m.v[i]);
    }
}

static inline vec q8_row(const int8_t* q) { vec r; for (int i = 0; i < 16; i++) r.v[i] = q[i]; return r; }

typedef struct { int32_t v[16]; } ivec;
typedef struct { uint8_t v[64]; } bvec;
typedef struct { int8_t v[4]; } xvec;
typedef ivec dacc;
typedef bvec q8w;

static inline ivec I32_ZERO(void) { ivec r = {{0}}; return r; }
static inline ivec I32_SET1(int32_t a) { ivec r; for (int i = 0; i < 16; i++) r.v[i] = a; return r; }
static inline vec I32_TO_F(ivec a) { vec r; for (int i = 0; i < 16; i++) r.v[i] = (float)a.v[i]; return r; }
static inline bvec B_LOAD(const uint8_t* p) { bvec r; memcpy(r.v, p, 64); return r; }
static inline bvec B_LO(bvec w) { for (int i = 0; i < 64; i++) w.v[i] &= 0x0F; return w; }
static inline bvec B_HI(bvec w) { for (int i = 0; i < 64; i++) w.v[i] >>= 4; return w; }
static inline xvec X_BCAST4(const int8_t* p) { xvec r; memcpy(r.v, p, 4); return r; }
static inline dacc DACC_ZERO(void) { return I32_ZERO(); }
static inline dacc DOT_U4(dacc acc, bvec w, xvec x)
{
    for (int c = 0; c < 16; c++)
        for (int i = 0; i < 4; i++) acc.v[c] += w.v[4 * c + i] * x.v[i];
    return acc;
}
static inline ivec DACC_SUM(dacc acc) { return acc; }
static inline q8w Q8_PREP(bvec w) { for (int i = 0; i < 64; i++) w.v[i] ^= 0x80; return w; }  // q as int8 bytes
static inline ivec Q8_INIT(int32_t sum_x) { (void)sum_x; return I32_ZERO(); }
static inline ivec DOT_Q8(ivec acc, q8w w, xvec x)
{
    for (int c = 0; c < 16; c++)
        for (int i = 0; i < 4; i++) acc.v[c] += (int8_t)w.v[4 * c + i] * x.v[i];
    return acc;
}

static inline void quantize_block(const float* p, int8_t* q, float* dx, int32_t* sum)
{
    float amax = 0.0f;
    for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(p[i]));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t s = 0;
    for (int i = 0; i < 32; i++) {
        long v = lrintf(p[i] * inv);  // the current rounding mode: to nearest even, as cvtps2dq
        v = v < -128 ? -128 : v > 127 ? 127 : v;  // saturated, as vpmovsdb / packs
        q[i] = (int8_t)v, s += (int32_t)v;
    }
    *dx = amax / 127.0f, *sum = s;
}
