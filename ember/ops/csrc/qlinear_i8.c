// The quantized matmuls with int8 activations: out[M][N] = x[M][K] W^T with each row of x quantized per block
// of 32 inputs to int8 (x ~ dx * qx, the scale from the block's largest |x|: llama.cpp's Q8_1), so that a
// block's products are integer dot products (AVX512-VNNI vpdpbusd: 64 multiply-adds an instruction, against 16
// for a float32 FMA; AVX2 vpmaddubsw + vpmaddwd; the primitives per ISA in isa_*.h) and the float math is one
// or two FMAs per block. About twice the float32 path's speed (benchmarks/NOTES.md); the price is x's rounding
// to 8 bits (~0.5% relative error in an output, like llama.cpp's). x's int8 values and scales are the same
// bits on every ISA (quantize_block), and so are the integer sums: builds differ at most in float rounding.
//
// q4_i8_linear, the 4-bit weight (GGUF Q4_1: w = d * q + m, q in 0..15):
//   sum over the block of w x = d * dx * sum(q qx) + m * dx * sum(qx)
//   qs [N/16][K/32][4 s][16 c][4 i] bytes: column c's input 4s + i in the low nibble, 16 + 4s + i in the high,
//   so a 64-byte row masked (or shifted) is vpdpbusd's operand for 4 inputs of 16 columns;
//   d, m [N/16][K/32][16 c] float32, as qlinear.c's.
// q8_i8_linear, the 8-bit weight (the LM head, --quantize int8): symmetric int8 per output column
//   (w = scale * q), stored offset to unsigned (q + 128: vpdpbusd's unsigned operand) as
//   qs [N/16][K/32][8 s][16 c][4 i] (column c's input 4s + i; = [N/16][K/4][16 c][4 i]), scale [N] float32:
//   sum over the inputs of w x = scale * sum over blocks of dx * sum(q qx)
//   (with vpdpbusd a block's integer sum starts at -128 * sum(qx), the offset's share).
// q8_0_i8_linear, GGUF Q8_0 as it is (w = d * q per block of 32, q int8, d float16): llama.cpp's Q8_0 x Q8_0.
//   qs as q8_i8_linear's (q + 128, [N/16][K/32][8 s][16 c][4 i]); d [N/16][K/32][16 c] float32:
//   sum over the inputs of w x = sum over blocks of (d * dx) * sum(q qx)
// N a multiple of 16 (the caller pads), K a multiple of 32.
//
// Integer sums are exact and each output's float FMAs run in block order whatever the tile, so a row's
// result does not depend on the other rows of the batch (nor on the ISA's tile sizes).
#include <stdint.h>
#include <stdlib.h>

#include "isa.h"

#define TILE_ROWS I8_TILE_ROWS  // <= 4
#define TILE_VECS I8_TILE_VECS  // 16-column groups per tile, <= 3

int q4_i8_supported(void) { return ISA_INT8_VECTOR; }

// Tiles a dynamic-schedule chunk takes: ~8 chunks a thread. Dynamic, so that a thread slowed by another
// process on its core (the server's event loop) takes fewer; not one tile a chunk, as each chunk is an atomic
// add on a counter the cores share (~140 ns here: 14% of a prompt's time at one tile a chunk).
static int64_t work_chunk(int64_t tiles, int num_threads)
{
    const int64_t chunk = tiles / (8 * (int64_t)num_threads);
    return chunk > 1 ? chunk : 1;
}

// x's rows as int8 per block of 32 (xq [M][K]), each block's scale dx (xd [M][K/32]), dx * sum(qx) (xs) and
// sum(qx) (xsum; either may be NULL).
static void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* xd, float* xs, int32_t* xsum,
                          int num_threads)
{
    const int64_t nb = K / 32;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (M >= 16)
    for (int64_t r = 0; r < M; r++)
        for (int64_t b = 0; b < nb; b++) {
            float dx;
            int32_t sum;
            quantize_block(x + r * K + b * 32, xq + r * K + b * 32, &dx, &sum);
            xd[r * nb + b] = dx;
            if (xs) xs[r * nb + b] = dx * (float)sum;
            if (xsum) xsum[r * nb + b] = sum;
        }
}

// R rows x V column groups from group g. R and V are constants at every call site (registers).
ISA_TILE void tile(const int8_t* xq, const float* xd, const float* xs, int64_t K, const int R, const int V,
                   const uint8_t* qs, const float* d, const float* m, int64_t g, float* out, int64_t N)
{
    const int64_t nb = K / 32;
    vec acc[TILE_ROWS][TILE_VECS];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) acc[r][v] = ZERO();
    for (int64_t b = 0; b < nb; b++) {
        dacc dots[TILE_ROWS][TILE_VECS];  // 8 DOT_U4 a block: within dacc's range
        for (int r = 0; r < R; r++)
            for (int v = 0; v < V; v++) dots[r][v] = DACC_ZERO();
        for (int s = 0; s < 4; s++) {
            bvec w_lo[TILE_VECS], w_hi[TILE_VECS];
            for (int v = 0; v < V; v++) {
                const bvec raw = B_LOAD(qs + ((g + v) * nb + b) * 256 + s * 64);
                w_lo[v] = B_LO(raw), w_hi[v] = B_HI(raw);
            }
            for (int r = 0; r < R; r++) {
                const int8_t* xb = xq + r * K + b * 32 + 4 * s;
                const xvec x_lo = X_BCAST4(xb), x_hi = X_BCAST4(xb + 16);
                for (int v = 0; v < V; v++) dots[r][v] = DOT_U4(DOT_U4(dots[r][v], w_lo[v], x_lo), w_hi[v], x_hi);
            }
        }
        for (int v = 0; v < V; v++) {
            const vec dv = LOAD(d + ((g + v) * nb + b) * 16), mv = LOAD(m + ((g + v) * nb + b) * 16);
            for (int r = 0; r < R; r++) {
                const vec scale = MUL(dv, BCAST(xd + r * nb + b));
                acc[r][v] = FMA(I32_TO_F(DACC_SUM(dots[r][v])), scale, acc[r][v]);
                acc[r][v] = FMA(mv, BCAST(xs + r * nb + b), acc[r][v]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) STORE(out + r * N + (g + v) * 16, acc[r][v]);
}

// The tile for R rows (a constant) and V column groups (a variable, <= TILE_VECS).
#define TILE_COLS(R, call)                                        \
    do {                                                          \
        if (TILE_VECS >= 3 && V == 3) call(R, 3);                 \
        else if (TILE_VECS >= 2 && V == 2) call(R, 2);            \
        else call(R, 1);                                          \
    } while (0)
#define TILE_SHAPE(call)                                          \
    do {                                                          \
        if (TILE_ROWS >= 4 && R == 4) TILE_COLS(4, call);         \
        else if (TILE_ROWS >= 3 && R == 3) TILE_COLS(3, call);    \
        else if (TILE_ROWS >= 2 && R == 2) TILE_COLS(2, call);    \
        else TILE_COLS(1, call);                                  \
    } while (0)

#define Q4_TILE(R, V) tile(xr, dr, sr, K, R, V, qs, d, m, g, o, N)

void q4_i8_linear(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, const float* m, int64_t N,
                  float* out, int num_threads)
{
    const int64_t nb = K / 32, groups = N / 16;
    int8_t* xq = malloc(M * K);
    float* xd = malloc(M * nb * sizeof(float));
    float* xs = malloc(M * nb * sizeof(float));
    quantize_rows(x, M, K, xq, xd, xs, NULL, num_threads);
    const int64_t row_tiles = (M + TILE_ROWS - 1) / TILE_ROWS, col_tiles = (groups + TILE_VECS - 1) / TILE_VECS;
    const int64_t tiles = row_tiles * col_tiles, chunk = work_chunk(tiles, num_threads);
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, chunk)
    for (int64_t i = 0; i < tiles; i++) {  // a chunk sweeps column tiles for one row tile (x's rows stay in cache)
        const int64_t r = i / col_tiles * TILE_ROWS, g = i % col_tiles * TILE_VECS;
        const int64_t R = M - r < TILE_ROWS ? M - r : TILE_ROWS, V = groups - g < TILE_VECS ? groups - g : TILE_VECS;
        const int8_t* xr = xq + r * K;
        const float *dr = xd + r * nb, *sr = xs + r * nb;
        float* o = out + r * N;
        TILE_SHAPE(Q4_TILE);
    }
    free(xq), free(xd), free(xs);
}

// 8-bit weights: R rows x V column groups from group g; xsum [M][K/32]: each block's sum(qx). Per column
// scales (q8_i8_linear: `scale` [N], applied after the sum) or per block (q8_0: `bd` [N/16][K/32][16]).
ISA_TILE void tile_q8(const int8_t* xq, const float* xd, const int32_t* xsum, int64_t K, const int R, const int V,
                      const uint8_t* qs, const float* scale, const float* bd, int64_t g, float* out, int64_t N)
{
    const int64_t nb = K / 32;
    vec acc[TILE_ROWS][TILE_VECS];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) acc[r][v] = ZERO();
    for (int64_t b = 0; b < nb; b++) {
        ivec dots[TILE_ROWS][TILE_VECS];
        for (int r = 0; r < R; r++)
            for (int v = 0; v < V; v++) dots[r][v] = Q8_INIT(xsum[r * nb + b]);
        for (int s = 0; s < 8; s++) {
            q8w w[TILE_VECS];
            for (int v = 0; v < V; v++) w[v] = Q8_PREP(B_LOAD(qs + ((g + v) * (K / 4) + b * 8 + s) * 64));
            for (int r = 0; r < R; r++) {
                const xvec xb = X_BCAST4(xq + r * K + b * 32 + 4 * s);
                for (int v = 0; v < V; v++) dots[r][v] = DOT_Q8(dots[r][v], w[v], xb);
            }
        }
        if (bd) {
            for (int v = 0; v < V; v++) {
                const vec dv = LOAD(bd + ((g + v) * nb + b) * 16);
                for (int r = 0; r < R; r++)
                    acc[r][v] = FMA(I32_TO_F(dots[r][v]), MUL(dv, BCAST(xd + r * nb + b)), acc[r][v]);
            }
        } else {
            for (int r = 0; r < R; r++) {
                const vec dx = BCAST(xd + r * nb + b);
                for (int v = 0; v < V; v++) acc[r][v] = FMA(I32_TO_F(dots[r][v]), dx, acc[r][v]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++)
            STORE(out + r * N + (g + v) * 16, scale ? MUL(acc[r][v], LOAD(scale + (g + v) * 16)) : acc[r][v]);
}

#define Q8_TILE(R, V) tile_q8(xr, dr, cr, K, R, V, qs, scale, bd, g, o, N)

static void q8_matmul(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* scale, const float* bd,
                      int64_t N, float* out, int num_threads)
{
    const int64_t nb = K / 32, groups = N / 16;
    int8_t* xq = malloc(M * K);
    float* xd = malloc(M * nb * sizeof(float));
    int32_t* xsum = malloc(M * nb * sizeof(int32_t));
    quantize_rows(x, M, K, xq, xd, NULL, xsum, num_threads);
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
        if (bd) {  // two instantiations, the scales' branches resolved at compile time
            const float* const scale = NULL;
            TILE_SHAPE(Q8_TILE);
        } else {
            const float* const bd = NULL;
            TILE_SHAPE(Q8_TILE);
        }
    }
    free(xq), free(xd), free(xsum);
}

void q8_i8_linear(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* scale, int64_t N, float* out,
                  int num_threads)
{
    q8_matmul(x, M, K, qs, scale, NULL, N, out, num_threads);
}

void q8_0_i8_linear(const float* x, int64_t M, int64_t K, const uint8_t* qs, const float* d, int64_t N, float* out,
                    int num_threads)
{
    q8_matmul(x, M, K, qs, NULL, d, N, out, num_threads);
}
