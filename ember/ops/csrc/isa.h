// The one place an instruction set is chosen, from the compiler's macros (-march=...): each header defines the
// same primitives (isa_portable.h documents them) and ISA_NAME. A new ISA (NEON, SVE, ...) is a new header with
// those primitives and one more #elif here; the kernels (qlinear.c, qlinear_i8.c) are written against them.
#pragma once
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include "isa_avx512.h"  // "avx512_vnni" with __AVX512VNNI__, else "avx512"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "isa_avx2.h"  // "avx2_vnni" with __AVXVNNI__, else "avx2"
#else
#include "isa_portable.h"  // "portable"
#endif
