// The float32 vector primitives the attention and pointwise kernels (attention.c, prefill_attention.c,
// pointwise.c, paged_cache.h) are written in, one header per instruction set, chosen here from the compiler's
// macros (the -march a build is compiled for). Each header defines:
//   ATTN_VF                      lanes per vector (a power of two);
//   attn_vf                      the vector type;
//   attn_vzero / attn_vset1 / attn_vload / attn_vstore / attn_vstore_n (the first n lanes)
//   attn_vadd / attn_vmul / attn_vfmadd (a * b + c)
//   attn_vload_f16               ATTN_VF IEEE half floats widened to float32;
//   attn_vstore_f16              ATTN_VF float32 rounded (to nearest even) into half floats;
//   attn_vsum_lanes(v)           lane i = the sum of v[i]'s lanes, for ATTN_VF vectors v[0..ATTN_VF - 1] (a
//                                fixed order per ISA: a result depends on nothing but its own vector);
//   ATTN_VALUE_SETS              accumulator sets (keys split between them: 1 or 2) for attention.c's values;
//   ATTN_VALUE_SLICE             head_dim vectors accumulated at once by attention.c's values (registers);
//   ATTN_TILE_VECS               vectors per row in prefill_attention.c's value tile (with 4 rows).
// A new ISA (NEON, SVE at a fixed length, ...) is a header with these and one #elif below. Without any
// (ATTN_VF undefined) the kernels take their scalar loops.
#pragma once

#if defined(__AVX512F__)
#include "attn_simd_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "attn_simd_avx2.h"
#elif defined(__GNUC__) && !defined(EMBER_SCALAR_KERNELS)
#include "attn_simd_portable.h"
#endif
