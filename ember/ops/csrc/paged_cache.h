// The paged KV cache as the attention kernels walk it: a sequence's positions live in blocks of block_size
// slots, listed in its row of the block table. Shared by attention.c (short queries),
// prefill_attention.c (prefill chunks) and decode_layer.c. Its elements are float32, or IEEE half floats
// where kv_f16 is set (half the bytes a decode step reads), always computed with as float32.
#pragma once
#include <stdint.h>

#include "attn_simd.h"

#if defined(ATTN_VF)
// ATTN_VF elements from element i of a cache, as float32.
static inline attn_vf kv_loadv(const void* cache, int64_t i, const int kv_f16)
{
    return kv_f16 ? attn_vload_f16((const uint16_t*)cache + i) : attn_vload((const float*)cache + i);
}
#endif

// Element i of a cache as float32.
static inline float kv_load(const void* cache, int64_t i, const int kv_f16)
{
    return kv_f16 ? (float)((const _Float16*)cache)[i] : ((const float*)cache)[i];
}

// n float32 values into a cache from element i (rounded to nearest even where half).
static inline void kv_store(void* cache, int64_t i, const float* x, int64_t n, const int kv_f16)
{
    if (kv_f16) {
        int64_t e = 0;
#if defined(ATTN_VF)
        for (; e + ATTN_VF <= n; e += ATTN_VF) attn_vstore_f16((uint16_t*)cache + i + e, attn_vload(x + e));
#endif
        for (; e < n; e++) ((_Float16*)cache)[i + e] = (_Float16)x[e];
    } else
        for (int64_t e = 0; e < n; e++) ((float*)cache)[i + e] = x[e];
}

// Positions p.. of a sequence that lie in one cache block (at most up to end): their count, and p's flat slot.
static inline int64_t block_run(const int64_t* blocks, int64_t block_size, int64_t p, int64_t end, int64_t* slot)
{
    const int64_t offset = p % block_size;
    *slot = blocks[p / block_size] * block_size + offset;
    return block_size - offset < end - p ? block_size - offset : end - p;
}

// The first key a query at position pos sees: 0, or with a sliding window (window > 0) pos - window + 1.
static inline int64_t first_key(int64_t pos, int64_t window)
{
    return window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
}
