// The paged KV cache as the attention kernels walk it: a sequence's positions live in blocks of block_size
// slots, listed in its row of the block table. Shared by attention.c (short queries),
// prefill_attention.c (prefill chunks) and decode_layer.c. Its elements are float32, or IEEE half floats
// where kv_f16 is set (half the bytes a decode step reads), always computed with as float32.
#pragma once
#include <stdint.h>

#if defined(__AVX512F__)
#include <immintrin.h>

// 16 elements from element i of a cache, as float32.
static inline __m512 kv_load16(const void* cache, int64_t i, const int kv_f16)
{
    return kv_f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)cache + i)))
                  : _mm512_loadu_ps((const float*)cache + i);
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
    if (kv_f16)
        for (int64_t e = 0; e < n; e++) ((_Float16*)cache)[i + e] = (_Float16)x[e];
    else
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
