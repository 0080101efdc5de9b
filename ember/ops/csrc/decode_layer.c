// One Llama-family decoder layer for a decode-sized batch (int4 weights, short queries) in one call: the
// same kernels the layer's modules call one by one (qlinear.c, pointwise.c, attention.c), minus the ~15
// Python calls and tensor allocations per layer that dominate a small model's decode step.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "paged_cache.h"

void q4_linear(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, const float* m, int64_t N,
               float* out, int num_threads);
void q4_i8_linear(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, const float* m, int64_t N,
                  float* out, int num_threads);
void rms_norm(const float* x, int64_t x_stride, const float* residual, float* residual_out, const float* weight,
              float* out, int64_t M, int64_t H, float eps, int num_threads);
void silu_and_mul(const float* x, float* out, int64_t M, int64_t d, int num_threads);
void rotary(float* x, int64_t token_stride, int64_t num_tokens, int64_t num_heads, int64_t head_dim,
            const int64_t* positions, const float* cos_cache, const float* sin_cache);
void paged_attention(const float* q, int64_t q_token_stride, const void* k_cache, const void* v_cache, int kv_f16,
                     int64_t block_size, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                     const int64_t* seq_ids, int64_t num_selected, const int64_t* query_start_loc,
                     const int64_t* seq_lens, const int64_t* block_table, int64_t max_blocks, float scale,
                     int64_t window, float* out, int num_threads);

typedef struct {  // a 4-bit weight as q4_linear takes it, and its optional bias
    const uint8_t* qs;
    const float* d;
    const float* m;
    const float* bias;
    int64_t out_features, in_features;
    int64_t int8_activations;  // qs in qlinear_i8.c's layout, applied to int8-rounded activations
} Q4Linear;

typedef struct {
    int64_t hidden, num_heads, num_kv_heads, head_dim, intermediate;
    float eps, scale;
    int64_t window;  // 0: none
    const float *input_norm, *post_norm, *q_norm, *k_norm;  // q_norm / k_norm NULL unless per-head (Qwen3)
    Q4Linear qkv, o, gate_up, down;
    const float *cos_cache, *sin_cache;
} DecoderLayer;

typedef struct {  // the step: this batch's rows and the paged cache (attention.c's arguments)
    int64_t num_tokens;
    const int64_t* positions;  // [num_tokens]
    const int64_t* slots;  // [num_tokens] flat cache slot of each token's K/V
    void *k_cache, *v_cache;
    int64_t kv_f16;  // the cache's elements are half floats (else float32)
    int64_t block_size;
    const int64_t *seq_ids, *query_start_loc, *seq_lens, *block_table;
    int64_t num_seqs, max_blocks;
} DecodeStep;

static void linear(const Q4Linear* w, const float* x, int64_t M, float* out, int num_threads)
{
    (w->int8_activations ? q4_i8_linear : q4_linear)(x, M, w->in_features, w->qs, w->d, w->m, w->out_features, out,
                                                     num_threads);
    if (w->bias)
        for (int64_t r = 0; r < M; r++)
            for (int64_t n = 0; n < w->out_features; n++) out[r * w->out_features + n] += w->bias[n];
}

// hidden_out, residual_out = layer(hidden, residual); residual NULL for the first layer (it is then hidden).
void decoder_layer(const DecoderLayer* L, const DecodeStep* S, const float* hidden, const float* residual,
                   float* hidden_out, float* residual_out, int num_threads)
{
    const int64_t T = S->num_tokens, H = L->hidden, hd = L->head_dim;
    const int64_t q_size = L->num_heads * hd, kv_size = L->num_kv_heads * hd, qkv_width = q_size + 2 * kv_size;
    float* normed = malloc(T * H * sizeof(float));
    float* qkv = malloc(T * qkv_width * sizeof(float));
    float* attn = malloc(T * q_size * sizeof(float));
    float* projected = malloc(T * H * sizeof(float));
    float* gate_up = malloc(T * 2 * L->intermediate * sizeof(float));
    float* act = malloc(T * L->intermediate * sizeof(float));

    if (residual) {
        rms_norm(hidden, H, residual, residual_out, L->input_norm, normed, T, H, L->eps, num_threads);
    } else {
        memcpy(residual_out, hidden, T * H * sizeof(float));
        rms_norm(hidden, H, NULL, NULL, L->input_norm, normed, T, H, L->eps, num_threads);
    }
    linear(&L->qkv, normed, T, qkv, num_threads);
    for (int64_t t = 0; t < T; t++) {
        float* row = qkv + t * qkv_width;
        if (L->q_norm) {  // per head, in place (a row is read whole before it is written)
            rms_norm(row, hd, NULL, NULL, L->q_norm, row, L->num_heads, hd, L->eps, 1);
            rms_norm(row + q_size, hd, NULL, NULL, L->k_norm, row + q_size, L->num_kv_heads, hd, L->eps, 1);
        }
    }
    rotary(qkv, qkv_width, T, L->num_heads, hd, S->positions, L->cos_cache, L->sin_cache);
    rotary(qkv + q_size, qkv_width, T, L->num_kv_heads, hd, S->positions, L->cos_cache, L->sin_cache);
    for (int64_t t = 0; t < T; t++) {  // this step's K/V into the cache
        kv_store(S->k_cache, S->slots[t] * kv_size, qkv + t * qkv_width + q_size, kv_size, (int)S->kv_f16);
        kv_store(S->v_cache, S->slots[t] * kv_size, qkv + t * qkv_width + q_size + kv_size, kv_size, (int)S->kv_f16);
    }
    paged_attention(qkv, qkv_width, S->k_cache, S->v_cache, (int)S->kv_f16, S->block_size, L->num_heads,
                    L->num_kv_heads, hd, S->seq_ids, S->num_seqs, S->query_start_loc, S->seq_lens, S->block_table,
                    S->max_blocks, L->scale, L->window, attn, num_threads);
    linear(&L->o, attn, T, projected, num_threads);
    rms_norm(projected, H, residual_out, residual_out, L->post_norm, normed, T, H, L->eps, num_threads);
    linear(&L->gate_up, normed, T, gate_up, num_threads);
    silu_and_mul(gate_up, act, T, L->intermediate, num_threads);
    linear(&L->down, act, T, hidden_out, num_threads);

    free(normed), free(qkv), free(attn), free(projected), free(gate_up), free(act);
}

// The ABI check: the sizes of the structs above as this compiler lays them out (the Python side's ctypes
// mirrors must match): out[0..2] = sizeof(Q4Linear), sizeof(DecoderLayer), sizeof(DecodeStep).
void ember_struct_sizes(int64_t* out)
{
    out[0] = (int64_t)sizeof(Q4Linear), out[1] = (int64_t)sizeof(DecoderLayer), out[2] = (int64_t)sizeof(DecodeStep);
}
