// Weight-only quantized matmuls for the CPU path: out[M][N] = x[M][K] W^T, float32 activations and
// accumulation, the weight read at 4 or 8 bits. PyTorch's packed kernels want bfloat16 activations and
// re-read the weight for every row; these dequantize each block once per call (per chunk of rows):
//  - up to DIRECT_MAX_ROWS rows (decode), into registers, applied to the rows at hand;
//  - beyond, into a float32 panel of PANEL_VECS x 16 columns in cache, which a register tile (AVX-512: 8 rows
//    x 48 columns; AVX2: 6 x 16; isa_*.h) sweeps over the rows (x broadcast, the panel's rows as vectors: a
//    GEMM micro-kernel), so batches and prompts run at GEMM speed on the 4-bit weight.
//
// The weight is stored in groups of 16 output columns, so that one vector holds one input's weights for
// 16 columns (the outputs are vectors: no horizontal sums):
// q4: blocks of 32 inputs, w = d * q + m with q in 0..15 (GGUF Q4_1's quantization).
//     qs [N/16][K/32][16 j][16 c]: byte (j, c) holds column c's input j in its low nibble, input j + 16 in
//     its high one; d and m [N/16][K/32][16 c] float32 (float16 values: a GGUF block's own).
// q8: w = scale * q with q int8 per output column; qs [N/16][K][16 c], scale [N] applied after the sum.
// N a multiple of 16 (the caller pads), K a multiple of 32.
//
// Every output is one fused multiply-add chain over its inputs in one fixed order (each block's inputs
// j, j + 16 for j = 0..15), whichever path and tile computes it: a row's result does not depend on the other
// rows of the batch, nor on how many there are.
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <omp.h>

#include "isa.h"  // vec (16 float32 lanes), the tile sizes

#define DIRECT_MAX_ROWS 4
#define DIRECT_VECS QL_DIRECT_VECS  // 16-column groups a direct tile
#define PANEL_VECS QL_PANEL_VECS  // 16-column groups per panel
#define TILE_ROWS QL_TILE_ROWS  // rows a panel tile (<= 8)
#define X_CHUNK_BYTES (4096 * 1024)  // rows of x swept per dequantized panel (measured: no gain from less)

// Tiles are instantiated per row and column count so their accumulators live in registers.
#define TILE ISA_TILE

// The weights of block b, inputs j and j + 16, for 16-column group g.
TILE void weight_pair(int q8, const void* qs, const float* d, const float* m, int64_t K, int64_t g, int64_t b, int j,
                      vec* lo, vec* hi)
{
    const int64_t nb = K / 32;
    if (q8) {
        const int8_t* q = (const int8_t*)qs + (g * K + b * 32) * 16;
        *lo = q8_row(q + j * 16), *hi = q8_row(q + (j + 16) * 16);
    } else {
        const int64_t blk = g * nb + b;
        q4_pair((const uint8_t*)qs + blk * 256 + j * 16, LOAD(d + blk * 16), LOAD(m + blk * 16), lo, hi);
    }
}

// Direct path: R rows x V column groups (16 columns each) from group g, each weight pair dequantized into
// registers once for the R rows. R and V are constants at every call site, so the accumulators stay in registers.
TILE void direct_tile(int q8, const float* x, int64_t K, const int R, const int V, const void* qs, const float* d,
                      const float* m, int64_t g, float* out, int64_t N)
{
    vec acc[DIRECT_MAX_ROWS][DIRECT_VECS];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) acc[r][v] = ZERO();
    for (int64_t b = 0; b < K / 32; b++)
        for (int j = 0; j < 16; j++) {
            vec lo[DIRECT_VECS], hi[DIRECT_VECS];
            for (int v = 0; v < V; v++) weight_pair(q8, qs, d, m, K, g + v, b, j, &lo[v], &hi[v]);
            for (int r = 0; r < R; r++) {
                const vec x_lo = BCAST(x + r * K + b * 32 + j), x_hi = BCAST(x + r * K + b * 32 + 16 + j);
                for (int v = 0; v < V; v++) acc[r][v] = FMA(hi[v], x_hi, FMA(lo[v], x_lo, acc[r][v]));
            }
        }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) STORE(out + r * N + (g + v) * 16, acc[r][v]);
}

#define DIRECT_COLS(R)                                                                        \
    do {                                                                                      \
        if (DIRECT_VECS >= 4 && V == 4) direct_tile(q8, x, K, R, 4, qs, d, m, g, out, N);     \
        else if (DIRECT_VECS >= 3 && V == 3) direct_tile(q8, x, K, R, 3, qs, d, m, g, out, N); \
        else if (DIRECT_VECS >= 2 && V == 2) direct_tile(q8, x, K, R, 2, qs, d, m, g, out, N); \
        else direct_tile(q8, x, K, R, 1, qs, d, m, g, out, N);                                \
    } while (0)

static void direct(int q8, const float* x, int64_t M, int64_t K, const void* qs, const float* d, const float* m,
                   int64_t N, float* out, int num_threads)
{
    const int64_t groups = N / 16;
#pragma omp parallel num_threads(num_threads)
    {  // each thread an equal run of 16-column groups (to a group), taken DIRECT_VECS at a time
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t end = groups * (t + 1) / T;
        for (int64_t g = groups * t / T; g < end; g += DIRECT_VECS) {
            const int64_t V = end - g < DIRECT_VECS ? end - g : DIRECT_VECS;
            switch (M) {
            case 4: DIRECT_COLS(4); break;
            case 3: DIRECT_COLS(3); break;
            case 2: DIRECT_COLS(2); break;
            default: DIRECT_COLS(1); break;
            }
        }
    }
}

// Panel path: R rows x V groups of a dequantized panel (w [K][PANEL_VECS * 16] float32, input order as
// stored: per block, rows 2j and 2j + 1 hold inputs j and j + 16).
TILE void panel_tile(const float* x, int64_t K, const int R, const int V, const float* w, float* out, int64_t N)
{
    vec acc[TILE_ROWS][PANEL_VECS];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) acc[r][v] = ZERO();
    for (int64_t b = 0; b < K / 32; b++)
        for (int j = 0; j < 16; j++) {
            const float* wj = w + (b * 32 + 2 * j) * PANEL_VECS * 16;
            vec lo[PANEL_VECS], hi[PANEL_VECS];
            for (int v = 0; v < V; v++) lo[v] = LOAD(wj + v * 16);
            for (int r = 0; r < R; r++) {
                const vec xr = BCAST(x + r * K + b * 32 + j);
                for (int v = 0; v < V; v++) acc[r][v] = FMA(lo[v], xr, acc[r][v]);
            }
            for (int v = 0; v < V; v++) hi[v] = LOAD(wj + PANEL_VECS * 16 + v * 16);
            for (int r = 0; r < R; r++) {
                const vec xr = BCAST(x + r * K + b * 32 + 16 + j);
                for (int v = 0; v < V; v++) acc[r][v] = FMA(hi[v], xr, acc[r][v]);
            }
        }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) STORE(out + r * N + v * 16, acc[r][v]);
}

#define PANEL_COLS(R)                                                              \
    do {                                                                           \
        if (PANEL_VECS >= 3 && V == 3) panel_tile(xr, K, R, 3, w, o, N);          \
        else if (PANEL_VECS >= 2 && V == 2) panel_tile(xr, K, R, 2, w, o, N);     \
        else panel_tile(xr, K, R, 1, w, o, N);                                     \
    } while (0)

// Rows [r0, r1) against a panel of V groups.
static void sweep_panel(const float* x, int64_t r0, int64_t r1, int64_t K, const float* w, int V, float* out,
                        int64_t N)
{
    for (int64_t r = r0; r < r1; r += TILE_ROWS) {
        const int64_t R = r1 - r < TILE_ROWS ? r1 - r : TILE_ROWS;
        const float* xr = x + r * K;
        float* o = out + r * N;
        switch (R) {
        case 8: if (TILE_ROWS >= 8) PANEL_COLS(8); break;
        case 7: if (TILE_ROWS >= 7) PANEL_COLS(7); break;
        case 6: if (TILE_ROWS >= 6) PANEL_COLS(6); break;
        case 5: if (TILE_ROWS >= 5) PANEL_COLS(5); break;
        case 4: if (TILE_ROWS >= 4) PANEL_COLS(4); break;
        case 3: if (TILE_ROWS >= 3) PANEL_COLS(3); break;
        case 2: if (TILE_ROWS >= 2) PANEL_COLS(2); break;
        default: PANEL_COLS(1); break;
        }
    }
}

static void panels(int q8, const float* x, int64_t M, int64_t K, const void* qs, const float* d, const float* m,
                   int64_t N, float* out, int num_threads)
{
    const int64_t groups = N / 16, num_panels = (groups + PANEL_VECS - 1) / PANEL_VECS, width = PANEL_VECS * 16;
    int64_t chunk = X_CHUNK_BYTES / (K * (int64_t)sizeof(float)) / TILE_ROWS * TILE_ROWS;
    if (chunk < TILE_ROWS) chunk = TILE_ROWS;
#pragma omp parallel num_threads(num_threads)
    {
        float* w = aligned_alloc(64, K * width * sizeof(float));
        for (int64_t r0 = 0; r0 < M; r0 += chunk) {
            const int64_t r1 = r0 + chunk < M ? r0 + chunk : M;
#pragma omp for schedule(static) nowait
            for (int64_t p = 0; p < num_panels; p++) {
                const int64_t g = p * PANEL_VECS, V = groups - g < PANEL_VECS ? groups - g : PANEL_VECS;
                for (int64_t v = 0; v < V; v++)
                    for (int64_t b = 0; b < K / 32; b++)
                        for (int j = 0; j < 16; j++) {
                            vec lo, hi;
                            weight_pair(q8, qs, d, m, K, g + v, b, j, &lo, &hi);
                            STORE(w + (b * 32 + 2 * j) * width + v * 16, lo);
                            STORE(w + (b * 32 + 2 * j + 1) * width + v * 16, hi);
                        }
                sweep_panel(x, r0, r1, K, w, (int)V, out + g * 16, N);
            }
        }
        free(w);
    }
}

static void matmul(int q8, const float* x, int64_t M, int64_t K, const void* qs, const float* d, const float* m,
                   int64_t N, float* out, int num_threads)
{
    if (M <= DIRECT_MAX_ROWS) direct(q8, x, M, K, qs, d, m, N, out, num_threads);
    else panels(q8, x, M, K, qs, d, m, N, out, num_threads);
}

void q4_linear(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, const float* m,
               int64_t N, float* out, int num_threads)
{
    matmul(0, x, M, K, qs, d, m, N, out, num_threads);
}

// out = (x qs^T) * scale: the per-column scale applied once per output element, after the sum.
void q8_linear(const float* x, int64_t M, int64_t K, const int8_t* qs, const float* scale, int64_t N, float* out,
               int num_threads)
{
    matmul(1, x, M, K, qs, NULL, NULL, N, out, num_threads);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < M; r++)
        for (int64_t n = 0; n < N; n++) out[r * N + n] *= scale[n];
}
