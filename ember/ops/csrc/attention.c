// Paged attention for short queries (decode, speculative verification) reading the KV blocks in place:
// no gather of the context into a padded copy, no mask tensor. float32 (the cache float32 or half, see
// paged_cache.h); two passes per query and head
// (scores, then softmax-weighted values), the query heads that share a KV head together so each key and
// value row is read once. Sequences are independent: a result does not depend on the rest of the batch.
#include <stdint.h>
#include <stdlib.h>

#include "paged_cache.h"
#include "vector_math.h"

#define MAX_GROUP 8  // query heads per KV head handled at once

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float dot(const float* a, const float* b, int64_t n)
{
#if defined(__AVX512F__)
    if (n % 16 == 0) {
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
        for (int64_t e = 16; e < n; e += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + e), _mm512_loadu_ps(b + e), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t e = 0; e < n; e++) sum += a[e] * b[e];
    return sum;
}

static inline void axpy(float w, const float* x, float* y, int64_t n)  // y += w x
{
#if defined(__AVX512F__)
    if (n % 16 == 0) {
        const __m512 vw = _mm512_set1_ps(w);
        for (int64_t e = 0; e < n; e += 16)
            _mm512_storeu_ps(y + e, _mm512_fmadd_ps(vw, _mm512_loadu_ps(x + e), _mm512_loadu_ps(y + e)));
        return;
    }
#endif
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

#if defined(__AVX512F__)
// out[i] = the sum of v[i]'s 16 lanes: a transpose-and-add tree (45 shuffles and adds for 16 sums, against
// ~8 each for a horizontal sum per vector).
static inline __m512 sum16(const __m512 v[16])
{
    __m512 w[8], u[4];
    for (int i = 0; i < 8; i++)  // lane k: (a0+a2, b0+b2, a1+a3, b1+b3) of v[2i] = a, v[2i+1] = b
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  // lane k: the lane's partial sums of v[4i .. 4i+3]
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44), _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

// One query's hn heads (h0.. of KV head g's group) over keys first..pos, head_dim D a multiple of 16 (at most
// 256). always_inline so that the callers' constant D unrolls the chunk loops into registers. Scores: 16 keys
// a time, one accumulator each (no horizontal sum per key); values: the head's output in registers, two keys
// a time into two accumulator sets.
static inline __attribute__((always_inline)) void attend_avx512(
    const float* qh, int64_t hn, const void* k_cache, const void* v_cache, const int kv_f16, const int64_t* blocks,
    int64_t block_size, int64_t slot_stride, int64_t g, int64_t first, int64_t pos, float scale, float* scores,
    float* o, const int64_t D)
{
    const int64_t n = pos + 1 - first, nc = D / 16;
    for (int64_t p = first, slot, run; p <= pos; p += run) {
        run = block_run(blocks, block_size, p, pos + 1, &slot);
        const int64_t kp = slot * slot_stride + g * D;  // element offsets into the cache
        for (int64_t r0 = 0; r0 < run; r0 += 16) {
            const int64_t m = run - r0 < 16 ? run - r0 : 16;
            int64_t key[16];
            for (int j = 0; j < 16; j++) key[j] = kp + (r0 + (j < m ? j : m - 1)) * slot_stride;  // repeats: unused lanes
            for (int64_t h = 0; h < hn; h++) {
                __m512 acc[16];
                for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
                for (int64_t c = 0; c < nc; c++) {
                    const __m512 qv = _mm512_loadu_ps(qh + h * D + c * 16);
                    for (int j = 0; j < 16; j++)
                        acc[j] = _mm512_fmadd_ps(qv, kv_load16(k_cache, key[j] + c * 16, kv_f16), acc[j]);
                }
                _mm512_mask_storeu_ps(scores + h * n + p - first + r0, (__mmask16)((1u << m) - 1),
                                      _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale)));
            }
        }
    }
    float inv[MAX_GROUP];
    softmax_numerators(scores, hn, n, inv);
    for (int64_t h = 0; h < hn; h++) {  // weighted values
        const float* sh = scores + h * n;
        __m512 a[16], b[16];
        for (int64_t c = 0; c < nc; c++) a[c] = b[c] = _mm512_setzero_ps();
        for (int64_t p = first, slot, run; p <= pos; p += run) {
            run = block_run(blocks, block_size, p, pos + 1, &slot);
            const int64_t vp = slot * slot_stride + g * D;
            const float* w = sh + p - first;
            int64_t r = 0;
            for (; r + 1 < run; r += 2) {
                const __m512 w0 = _mm512_set1_ps(w[r]), w1 = _mm512_set1_ps(w[r + 1]);
                for (int64_t c = 0; c < nc; c++) {
                    a[c] = _mm512_fmadd_ps(w0, kv_load16(v_cache, vp + r * slot_stride + c * 16, kv_f16), a[c]);
                    b[c] = _mm512_fmadd_ps(w1, kv_load16(v_cache, vp + (r + 1) * slot_stride + c * 16, kv_f16), b[c]);
                }
            }
            if (r < run) {
                const __m512 w0 = _mm512_set1_ps(w[r]);
                for (int64_t c = 0; c < nc; c++)
                    a[c] = _mm512_fmadd_ps(w0, kv_load16(v_cache, vp + r * slot_stride + c * 16, kv_f16), a[c]);
            }
        }
        const __m512 vinv = _mm512_set1_ps(inv[h]);
        for (int64_t c = 0; c < nc; c++) _mm512_storeu_ps(o + h * D + c * 16, _mm512_mul_ps(_mm512_add_ps(a[c], b[c]), vinv));
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
#if defined(__AVX512F__)
#define ATTEND_AVX512(D)                                                                                            \
    (kv_f16 ? attend_avx512(qh, hn, k_cache, v_cache, 1, blocks, block_size, slot_stride, g, first, pos, scale,     \
                            scores, o, D)                                                                           \
            : attend_avx512(qh, hn, k_cache, v_cache, 0, blocks, block_size, slot_stride, g, first, pos, scale,     \
                            scores, o, D))
    switch (head_dim) {  // the common sizes with constant chunk counts; others at run time
    case 64: ATTEND_AVX512(64); return;
    case 128: ATTEND_AVX512(128); return;
    default:
        if (head_dim % 16 == 0 && head_dim <= 256) {
            ATTEND_AVX512(head_dim);
            return;
        }
    }
#undef ATTEND_AVX512
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
