// The paged KV cache as the attention kernels walk it: a sequence's positions live in blocks of block_size
// slots, listed in its row of the block table. Shared by attention.c (short queries) and
// prefill_attention.c (prefill chunks).
#pragma once
#include <stdint.h>

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
