// Weight-only quantized matmuls for the CPU decode path: out[M][N] = x[M][K] W^T (+ bias), float32
// activations and accumulation, the weight read at 4 or 8 bits. PyTorch's packed kernels want bfloat16
// activations and re-read the weight for every row; these dequantize a block once into registers and
// apply it to a tile of rows, so small batches cost little more than one row.
//
// q4: blocks of 32 inputs, w = d * q + m with q in 0..15 (GGUF Q4_1's layout: byte i of a block holds
//     element i in its low nibble and element i + 16 in its high one); qs [N][K/2], d and m [N][K/32] float32
//     (float16 would save bytes, but converting it costs more than reading them: the kernel is compute-bound).
// q8: w = scale * q with q int8 per output channel; qs [N][K], scale [N]. K a multiple of 32.
//
// Every output element is summed in the same order whatever the tile it falls in (two 16-lane partial
// sums, low and high halves of each block, added then reduced), so a row's result does not depend on
// the other rows of the batch.
#include <stddef.h>
#include <stdint.h>

#if defined(__AVX512F__)
#include <immintrin.h>

// The weight's 32 values of block b, column c, as two 16-lane vectors.
static inline __attribute__((always_inline)) void q4_block(const uint8_t* qs, const float* d, const float* m,
                                                           __m512* lo, __m512* hi)
{
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)qs));  // byte i in lane i
    const __m512 vd = _mm512_set1_ps(*d), vm = _mm512_set1_ps(*m);
    *lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0x0F))), vd, vm);
    *hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), vd, vm);
}

static inline __attribute__((always_inline)) void q8_block(const int8_t* qs, __m512* lo, __m512* hi)
{
    *lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)qs)));
    *hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(qs + 16))));
}

// R rows x C columns over the whole of K. R and C are constants at every call site, so the unrolled
// accumulators (2 R C vectors) stay in registers; C columns share each load of x, R rows each dequantized block.
static inline __attribute__((always_inline)) void tile(
    int q8, const float* x, int64_t K, const int R, const int C, const uint8_t* qs, const float* d,
    const float* m, float* out, int64_t N)
{
    const int64_t nb = K / 32;
    __m512 acc_lo[4][4], acc_hi[4][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc_lo[r][c] = acc_hi[r][c] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512 w_lo[4], w_hi[4];
        for (int c = 0; c < C; c++) {
            if (q8) q8_block((const int8_t*)qs + c * K + b * 32, &w_lo[c], &w_hi[c]);
            else q4_block(qs + (c * nb + b) * 16, d + c * nb + b, m + c * nb + b, &w_lo[c], &w_hi[c]);
        }
        for (int r = 0; r < R; r++) {
            const __m512 x_lo = _mm512_loadu_ps(x + r * K + b * 32), x_hi = _mm512_loadu_ps(x + r * K + b * 32 + 16);
            for (int c = 0; c < C; c++) {
                acc_lo[r][c] = _mm512_fmadd_ps(w_lo[c], x_lo, acc_lo[r][c]);
                acc_hi[r][c] = _mm512_fmadd_ps(w_hi[c], x_hi, acc_hi[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[r * N + c] = _mm512_reduce_add_ps(_mm512_add_ps(acc_lo[r][c], acc_hi[r][c]));
}

#else  // portable C, same arithmetic order; the compiler vectorises what it can

static inline void tile(int q8, const float* x, int64_t K, const int R, const int C, const uint8_t* qs,
                        const float* d, const float* m, float* out, int64_t N)
{
    const int64_t nb = K / 32;
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float lo[16] = {0}, hi[16] = {0};
            for (int64_t b = 0; b < nb; b++)
                for (int i = 0; i < 16; i++) {
                    float w_lo, w_hi;
                    if (q8) {
                        w_lo = ((const int8_t*)qs)[c * K + b * 32 + i];
                        w_hi = ((const int8_t*)qs)[c * K + b * 32 + 16 + i];
                    } else {
                        const uint8_t byte = qs[(c * nb + b) * 16 + i];
                        w_lo = (float)(byte & 0x0F) * d[c * nb + b] + m[c * nb + b];
                        w_hi = (float)(byte >> 4) * d[c * nb + b] + m[c * nb + b];
                    }
                    lo[i] += w_lo * x[r * K + b * 32 + i];
                    hi[i] += w_hi * x[r * K + b * 32 + 16 + i];
                }
            float s = 0.0f;
            for (int i = 0; i < 16; i++) s += lo[i] + hi[i];
            out[r * N + c] = s;
        }
}
#endif

// Output columns in groups of 4, split across threads (each thread streams its share of the weight once);
// within a group, rows in tiles of 4 (as two 4 x 2 tiles), then 2 and 1 (4 columns each).
static void matmul(int q8, const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, const float* m,
                   int64_t N, float* out, int num_threads)
{
    const int64_t nb = K / 32;
    const int64_t col_bytes = q8 ? K : nb * 16;  // one column's weight bytes
    const int64_t groups = (N + 3) / 4;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t n = g * 4;
        const uint8_t* q = qs + n * col_bytes;
        const float* dn = q8 ? NULL : d + n * nb;
        const float* mn = q8 ? NULL : m + n * nb;
        if (n + 4 > N) {  // the last, partial group: a column at a time
            for (int64_t c = n; c < N; c++)
                for (int64_t r = 0; r < M; r++)
                    tile(q8, x + r * K, K, 1, 1, qs + c * col_bytes, q8 ? NULL : d + c * nb, q8 ? NULL : m + c * nb,
                         out + r * N + c, N);
            continue;
        }
        int64_t r = 0;
        for (; r + 4 <= M; r += 4) {
            tile(q8, x + r * K, K, 4, 2, q, dn, mn, out + r * N + n, N);
            tile(q8, x + r * K, K, 4, 2, q + 2 * col_bytes, q8 ? NULL : dn + 2 * nb, q8 ? NULL : mn + 2 * nb,
                 out + r * N + n + 2, N);
        }
        for (; r + 2 <= M; r += 2) tile(q8, x + r * K, K, 2, 4, q, dn, mn, out + r * N + n, N);
        if (r < M) tile(q8, x + r * K, K, 1, 4, q, dn, mn, out + r * N + n, N);
    }
}

void q4_linear(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, const float* m,
               int64_t N, float* out, int num_threads)
{
    matmul(0, x, M, K, qs, d, m, N, out, num_threads);
}

// out = (x qs^T) * scale: the per-channel scale applied once per output element, after the sum.
void q8_linear(const float* x, int64_t M, int64_t K, const int8_t* qs, const float* scale, int64_t N, float* out,
               int num_threads)
{
    matmul(1, x, M, K, (const uint8_t*)qs, NULL, NULL, N, out, num_threads);
    for (int64_t i = 0; i < M * N; i++) out[i] *= scale[i % N];
}
