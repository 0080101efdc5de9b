// The decode step's small float32 ops, one call each instead of PyTorch's several (a decode step of a
// small model is bound by per-op overhead). Rows are independent; each matches its torch counterpart in
// ember/layers to float32 rounding (summation order differs).
#include <stdint.h>

#include "vector_math.h"

// out = weight * x / sqrt(mean(x^2) + eps) per row of H; with residual (non-NULL): the row is x + residual,
// also written to residual_out. Rows at x + row * x_stride (contiguous within a row).
void rms_norm(const float* x, int64_t x_stride, const float* residual, float* residual_out, const float* weight,
              float* out, int64_t M, int64_t H, float eps, int num_threads)
{
#pragma omp parallel for num_threads(num_threads) schedule(static) if (M * H >= 32768)
    for (int64_t r = 0; r < M; r++) {
        const float* xr = x + r * x_stride;
        float* o = out + r * H;
        const float* h = xr;
        if (residual) {
            float* s = residual_out + r * H;
#pragma omp simd
            for (int64_t i = 0; i < H; i++) s[i] = xr[i] + residual[r * H + i];
            h = s;
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < H; i++) sum += h[i] * h[i];
        const float inv = 1.0f / sqrtf(sum / (float)H + eps);
#pragma omp simd
        for (int64_t i = 0; i < H; i++) o[i] = weight[i] * (h[i] * inv);
    }
}

// out[r] = silu(x[r][:d]) * x[r][d:]
void silu_and_mul(const float* x, float* out, int64_t M, int64_t d, int num_threads)
{
#pragma omp parallel for num_threads(num_threads) schedule(static) if (M * d >= 16384)
    for (int64_t r = 0; r < M; r++) {
        const float* gate = x + r * 2 * d;
        const float* up = gate + d;
#pragma omp simd
        for (int64_t i = 0; i < d; i++) out[r * d + i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

// Rotary embedding (HF rotate_half layout) in place on num_heads heads of head_dim at x + t * token_stride
// + h * head_dim, for token t at positions[t]; cos / sin caches [max_position][head_dim / 2].
void rotary(float* x, int64_t token_stride, int64_t num_tokens, int64_t num_heads, int64_t head_dim,
            const int64_t* positions, const float* cos_cache, const float* sin_cache)
{
    const int64_t half = head_dim / 2;
    for (int64_t t = 0; t < num_tokens; t++) {
        const float* c = cos_cache + positions[t] * half;
        const float* s = sin_cache + positions[t] * half;
        for (int64_t h = 0; h < num_heads; h++) {
            float* x1 = x + t * token_stride + h * head_dim;
            float* x2 = x1 + half;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float a = x1[i], b = x2[i];
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
    }
}
