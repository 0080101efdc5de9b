// Paged attention for short queries (decode, speculative verification) reading the KV blocks in place:
// no gather of the context into a padded copy, no mask tensor. float32 (the cache float32 or half, see
// paged_cache.h); two passes per query and head
// (scores, then softmax-weighted values), the query heads that share a KV head together so each key and
// value row is read once. Sequences are independent: a result does not depend on the rest of the batch.
#include <stdint.h>
#include <stdlib.h>

#include "paged_cache.h"  // attn_simd.h's vectors, kv_loadv
#include "vector_math.h"

#define MAX_GROUP 8  // query heads per KV head handled at once

static inline float dot(const float* a, const float* b, int64_t n)
{
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t e = 0; e < n; e++) sum += a[e] * b[e];
    return sum;
}

static inline void axpy(float w, const float* x, float* y, int64_t n)  // y += w x
{
#pragma omp simd
    for (int64_t e = 0; e < n; e++) y[e] += w * x[e];
}

// Each head's scores (hn rows of n) turned into softmax numerators in place; inv[h] = 1 / their sum, or where
// stats is given (a chunk of a split context) inv[h] = 1 and stats[2h], stats[2h + 1] = the max and the sum.
static void softmax_numerators(float* scores, int64_t hn, int64_t n, float* inv, float* stats)
{
    for (int64_t h = 0; h < hn; h++) {
        float* sh = scores + h * n;
        float mx = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j < n; j++) mx = sh[j] > mx ? sh[j] : mx;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) sh[j] = expf(sh[j] - mx);
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; j++) sum += sh[j];
        if (stats) {
            stats[2 * h] = mx, stats[2 * h + 1] = sum;
            inv[h] = 1.0f;  // the chunk's unnormalised weighted values (times 1: exact)
        } else
            inv[h] = 1.0f / sum;
    }
}

#if defined(ATTN_VF)
#define VF ATTN_VF

// One query's hn heads (h0.. of KV head g's group) over keys first..pos, head_dim D a multiple of VF (at most
// 256), in attn_simd.h's vectors. always_inline so that the callers' constant D unrolls the chunk loops into
// registers. Scores: VF keys a time, one accumulator each (no horizontal sum per key: attn_vsum_lanes);
// values: a slice of the head's output in registers (ATTN_VALUE_SLICE vectors), the keys alternating between
// ATTN_VALUE_SETS accumulator sets. A score's sum runs over head_dim in VF lanes, then the lane tree; an
// output element's over the keys in order (per set, then the sets added): both fixed by D and the ISA alone.
static inline __attribute__((always_inline)) void attend_vec(
    const float* qh, int64_t hn, const void* k_cache, const void* v_cache, const int kv_f16, const int64_t* blocks,
    int64_t block_size, int64_t slot_stride, int64_t g, int64_t first, int64_t pos, float scale, float* scores,
    float* o, float* stats, const int64_t D)
{
    const int64_t n = pos + 1 - first, nc = D / VF;
    for (int64_t p = first, slot, run; p <= pos; p += run) {
        run = block_run(blocks, block_size, p, pos + 1, &slot);
        const int64_t kp = slot * slot_stride + g * D;  // element offsets into the cache
        for (int64_t r0 = 0; r0 < run; r0 += VF) {
            const int m = run - r0 < VF ? (int)(run - r0) : VF;
            int64_t key[VF];
            for (int j = 0; j < VF; j++) key[j] = kp + (r0 + (j < m ? j : m - 1)) * slot_stride;  // repeats: unused lanes
            for (int64_t h = 0; h < hn; h++) {
                attn_vf acc[VF];
                for (int j = 0; j < VF; j++) acc[j] = attn_vzero();
                for (int64_t c = 0; c < nc; c++) {
                    const attn_vf qv = attn_vload(qh + h * D + c * VF);
                    for (int j = 0; j < VF; j++) acc[j] = attn_vfmadd(qv, kv_loadv(k_cache, key[j] + c * VF, kv_f16), acc[j]);
                }
                attn_vstore_n(scores + h * n + p - first + r0, attn_vmul(attn_vsum_lanes(acc), attn_vset1(scale)), m);
            }
        }
    }
    float inv[MAX_GROUP];
    softmax_numerators(scores, hn, n, inv, stats);
    for (int64_t h = 0; h < hn; h++) {  // weighted values
        const float* sh = scores + h * n;
        const attn_vf vinv = attn_vset1(inv[h]);
        for (int64_t c0 = 0; c0 < nc; c0 += ATTN_VALUE_SLICE) {
            const int64_t cn = nc - c0 < ATTN_VALUE_SLICE ? nc - c0 : ATTN_VALUE_SLICE;
            attn_vf a[ATTN_VALUE_SLICE];
#if ATTN_VALUE_SETS == 2
            attn_vf b[ATTN_VALUE_SLICE];
            for (int64_t c = 0; c < cn; c++) a[c] = b[c] = attn_vzero();
#else
            for (int64_t c = 0; c < cn; c++) a[c] = attn_vzero();
#endif
            for (int64_t p = first, slot, run; p <= pos; p += run) {
                run = block_run(blocks, block_size, p, pos + 1, &slot);
                const int64_t vp = slot * slot_stride + g * D + c0 * VF;
                const float* w = sh + p - first;
                int64_t r = 0;
#if ATTN_VALUE_SETS == 2
                for (; r + 1 < run; r += 2) {
                    const attn_vf w0 = attn_vset1(w[r]), w1 = attn_vset1(w[r + 1]);
                    for (int64_t c = 0; c < cn; c++) {
                        a[c] = attn_vfmadd(w0, kv_loadv(v_cache, vp + r * slot_stride + c * VF, kv_f16), a[c]);
                        b[c] = attn_vfmadd(w1, kv_loadv(v_cache, vp + (r + 1) * slot_stride + c * VF, kv_f16), b[c]);
                    }
                }
#endif
                for (; r < run; r++) {
                    const attn_vf w0 = attn_vset1(w[r]);
                    for (int64_t c = 0; c < cn; c++)
                        a[c] = attn_vfmadd(w0, kv_loadv(v_cache, vp + r * slot_stride + c * VF, kv_f16), a[c]);
                }
            }
            for (int64_t c = 0; c < cn; c++) {
#if ATTN_VALUE_SETS == 2
                a[c] = attn_vadd(a[c], b[c]);
#endif
                attn_vstore(o + h * D + (c0 + c) * VF, attn_vmul(a[c], vinv));
            }
        }
    }
}
#endif

// A cache row as float32: in place, or widened into row (half caches).
static inline const float* kv_row(const void* cache, int64_t i, int kv_f16, float* row, int64_t n)
{
    if (!kv_f16) return (const float*)cache + i;
    for (int64_t e = 0; e < n; e++) row[e] = kv_load(cache, i + e, 1);
    return row;
}

// The portable path: one dot product per key and head, axpy per value row.
static void attend_scalar(const float* qh, int64_t hn, const void* k_cache, const void* v_cache, int kv_f16,
                          const int64_t* blocks, int64_t block_size, int64_t slot_stride, int64_t g, int64_t first,
                          int64_t pos, float scale, float* scores, float* o, float* stats, int64_t head_dim)
{
    const int64_t n = pos + 1 - first;
    float* row = kv_f16 ? malloc(head_dim * sizeof(float)) : NULL;  // a float32 cache is read in place
    for (int64_t p = first, slot, run; p <= pos; p += run) {  // scores, a block at a time
        run = block_run(blocks, block_size, p, pos + 1, &slot);
        for (int64_t r = 0; r < run; r++) {
            const float* k = kv_row(k_cache, (slot + r) * slot_stride + g * head_dim, kv_f16, row, head_dim);
            for (int64_t h = 0; h < hn; h++) scores[h * n + p - first + r] = dot(qh + h * head_dim, k, head_dim) * scale;
        }
    }
    float inv[MAX_GROUP];
    softmax_numerators(scores, hn, n, inv, stats);
    for (int64_t e = 0; e < hn * head_dim; e++) o[e] = 0.0f;
    for (int64_t p = first, slot, run; p <= pos; p += run) {  // weighted values, a block at a time
        run = block_run(blocks, block_size, p, pos + 1, &slot);
        for (int64_t r = 0; r < run; r++) {
            const float* v = kv_row(v_cache, (slot + r) * slot_stride + g * head_dim, kv_f16, row, head_dim);
            for (int64_t h = 0; h < hn; h++) axpy(scores[h * n + p - first + r], v, o + h * head_dim, head_dim);
        }
    }
    for (int64_t h = 0; h < hn; h++)
        for (int64_t e = 0; e < head_dim; e++) o[h * head_dim + e] *= inv[h];
    free(row);
}

static void attend(const float* qh, int64_t hn, const void* k_cache, const void* v_cache, int kv_f16,
                   const int64_t* blocks, int64_t block_size, int64_t slot_stride, int64_t g, int64_t first,
                   int64_t pos, float scale, float* scores, float* o, float* stats, int64_t head_dim)
{
#if defined(ATTN_VF)
#define ATTEND_VEC(D)                                                                                               \
    (kv_f16 ? attend_vec(qh, hn, k_cache, v_cache, 1, blocks, block_size, slot_stride, g, first, pos, scale, scores, \
                         o, stats, D)                                                                                      \
            : attend_vec(qh, hn, k_cache, v_cache, 0, blocks, block_size, slot_stride, g, first, pos, scale, scores, \
                         o, stats, D))
    switch (head_dim) {  // the common sizes with constant chunk counts; others at run time
    case 64: ATTEND_VEC(64); return;
    case 128: ATTEND_VEC(128); return;
    default:
        if (head_dim % VF == 0 && head_dim <= 256) {
            ATTEND_VEC(head_dim);
            return;
        }
    }
#undef ATTEND_VEC
#endif
    attend_scalar(qh, hn, k_cache, v_cache, kv_f16, blocks, block_size, slot_stride, g, first, pos, scale, scores, o,
                  stats, head_dim);
}

// A query whose context is longer than KV_CHUNK keys is split at fixed points (flash-decoding): chunk k covers
// keys first + k KV_CHUNK .. (the last one shorter), each chunk a work item of its own giving per head a
// partial (max, sum, unnormalised weighted values), combined afterwards chunk by chunk in order. The split
// depends on the query's context alone, never on the batch or the thread count, so neither changes a bit of
// a result; a context of at most KV_CHUNK keys is one item computed as before the split existed.
#define KV_CHUNK 128
// Below this much work (keys x query heads, summed over the step) a parallel region's start-up costs more than
// the second thread saves: one thread computes everything (the same items, the same code, the same bits).
#define PARALLEL_MIN_WORK 1024

typedef struct {  // one work item: a query's keys first..last against KV head g's query heads
    int64_t token, s, g, first, last;
    float* partial;  // NULL: the whole context, into out; else this chunk's [group][head_dim] values, then stats
} AttnItem;

typedef struct {  // a split query's KV head g: its chunks' partials, nchunks consecutive slots
    int64_t token, g, nchunks;
    const float* partial;
} AttnCombine;

// out[h] = sum_k e^(m_k - M) o_k[h] / sum_k e^(m_k - M) l_k over the chunks k in order (M: the largest m_k).
static void combine_chunks(const float* partial, int64_t nchunks, int64_t group, int64_t head_dim, float* out)
{
    const int64_t slot = group * (head_dim + 2);
    for (int64_t h = 0; h < group; h++) {
        float* o = out + h * head_dim;
        float mx = -INFINITY, sum = 0.0f;
        for (int64_t k = 0; k < nchunks; k++) {
            const float m = partial[k * slot + group * head_dim + 2 * h];
            mx = m > mx ? m : mx;
        }
        for (int64_t e = 0; e < head_dim; e++) o[e] = 0.0f;
        for (int64_t k = 0; k < nchunks; k++) {
            const float* p = partial + k * slot;
            const float w = expf(p[group * head_dim + 2 * h] - mx);
            sum += w * p[group * head_dim + 2 * h + 1];
            axpy(w, p + h * head_dim, o, head_dim);
        }
        const float inv = 1.0f / sum;
        for (int64_t e = 0; e < head_dim; e++) o[e] *= inv;
    }
}

// Query i of a sequence with q_len new tokens and seq_len positions sits at position seq_len - q_len + i and
// sees keys at positions p <= it (and p > it - window when window > 0).
void paged_attention(const float* q, int64_t q_token_stride, const void* k_cache, const void* v_cache, int kv_f16,
                     int64_t block_size, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                     const int64_t* seq_ids, int64_t num_selected, const int64_t* query_start_loc,
                     const int64_t* seq_lens, const int64_t* block_table, int64_t max_blocks, float scale,
                     int64_t window, float* out, int num_threads)
{
    const int64_t group = num_heads / num_kv_heads;
    const int64_t slot_stride = num_kv_heads * head_dim;  // elements between consecutive cache positions
    const int64_t slot = group * (head_dim + 2);  // floats per chunk partial
    int64_t num_items = 0, num_combines = 0, num_slots = 0;
    for (int64_t task = 0; task < num_selected; task++) {  // count
        const int64_t s = seq_ids[task], q_len = query_start_loc[s + 1] - query_start_loc[s];
        for (int64_t i = 0; i < q_len; i++) {
            const int64_t pos = seq_lens[s] - q_len + i, n = pos + 1 - first_key(pos, window);
            const int64_t chunks = n > KV_CHUNK ? (n + KV_CHUNK - 1) / KV_CHUNK : 1;
            num_items += chunks * num_kv_heads;
            if (chunks > 1) num_combines += num_kv_heads, num_slots += chunks * num_kv_heads;
        }
    }
    if (num_items == 0) return;
    AttnItem* items = malloc(num_items * sizeof(AttnItem));
    AttnCombine* combines = num_combines ? malloc(num_combines * sizeof(AttnCombine)) : NULL;
    float* partials = num_slots ? malloc(num_slots * slot * sizeof(float)) : NULL;
    int64_t work = 0;
    {  // list: each query's KV heads, each one's chunks in order
        int64_t it = 0, c = 0;
        float* next = partials;
        for (int64_t task = 0; task < num_selected; task++) {
            const int64_t s = seq_ids[task], start = query_start_loc[s], q_len = query_start_loc[s + 1] - start;
            for (int64_t i = 0; i < q_len; i++) {
                const int64_t pos = seq_lens[s] - q_len + i, first = first_key(pos, window), n = pos + 1 - first;
                const int64_t chunks = n > KV_CHUNK ? (n + KV_CHUNK - 1) / KV_CHUNK : 1;
                work += n * num_heads;
                for (int64_t g = 0; g < num_kv_heads; g++) {
                    if (chunks > 1) combines[c++] = (AttnCombine){start + i, g, chunks, next};
                    for (int64_t k = 0; k < chunks; k++) {
                        const int64_t lo = first + k * KV_CHUNK, hi = lo + KV_CHUNK - 1 < pos ? lo + KV_CHUNK - 1 : pos;
                        items[it++] = (AttnItem){start + i, s, g, lo, hi, chunks > 1 ? next : NULL};
                        if (chunks > 1) next += slot;
                    }
                }
            }
        }
    }
    int threads = num_threads < num_items ? num_threads : (int)num_items;
#pragma omp parallel num_threads(threads) if (work >= PARALLEL_MIN_WORK && threads > 1)
    {
        float scores[MAX_GROUP * KV_CHUNK];  // [MAX_GROUP][keys] of the current item
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < num_items; it++) {
            const AttnItem* w = items + it;
            for (int64_t h0 = 0; h0 < group; h0 += MAX_GROUP)
                attend(q + w->token * q_token_stride + (w->g * group + h0) * head_dim,
                       group - h0 < MAX_GROUP ? group - h0 : MAX_GROUP, k_cache, v_cache, kv_f16,
                       block_table + w->s * max_blocks, block_size, slot_stride, w->g, w->first, w->last, scale,
                       scores,
                       w->partial ? w->partial + h0 * head_dim
                                  : out + (w->token * num_heads + w->g * group + h0) * head_dim,
                       w->partial ? w->partial + group * head_dim + 2 * h0 : NULL, head_dim);
        }
        if (num_combines) {
#pragma omp for schedule(static) nowait
            for (int64_t c = 0; c < num_combines; c++) {
                const AttnCombine* w = combines + c;
                combine_chunks(w->partial, w->nchunks, group, head_dim,
                               out + (w->token * num_heads + w->g * group) * head_dim);
            }
        }
    }
    free(items), free(combines), free(partials);
}
