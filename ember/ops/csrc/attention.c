// Paged attention for short queries (decode, speculative verification) reading the KV blocks in place:
// no gather of the context into a padded copy, no mask tensor. float32; two passes per query and head
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

// Query i of a sequence with q_len new tokens and seq_len positions sits at position seq_len - q_len + i and
// sees keys at positions p <= it (and p > it - window when window > 0).
void paged_attention(const float* q, int64_t q_token_stride, const float* k_cache, const float* v_cache,
                     int64_t block_size, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                     const int64_t* seq_ids, int64_t num_selected, const int64_t* query_start_loc,
                     const int64_t* seq_lens, const int64_t* block_table, int64_t max_blocks, float scale,
                     int64_t window, float* out, int num_threads)
{
    const int64_t group = num_heads / num_kv_heads;
    const int64_t slot_stride = num_kv_heads * head_dim;  // floats between consecutive cache positions
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
                const int64_t* blocks = block_table + s * max_blocks;
                if (capacity < seq_len * MAX_GROUP) {
                    free(scores);
                    capacity = seq_len * MAX_GROUP;
                    scores = malloc(capacity * sizeof(float));
                }
                for (int64_t i = 0; i < q_len; i++) {
                    const int64_t pos = seq_len - q_len + i;
                    const int64_t first = first_key(pos, window);
                    const int64_t n = pos + 1 - first;
                    for (int64_t h0 = 0; h0 < group; h0 += MAX_GROUP) {
                        const int64_t hn = group - h0 < MAX_GROUP ? group - h0 : MAX_GROUP;
                        const float* qh = q + (start + i) * q_token_stride + (g * group + h0) * head_dim;
                        float* o = out + ((start + i) * num_heads + g * group + h0) * head_dim;
                        for (int64_t p = first, slot, run; p <= pos; p += run) {  // scores, a block at a time
                            run = block_run(blocks, block_size, p, pos + 1, &slot);
                            const float* kp = k_cache + slot * slot_stride + g * head_dim;
                            for (int64_t r = 0; r < run; r++, kp += slot_stride)
                                for (int64_t h = 0; h < hn; h++)
                                    scores[h * n + p - first + r] = dot(qh + h * head_dim, kp, head_dim) * scale;
                        }
                        float sums[MAX_GROUP];
                        for (int64_t h = 0; h < hn; h++) {  // softmax numerators
                            float* sh = scores + h * n;
                            float mx = -INFINITY, sum = 0.0f;
                            for (int64_t j = 0; j < n; j++) mx = sh[j] > mx ? sh[j] : mx;
#pragma omp simd
                            for (int64_t j = 0; j < n; j++) sh[j] = expf(sh[j] - mx);
#pragma omp simd reduction(+ : sum)
                            for (int64_t j = 0; j < n; j++) sum += sh[j];
                            sums[h] = sum;
                        }
                        for (int64_t e = 0; e < hn * head_dim; e++) o[e] = 0.0f;
                        for (int64_t p = first, slot, run; p <= pos; p += run) {  // weighted values, a block at a time
                            run = block_run(blocks, block_size, p, pos + 1, &slot);
                            const float* vp = v_cache + slot * slot_stride + g * head_dim;
                            for (int64_t r = 0; r < run; r++, vp += slot_stride)
                                for (int64_t h = 0; h < hn; h++)
                                    axpy(scores[h * n + p - first + r], vp, o + h * head_dim, head_dim);
                        }
                        for (int64_t h = 0; h < hn; h++) {
                            const float inv = 1.0f / sums[h];
                            for (int64_t e = 0; e < head_dim; e++) o[h * head_dim + e] *= inv;
                        }
                    }
                }
            }
        free(scores);
    }
}
