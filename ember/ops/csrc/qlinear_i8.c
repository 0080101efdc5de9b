// The 4-bit matmul with int8 activations (AVX512-VNNI): out[M][N] = x[M][K] W^T with each row of x quantized
// per block of 32 inputs to int8 (x ~ dx * qx, the scale from the block's largest |x|: llama.cpp's Q8_1), so
// that a block's products are integer dot products (vpdpbusd: 64 multiply-adds an instruction, against 16 for
// a float32 FMA) and the float math is two FMAs per block:
//   sum over the block of w x = d * dx * sum(q qx) + m * dx * sum(qx)     (w = d * q + m, GGUF Q4_1)
// About twice the float32 path's speed at every row count here (benchmarks/NOTES.md); the price is x's
// rounding to 8 bits (~0.5% relative error in an output, like llama.cpp's).
//
// Weight layout, 16 output columns a group (one vector of 16 int32 lanes, one per column):
//   qs [N/16][K/32][4 s][16 c][4 i] bytes: column c's input 4s + i in the low nibble, 16 + 4s + i in the high,
//   so a 64-byte row masked (or shifted) is vpdpbusd's operand for 4 inputs of 16 columns;
//   d, m [N/16][K/32][16 c] float32, as qlinear.c's.
// Integer sums are exact and each output's float FMAs run in block order whatever the tile, so a row's
// result does not depend on the other rows of the batch.
//
// The 8-bit matmul (q8_i8_linear: the LM head, --quantize int8) takes the same int8 rows. Its weight is
// symmetric int8 per output column (w = scale * q), stored offset to unsigned (q + 128: vpdpbusd's unsigned
// operand) as qs [N/16][K/4][16 c][4 i]; a block's integer sum starts at -128 * sum(qx), the offset's share:
//   sum over the inputs of w x = scale * sum over blocks of dx * (sum((q + 128) qx) - 128 * sum(qx))
#include <stdint.h>
#include <stdlib.h>

#define TILE_ROWS 4
#define TILE_VECS 3  // 16-column groups per tile

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

int q4_i8_supported(void) { return 1; }

// Tiles a dynamic-schedule chunk takes: ~8 chunks a thread. Dynamic, so that a thread slowed by another
// process on its core (the server's event loop) takes fewer; not one tile a chunk, as each chunk is an atomic
// add on a counter the cores share (~140 ns here: 14% of a prompt's time at one tile a chunk).
static int64_t work_chunk(int64_t tiles, int num_threads)
{
    const int64_t chunk = tiles / (8 * (int64_t)num_threads);
    return chunk > 1 ? chunk : 1;
}

// x's rows as int8 per block of 32 (xq [M][K]), each block's scale dx (xd [M][K/32]) and dx * sum(qx) (xs).
static void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* xd, float* xs, int num_threads)
{
    const int64_t nb = K / 32;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (M >= 16)
    for (int64_t r = 0; r < M; r++)
        for (int64_t b = 0; b < nb; b++) {
            const float* p = x + r * K + b * 32;
            const __m512 lo = _mm512_loadu_ps(p), hi = _mm512_loadu_ps(p + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
            _mm_storeu_si128((__m128i*)(xq + r * K + b * 32), _mm512_cvtsepi32_epi8(qlo));
            _mm_storeu_si128((__m128i*)(xq + r * K + b * 32 + 16), _mm512_cvtsepi32_epi8(qhi));
            const float dx = amax / 127.0f;
            xd[r * nb + b] = dx;
            xs[r * nb + b] = dx * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
        }
}

// R rows x V column groups from group g. R and V are constants at every call site (registers).
static inline __attribute__((always_inline)) void tile(const int8_t* xq, const float* xd, const float* xs, int64_t K,
                                                       const int R, const int V, const uint8_t* qs, const float* d,
                                                       const float* m, int64_t g, float* out, int64_t N)
{
    const int64_t nb = K / 32;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    __m512 acc[TILE_ROWS][TILE_VECS];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i dots[TILE_ROWS][TILE_VECS];
        for (int r = 0; r < R; r++)
            for (int v = 0; v < V; v++) dots[r][v] = _mm512_setzero_si512();
        for (int s = 0; s < 4; s++) {
            __m512i w_lo[TILE_VECS], w_hi[TILE_VECS];
            for (int v = 0; v < V; v++) {
                const __m512i raw = _mm512_loadu_si512((const void*)(qs + ((g + v) * nb + b) * 256 + s * 64));
                w_lo[v] = _mm512_and_si512(raw, nibble);
                w_hi[v] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
            }
            for (int r = 0; r < R; r++) {
                const int8_t* xb = xq + r * K + b * 32 + 4 * s;
                const __m512i x_lo = _mm512_set1_epi32(*(const int32_t*)xb), x_hi = _mm512_set1_epi32(*(const int32_t*)(xb + 16));
                for (int v = 0; v < V; v++)
                    dots[r][v] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dots[r][v], w_lo[v], x_lo), w_hi[v], x_hi);
            }
        }
        for (int v = 0; v < V; v++) {
            const __m512 dv = _mm512_loadu_ps(d + ((g + v) * nb + b) * 16), mv = _mm512_loadu_ps(m + ((g + v) * nb + b) * 16);
            for (int r = 0; r < R; r++) {
                const __m512 scale = _mm512_mul_ps(dv, _mm512_set1_ps(xd[r * nb + b]));
                acc[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r][v]), scale, acc[r][v]);
                acc[r][v] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xs[r * nb + b]), acc[r][v]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) _mm512_storeu_ps(out + r * N + (g + v) * 16, acc[r][v]);
}

#define TILE_COLS(R)                                                       \
    do {                                                                   \
        if (V == 3) tile(xr, dr, sr, K, R, 3, qs, d, m, g, o, N);          \
        else if (V == 2) tile(xr, dr, sr, K, R, 2, qs, d, m, g, o, N);     \
        else tile(xr, dr, sr, K, R, 1, qs, d, m, g, o, N);                 \
    } while (0)

void q4_i8_linear(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, const float* m, int64_t N,
                  float* out, int num_threads)
{
    const int64_t nb = K / 32, groups = N / 16;
    int8_t* xq = malloc(M * K);
    float* xd = malloc(M * nb * sizeof(float));
    float* xs = malloc(M * nb * sizeof(float));
    quantize_rows(x, M, K, xq, xd, xs, num_threads);
    const int64_t row_tiles = (M + TILE_ROWS - 1) / TILE_ROWS, col_tiles = (groups + TILE_VECS - 1) / TILE_VECS;
    const int64_t tiles = row_tiles * col_tiles, chunk = work_chunk(tiles, num_threads);
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, chunk)
    for (int64_t i = 0; i < tiles; i++) {  // a chunk sweeps column tiles for one row tile (x's rows stay in cache)
        const int64_t r = i / col_tiles * TILE_ROWS, g = i % col_tiles * TILE_VECS;
        const int64_t R = M - r < TILE_ROWS ? M - r : TILE_ROWS, V = groups - g < TILE_VECS ? groups - g : TILE_VECS;
        const int8_t* xr = xq + r * K;
        const float *dr = xd + r * nb, *sr = xs + r * nb;
        float* o = out + r * N;
        switch (R) {
        case 4: TILE_COLS(4); break;
        case 3: TILE_COLS(3); break;
        case 2: TILE_COLS(2); break;
        default: TILE_COLS(1); break;
        }
    }
    free(xq), free(xd), free(xs);
}

// q8: R rows x V column groups from group g; xsum [M][K/32]: each block's sum(qx).
static inline __attribute__((always_inline)) void tile_q8(const int8_t* xq, const float* xd, const int32_t* xsum,
                                                          int64_t K, const int R, const int V, const uint8_t* qs,
                                                          const float* scale, int64_t g, float* out, int64_t N)
{
    const int64_t nb = K / 32;
    __m512 acc[TILE_ROWS][TILE_VECS];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i dots[TILE_ROWS][TILE_VECS];
        for (int r = 0; r < R; r++)
            for (int v = 0; v < V; v++) dots[r][v] = _mm512_set1_epi32(-128 * xsum[r * nb + b]);
        for (int s = 0; s < 8; s++) {
            __m512i w[TILE_VECS];
            for (int v = 0; v < V; v++) w[v] = _mm512_loadu_si512((const void*)(qs + ((g + v) * (K / 4) + b * 8 + s) * 64));
            for (int r = 0; r < R; r++) {
                const __m512i xb = _mm512_set1_epi32(*(const int32_t*)(xq + r * K + b * 32 + 4 * s));
                for (int v = 0; v < V; v++) dots[r][v] = _mm512_dpbusd_epi32(dots[r][v], w[v], xb);
            }
        }
        for (int r = 0; r < R; r++) {
            const __m512 dx = _mm512_set1_ps(xd[r * nb + b]);
            for (int v = 0; v < V; v++) acc[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r][v]), dx, acc[r][v]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++)
            _mm512_storeu_ps(out + r * N + (g + v) * 16, _mm512_mul_ps(acc[r][v], _mm512_loadu_ps(scale + (g + v) * 16)));
}

#define TILE_COLS_Q8(R)                                                        \
    do {                                                                       \
        if (V == 3) tile_q8(xr, dr, cr, K, R, 3, qs, scale, g, o, N);          \
        else if (V == 2) tile_q8(xr, dr, cr, K, R, 2, qs, scale, g, o, N);     \
        else tile_q8(xr, dr, cr, K, R, 1, qs, scale, g, o, N);                 \
    } while (0)

void q8_i8_linear(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* scale, int64_t N, float* out,
                  int num_threads)
{
    const int64_t nb = K / 32, groups = N / 16;
    int8_t* xq = malloc(M * K);
    float* xd = malloc(M * nb * sizeof(float));
    float* xs = malloc(M * nb * sizeof(float));
    int32_t* xsum = malloc(M * nb * sizeof(int32_t));
    quantize_rows(x, M, K, xq, xd, xs, num_threads);
    for (int64_t i = 0; i < M * nb; i++) {
        int32_t sum = 0;
        for (int j = 0; j < 32; j++) sum += xq[i * 32 + j];
        xsum[i] = sum;
    }
    const int64_t row_tiles = (M + TILE_ROWS - 1) / TILE_ROWS, col_tiles = (groups + TILE_VECS - 1) / TILE_VECS;
    const int64_t tiles = row_tiles * col_tiles, chunk = work_chunk(tiles, num_threads);
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, chunk)
    for (int64_t i = 0; i < tiles; i++) {  // a chunk sweeps row tiles for one column tile (its weights stay in cache)
        const int64_t r = i % row_tiles * TILE_ROWS, g = i / row_tiles * TILE_VECS;
        const int64_t R = M - r < TILE_ROWS ? M - r : TILE_ROWS, V = groups - g < TILE_VECS ? groups - g : TILE_VECS;
        const int8_t* xr = xq + r * K;
        const float* dr = xd + r * nb;
        const int32_t* cr = xsum + r * nb;
        float* o = out + r * N;
        switch (R) {
        case 4: TILE_COLS_Q8(4); break;
        case 3: TILE_COLS_Q8(3); break;
        case 2: TILE_COLS_Q8(2); break;
        default: TILE_COLS_Q8(1); break;
        }
    }
    free(xq), free(xd), free(xs), free(xsum);
}

#else  // no VNNI: callers check q4_i8_supported() and keep float32 activations

int q4_i8_supported(void) { return 0; }

void q4_i8_linear(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, const float* m, int64_t N,
                  float* out, int num_threads)
{
    (void)x, (void)M, (void)K, (void)qs, (void)d, (void)m, (void)N, (void)out, (void)num_threads;
    abort();
}

void q8_i8_linear(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* scale, int64_t N, float* out,
                  int num_threads)
{
    (void)x, (void)M, (void)K, (void)qs, (void)scale, (void)N, (void)out, (void)num_threads;
    abort();
}
#endif
