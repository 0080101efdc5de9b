// Paged attention for long queries (prefill chunks), reading the KV blocks in place. float32 (the cache
// float32 or half, see paged_cache.h).
//
// Each sequence's keys are first laid out transposed per KV head (Kt [head_dim][context], 16 keys to a
// vector), so the scores of a tile of query rows against 16 keys are broadcast-multiply-adds with no
// horizontal sums. A tile is ROW_POSITIONS consecutive query positions times the query heads of one KV
// head: its rows share every key and value read. Scores for the tile's whole key range go to a scratch row
// (masked per row: causal, sliding window), an exact softmax, then the softmax-weighted values. Tiles are
// independent, spread over the threads; a result does not depend on the rest of the batch.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "paged_cache.h"  // attn_simd.h's vectors, kv_loadv
#include "vector_math.h"

#define ROW_POSITIONS 4
#if defined(ATTN_VF)  // register tiles (attn_simd.h): score rows x key vectors, output rows x head_dim vectors
#define ROWS_AT_ONCE ATTN_SCORE_ROWS
#define VALUE_ROWS ATTN_TILE_ROWS
#else
#define ROWS_AT_ONCE 8  // score rows accumulated together
#define VALUE_ROWS 4  // output rows accumulated together over a 64-wide slice of head_dim
#endif

static inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

#if defined(ATTN_VF)
#define VF ATTN_VF

// Scores of R (a constant at each call) rows against ATTN_SCORE_VECS vectors of keys: broadcast q[d] times
// Kt[d]. Each score's sum runs over d in order, whatever the tile.
static inline __attribute__((always_inline)) void score_chunk(const float* rows, const int R,
                                                               const float* kc, int64_t ld, int64_t head_dim,
                                                               float* scores, int64_t scores_ld)
{
    attn_vf acc[ROWS_AT_ONCE][ATTN_SCORE_VECS];
    for (int r = 0; r < R; r++)
        for (int e = 0; e < ATTN_SCORE_VECS; e++) acc[r][e] = attn_vzero();
    for (int64_t d = 0; d < head_dim; d++) {
        attn_vf kd[ATTN_SCORE_VECS];
        for (int e = 0; e < ATTN_SCORE_VECS; e++) kd[e] = attn_vload(kc + d * ld + e * VF);
        for (int r = 0; r < R; r++) {
            const attn_vf qd = attn_vset1(rows[r * head_dim + d]);
            for (int e = 0; e < ATTN_SCORE_VECS; e++) acc[r][e] = attn_vfmadd(qd, kd[e], acc[r][e]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int e = 0; e < ATTN_SCORE_VECS; e++) attn_vstore(scores + r * scores_ld + e * VF, acc[r][e]);
}

// The weighted values of the VALUE_ROWS rows over keys key_first..key_end for NV (a constant) vectors of
// head_dim from d0: each element's sum over the keys in order, whatever the tile.
static inline __attribute__((always_inline)) void value_tile(
    const float* p, int64_t p_ld, int R, const void* v_cache, const int kv_f16, const int64_t* blocks,
    int64_t block_size, int64_t slot_stride, int64_t head_offset, int64_t key_first, int64_t key_end, int64_t d0,
    const int NV, const float* inv_sums, float* const* outs)
{
    attn_vf acc[VALUE_ROWS][ATTN_TILE_VECS];
    for (int r = 0; r < VALUE_ROWS; r++)
        for (int e = 0; e < NV; e++) acc[r][e] = attn_vzero();
    for (int64_t j = key_first, slot, run; j < key_end; j += run) {  // a cache block's run of keys at a time
        run = block_run(blocks, block_size, j, key_end, &slot);
        for (int64_t i = 0; i < run; i++) {
            const int64_t v = (slot + i) * slot_stride + head_offset + d0;
            attn_vf vv[ATTN_TILE_VECS];
            for (int e = 0; e < NV; e++) vv[e] = kv_loadv(v_cache, v + e * VF, kv_f16);
            for (int r = 0; r < VALUE_ROWS; r++) {  // rows past R read weight rows of their own: p is padded
                const attn_vf w = attn_vset1(p[r * p_ld + j + i - key_first]);
                for (int e = 0; e < NV; e++) acc[r][e] = attn_vfmadd(w, vv[e], acc[r][e]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const attn_vf inv = attn_vset1(inv_sums[r]);
        for (int e = 0; e < NV; e++) attn_vstore(outs[r] + d0 + e * VF, attn_vmul(acc[r][e], inv));
    }
}
#endif

// Scores of R rows (query vectors, pre-scaled: rows [R][head_dim]) against keys k0..k0 + 16 * chunks
// (Kt [head_dim][ld]).
static void score_rows(const float* rows, int R, const float* kt, int64_t ld, int64_t head_dim, int64_t k0,
                       int64_t chunks, float* scores, int64_t scores_ld)
{
#if defined(ATTN_VF)
    for (int64_t c = 0; c < chunks * 16; c += ATTN_SCORE_VECS * VF) {  // 16 keys a multiple of the tile's
        const float* kc = kt + k0 + c;
        float* sc = scores + c;
        switch (R) {  // R <= ROWS_AT_ONCE
#if ROWS_AT_ONCE >= 8
        case 8: score_chunk(rows, 8, kc, ld, head_dim, sc, scores_ld); continue;
        case 7: score_chunk(rows, 7, kc, ld, head_dim, sc, scores_ld); continue;
#endif
        case 6: score_chunk(rows, 6, kc, ld, head_dim, sc, scores_ld); continue;
        case 5: score_chunk(rows, 5, kc, ld, head_dim, sc, scores_ld); continue;
        case 4: score_chunk(rows, 4, kc, ld, head_dim, sc, scores_ld); continue;
        case 3: score_chunk(rows, 3, kc, ld, head_dim, sc, scores_ld); continue;
        case 2: score_chunk(rows, 2, kc, ld, head_dim, sc, scores_ld); continue;
        default: score_chunk(rows, 1, kc, ld, head_dim, sc, scores_ld); continue;
        }
    }
#else
    for (int64_t c = 0; c < chunks; c++) {
        const float* kc = kt + k0 + c * 16;
        float* sc = scores + c * 16;
        for (int r = 0; r < R; r++) {
            float acc[16] = {0};
            for (int64_t d = 0; d < head_dim; d++) {
                const float qd = rows[r * head_dim + d];
#pragma omp simd
                for (int e = 0; e < 16; e++) acc[e] += qd * kc[d * ld + e];
            }
            for (int e = 0; e < 16; e++) sc[r * scores_ld + e] = acc[e];
        }
    }
#endif
}

// The weighted values of R rows (weights p [R][p_ld], key j at p[j - key_first]) over keys key_first..key_end,
// into out rows (row r at outs[r]) for head_dim slice d0..d0 + width (at most 64).
static void value_rows(const float* p, int64_t p_ld, int R, const void* v_cache, int kv_f16, const int64_t* blocks,
                       int64_t block_size, int64_t slot_stride, int64_t head_offset, int64_t key_first,
                       int64_t key_end, int64_t d0, int64_t width, const float* inv_sums, float* const* outs)
{
#if defined(ATTN_VF)
    if (width % VF == 0) {  // tiles of ATTN_TILE_VECS vectors, then single vectors
#define VALUE_TILE(F, NV)                                                                                           \
    value_tile(p, p_ld, R, v_cache, F, blocks, block_size, slot_stride, head_offset, key_first, key_end, d,    \
               NV, inv_sums, outs)
        int64_t d = d0;
        for (; d + ATTN_TILE_VECS * VF <= d0 + width; d += ATTN_TILE_VECS * VF)
            kv_f16 ? VALUE_TILE(1, ATTN_TILE_VECS) : VALUE_TILE(0, ATTN_TILE_VECS);
        for (; d < d0 + width; d += VF) kv_f16 ? VALUE_TILE(1, 1) : VALUE_TILE(0, 1);
#undef VALUE_TILE
        return;
    }
#endif
    float acc[VALUE_ROWS][64] = {{0}};
    for (int64_t j = key_first, slot, run; j < key_end; j += run) {
        run = block_run(blocks, block_size, j, key_end, &slot);
        for (int64_t i = 0; i < run; i++) {
            const int64_t v = (slot + i) * slot_stride + head_offset + d0;
            for (int r = 0; r < R; r++) {
                const float w = p[r * p_ld + j + i - key_first];
                for (int64_t e = 0; e < width; e++) acc[r][e] += w * kv_load(v_cache, v + e, kv_f16);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int64_t e = 0; e < width; e++) outs[r][d0 + e] = acc[r][e] * inv_sums[r];
}

// Query i of a sequence with q_len new tokens and seq_len positions sits at position seq_len - q_len + i and
// sees keys at positions p <= it (and p > it - window when window > 0).
void prefill_attention(const float* q, int64_t q_token_stride, const void* k_cache, const void* v_cache, int kv_f16,
                       int64_t block_size, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                       const int64_t* seq_ids, int64_t num_selected, const int64_t* query_start_loc,
                       const int64_t* seq_lens, const int64_t* block_table, int64_t max_blocks, float scale,
                       int64_t window, float* out, int num_threads)
{
    const int64_t group = num_heads / num_kv_heads, slot_stride = num_kv_heads * head_dim;
    // Per selected sequence: where its transposed keys start, and its first work item (KV head x tile).
    int64_t* kt_start = malloc((num_selected + 1) * sizeof(int64_t));
    int64_t* item_start = malloc((num_selected + 1) * sizeof(int64_t));
    kt_start[0] = item_start[0] = 0;
    for (int64_t t = 0; t < num_selected; t++) {
        const int64_t s = seq_ids[t], q_len = query_start_loc[s + 1] - query_start_loc[s];
        kt_start[t + 1] = kt_start[t] + num_kv_heads * head_dim * round16(seq_lens[s]);
        item_start[t + 1] = item_start[t] + num_kv_heads * ((q_len + ROW_POSITIONS - 1) / ROW_POSITIONS);
    }
    float* kt_all = malloc(kt_start[num_selected] * sizeof(float));
    const int64_t max_rows = ROW_POSITIONS * group;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for collapse(2) schedule(static)
        for (int64_t t = 0; t < num_selected; t++)
            for (int64_t g = 0; g < num_kv_heads; g++) {  // Kt for (sequence, KV head), zero past the context
                const int64_t s = seq_ids[t], len = seq_lens[s], ld = round16(len);
                const int64_t* blocks = block_table + s * max_blocks;
                float* kt = kt_all + kt_start[t] + g * head_dim * ld;
                for (int64_t j = 0, slot, run; j < len; j += run) {
                    run = block_run(blocks, block_size, j, len, &slot);
                    for (int64_t i = 0; i < run; i++) {
                        const int64_t k = (slot + i) * slot_stride + g * head_dim;
                        for (int64_t d = 0; d < head_dim; d++) kt[d * ld + j + i] = kv_load(k_cache, k + d, kv_f16);
                    }
                }
                for (int64_t d = 0; d < head_dim; d++)
                    for (int64_t j = len; j < ld; j++) kt[d * ld + j] = 0.0f;
            }
        int64_t capacity = 0;
        float *scores = NULL, *queries = malloc(max_rows * head_dim * sizeof(float));
        float** outs = malloc(max_rows * sizeof(float*));
        float* inv_sums = malloc(max_rows * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < item_start[num_selected]; item++) {
            int64_t t = 0;
            while (item_start[t + 1] <= item) t++;
            const int64_t s = seq_ids[t], start = query_start_loc[s], q_len = query_start_loc[s + 1] - start;
            const int64_t len = seq_lens[s], ld = round16(len), tiles = (q_len + ROW_POSITIONS - 1) / ROW_POSITIONS;
            const int64_t g = (item - item_start[t]) / tiles, i0 = (item - item_start[t]) % tiles * ROW_POSITIONS;
            const int64_t i1 = i0 + ROW_POSITIONS < q_len ? i0 + ROW_POSITIONS : q_len;
            const int64_t* blocks = block_table + s * max_blocks;
            const float* kt = kt_all + kt_start[t] + g * head_dim * ld;
            // The tile's rows: position-major (row r at position first_pos + r / group), then the group's
            // heads; queries pre-scaled.
            const int64_t first_pos = len - q_len + i0, last = len - q_len + i1 - 1;
            int64_t R = 0;
            for (int64_t i = i0; i < i1; i++)
                for (int64_t h = 0; h < group; h++, R++) {
                    const float* qr = q + (start + i) * q_token_stride + (g * group + h) * head_dim;
                    for (int64_t d = 0; d < head_dim; d++) queries[R * head_dim + d] = qr[d] * scale;
                    outs[R] = out + ((start + i) * num_heads + g * group + h) * head_dim;
                }
            const int64_t key_first = first_key(first_pos, window);
            const int64_t k0 = key_first / 16 * 16, chunks = (last + 1 - k0 + 15) / 16, width = chunks * 16;
            const int64_t padded_rows = (R + VALUE_ROWS - 1) / VALUE_ROWS * VALUE_ROWS;
            if (capacity < padded_rows * width) {
                free(scores);
                capacity = padded_rows * width;
                scores = malloc(capacity * sizeof(float));
            }
            for (int64_t r = 0; r < R; r += ROWS_AT_ONCE)
                score_rows(queries + r * head_dim, R - r < ROWS_AT_ONCE ? (int)(R - r) : ROWS_AT_ONCE, kt, ld,
                           head_dim, k0, chunks, scores + r * width, width);
            for (int64_t r = 0; r < R; r++) {  // softmax numerators over each row's own keys, zero elsewhere
                float* sr = scores + r * width;
                const int64_t pos = first_pos + r / group;
                const int64_t lo = first_key(pos, window) - k0, hi = pos - k0 + 1;
                float mx = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : mx)
                for (int64_t j = lo; j < hi; j++) mx = sr[j] > mx ? sr[j] : mx;
                for (int64_t j = 0; j < lo; j++) sr[j] = 0.0f;
#pragma omp simd
                for (int64_t j = lo; j < hi; j++) sr[j] = expf(sr[j] - mx);
#pragma omp simd reduction(+ : sum)
                for (int64_t j = lo; j < hi; j++) sum += sr[j];
                for (int64_t j = hi; j < width; j++) sr[j] = 0.0f;
                inv_sums[r] = 1.0f / sum;
            }
            for (int64_t r = 0; r < R; r += VALUE_ROWS)
                for (int64_t d0 = 0; d0 < head_dim; d0 += 64)
                    value_rows(scores + r * width + (key_first - k0), width,
                               R - r < VALUE_ROWS ? (int)(R - r) : VALUE_ROWS, v_cache, kv_f16, blocks, block_size,
                               slot_stride, g * head_dim, key_first, last + 1, d0,
                               head_dim - d0 < 64 ? head_dim - d0 : 64, inv_sums + r, outs + r);
        }
        free(scores), free(queries), free(outs), free(inv_sums);
    }
    free(kt_start), free(item_start), free(kt_all);
}
