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

// Each head's scores (hn rows of n) turned into softmax numerators in place; inv[h] = 1 / their sum.
static void softmax_numerators(float* scores, int64_t hn, int64_t n, float* inv)
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
    float* o, const int64_t D)
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
    softmax_numerators(scores, hn, n, inv);
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
                          int64_t pos, float scale, float* scores, float* o, int64_t head_dim)
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
    softmax_numerators(scores, hn, n, inv);
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
                   int64_t pos, float scale, float* scores, float* o, int64_t head_dim)
{
#if defined(ATTN_VF)
#define ATTEND_VEC(D)                                                                                               \
    (kv_f16 ? attend_vec(qh, hn, k_cache, v_cache, 1, blocks, block_size, slot_stride, g, first, pos, scale, scores, \
                         o, D)                                                                                      \
            : attend_vec(qh, hn, k_cache, v_cache, 0, blocks, block_size, slot_stride, g, first, pos, scale, scores, \
                         o, D))
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
                  head_dim);
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
#pragma omp parallel num_threads(num_threads)
    {
        int64_t capacity = 0;
        float* scores = NULL;  // [MAX_GROUP][context] for the current (sequence, KV head)
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int64_t task = 0; task < num_selected; task++)
            for (int64_t g = 0; g < num_kv_heads; g++) {
                const int64_t s = seq_ids[task];
                const int64_t start = query_start_loc[s], q_len = query_start_loc[s + 1] - start;
                const int64_t seq_len = seq_lens[s];
                if (capacity < seq_len * MAX_GROUP) {
                    free(scores);
                    capacity = seq_len * MAX_GROUP;
                    scores = malloc(capacity * sizeof(float));
                }
                for (int64_t i = 0; i < q_len; i++) {
                    const int64_t pos = seq_len - q_len + i;
                    for (int64_t h0 = 0; h0 < group; h0 += MAX_GROUP)
                        attend(q + (start + i) * q_token_stride + (g * group + h0) * head_dim,
                               group - h0 < MAX_GROUP ? group - h0 : MAX_GROUP, k_cache, v_cache, kv_f16,
                               block_table + s * max_blocks, block_size, slot_stride, g, first_key(pos, window), pos,
                               scale, scores, out + ((start + i) * num_heads + g * group + h0) * head_dim, head_dim);
                }
            }
        free(scores);
    }
}
