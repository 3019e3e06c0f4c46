/* The bf16 LM head on a CPU with AVX512-BF16: logits [rows, V] = x [rows, H] @ W [V, H]^T, bf16 in and out, as
 * `vdpbf16ps` dot products on torch's OpenMP threads.
 *
 * Why C: oneDNN's packed bf16 linear (worker/cpu_linear.py) ran the 151,936 x 256 head of the CPU checkpoints in
 * 4.2-4.8 ms at 16 rows on the 2-core box (260-300 GFLOP/s, half a decode step) and, at 1-3 rows, slower than at
 * 4. Here a register tile of up to 16 rows x 16 vocabulary rows keeps 16 fp32 accumulators, each weight load
 * feeding all 16. Measured on the same box against oneDNN, calls interleaved: 1.5x at one row (then bound by
 * reading the 78 MB weight), 1.6x at 16 rows, 1.2-1.45x at 17-64 (verify steps). Blocks of the vocabulary go to
 * threads as they come free (a dynamic schedule), so a thread the service's processes take a core from does not
 * hold up the other at a barrier.
 *
 * Arithmetic (the instruction's, documented by Intel and measured on AMD Zen 4): per output, an fp32 sum from 0
 * over the hidden pairs in order, each pair adding its odd product and then its even one, every addition
 * rounded to nearest even (the products of two bf16 are exact in fp32), denormal inputs and results read as 0;
 * then rounded to bf16 (nearest even). So a row's logits do not depend on the other rows or the thread count,
 * and kernels/cpu/lm_head.py `reference` computes the same bits in torch. oneDNN's kernel on this CPU uses the
 * same instruction: at hidden 256 its logits were equal bit for bit (at 2048 its order differs).
 *
 * Weights come packed (lm_head.py `pack`): blocks of 16 vocabulary rows, each [H / 2][16][2] (a pair of hidden
 * columns of 16 rows per 64 bytes, zero past V), so one load feeds 16 dot products of every row in the tile.
 * H must be even (lm_head.py checks). Without AVX512-BF16 in the build `lm_head_available` is 0 and the caller
 * keeps oneDNN's linear. */

#include "common.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LM_HEAD_BF16 1
#endif

#define TILE_ROWS 16          /* rows per register tile x 16 vocabulary rows: 16 accumulators + the weight register */
#define CHUNK_BYTES (1 << 19) /* weights per work item: stays in L2 while each row tile reads it */

struct lm_head_args {
    int64_t rows, hidden, vocab; /* vocab: the real V (the packing pads it to blocks of 16) */
    const bf16_t *x;             /* [rows, hidden] contiguous */
    const bf16_t *packed;        /* [ceil(V / 16)][hidden / 2][16][2] */
    bf16_t *out;                 /* [rows, vocab] contiguous */
    int64_t threads;
};

int lm_head_available(void) {
#ifdef LM_HEAD_BF16
    return 1;
#else
    return 0;
#endif
}

#ifdef LM_HEAD_BF16
/* one packed block w (16 vocabulary rows) against R rows of x as hidden pairs, pair-major (x_pairs[k * R + r]: one
 * pointer for every row's broadcast, so the loop keeps no pointer per row in a register or on the stack: 1.5x
 * oneDNN at 16 rows against 1.3x row-major); `left`: the vocabulary columns from this block's first to V (only
 * the last block of V is partial) */
static inline __attribute__((always_inline)) void tile(const bf16_t *w, const uint32_t *x_pairs, int64_t pairs,
                                                       const int R, bf16_t *out, int64_t vocab, int64_t left) {
    __m512 acc[TILE_ROWS];
    for (int r = 0; r < R; r++)
        acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < pairs; k++) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k * 32);
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int32_t)x_pairs[k * R + r]), wv);
    }
    const __mmask16 valid = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
    for (int r = 0; r < R; r++)
        _mm256_mask_storeu_epi16(out + r * vocab, valid, (__m256i)_mm512_cvtneps_pbh(acc[r]));
}

/* x [rows, H] as each row tile's pairs, pair-major: the tile at r0 (n rows) holds pair k of row r0 + r at
 * r0 * pairs + k * n + r */
static void pair_major(const struct lm_head_args *a, uint32_t *xt) {
    const int64_t pairs = a->hidden / 2;
    const uint32_t *x = (const uint32_t *)a->x;
    for (int64_t r0 = 0; r0 < a->rows; r0 += TILE_ROWS) {
        const int64_t n = a->rows - r0 < TILE_ROWS ? a->rows - r0 : TILE_ROWS;
        for (int64_t r = 0; r < n; r++)
            for (int64_t k = 0; k < pairs; k++)
                xt[r0 * pairs + k * n + r] = x[(r0 + r) * pairs + k];
    }
}

#define TILE_CASE(n) case n: tile(w, x_pairs, pairs, n, o, a->vocab, left); break;

/* blocks b0..b1 of the vocabulary for every row tile: a tile after the first reads the chunk's weights from L2 */
static void run_chunk(const struct lm_head_args *a, const uint32_t *xt, int64_t b0, int64_t b1) {
    const int64_t pairs = a->hidden / 2;
    for (int64_t r0 = 0; r0 < a->rows; r0 += TILE_ROWS) {
        const int64_t R = a->rows - r0 < TILE_ROWS ? a->rows - r0 : TILE_ROWS;
        const uint32_t *x_pairs = xt + r0 * pairs;
        for (int64_t b = b0; b < b1; b++) {
            const bf16_t *w = a->packed + b * pairs * 32;
            bf16_t *o = a->out + r0 * a->vocab + b * 16;
            const int64_t left = a->vocab - b * 16;
            switch (R) { /* a constant R per call: the compiler keeps the accumulators in registers */
            TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6) TILE_CASE(7) TILE_CASE(8)
            TILE_CASE(9) TILE_CASE(10) TILE_CASE(11) TILE_CASE(12) TILE_CASE(13) TILE_CASE(14) TILE_CASE(15)
            default: tile(w, x_pairs, pairs, TILE_ROWS, o, a->vocab, left); break;
            }
        }
    }
}
#endif

/* 0, 1 when scratch memory ran out, or 2 when the library was built without AVX512-BF16 */
int lm_head(const struct lm_head_args *a) {
#ifdef LM_HEAD_BF16
    if (a->rows < 1 || a->vocab < 1)
        return 0;
    uint32_t *xt = malloc(sizeof(uint32_t) * (size_t)(a->rows * (a->hidden / 2) + 1)); /* + 1: never malloc(0) */
    if (!xt)
        return 1;
    pair_major(a, xt);
    const int64_t blocks = (a->vocab + 15) / 16, block_bytes = a->hidden * 16 * (int64_t)sizeof(bf16_t);
    const int64_t per_chunk = block_bytes < 1 ? blocks : CHUNK_BYTES / block_bytes > 0 ? CHUNK_BYTES / block_bytes : 1;
    const int64_t chunks = (blocks + per_chunk - 1) / per_chunk;
    const int threads = (int)(a->threads < 1 ? 1 : a->threads < chunks ? a->threads : chunks);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; c++)
        run_chunk(a, xt, c * per_chunk, (c + 1) * per_chunk < blocks ? (c + 1) * per_chunk : blocks);
    free(xt);
    return 0;
#else
    (void)a;
    return 2;
#endif
}
