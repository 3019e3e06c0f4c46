/* The int8 LM head MTP drafts are drawn from on a CPU (worker/draft_head.py): logits [rows, V] of a few hidden
 * rows against int8 weights q [V, H] with one fp32 scale per vocabulary row.
 *
 * Why C: at one row the head is a pass over the whole weight (151,936 x 128 int8 = 19 MB on the aligned tiny
 * checkpoint) for a single dot product per weight row. torch's weight-only int8 kernel (_weight_int8pack_mm)
 * widens every weight to a float before its multiply-add: ~0.7 ms a pass on the 2-core box, twice per k = 2 step,
 * where reading the bytes takes ~0.3. Here the products are integer dot products (AVX512-VNNI: 64 int8 products
 * per instruction) and the pass runs on torch's own OpenMP threads (see build.py: the library links the OpenMP
 * runtime torch has loaded, so no second thread pool competes with torch's spinning workers).
 *
 * Arithmetic, all of it integer up to the last three float operations, so every path (VNNI or the plain loops,
 * any thread count) gives the same bits and kernels/cpu/int8_head.py `reference` gives them in torch:
 *   m = max |h| over the row; a = round(h * (32767 / m)) in [-32767, 32767], 0 for an all-zero row;
 *   a = 256 * hi + lo with lo in [0, 256) (u8) and hi in [-128, 127], fed as hi + 128 (u8);
 *   D_hi = sum (hi + 128) q - 128 * sum q (the weight row's sum, precomputed), D_lo = sum lo q (int32: exact for
 *   H up to 65,536);
 *   logit = ((256 * (float)D_hi + (float)D_lo) * scale) * (m / 32767), rounded to the output's dtype.
 * So the activations keep ~15 bits against the row's largest (bf16 hidden states carry 8), and what moves a
 * logit from the bf16 weight's is the weight's int8 rounding (worker/draft_head.py bounds it).
 *
 * Weights come packed (int8_head.py `pack`): blocks of 16 vocabulary rows, each [ceil(H / 4)][16][4] (4
 * consecutive hidden columns of 16 rows per 64 bytes, zero past H), so one 64-byte load feeds 16 row sums. */

#include "common.h"

#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#include <immintrin.h>
#define INT8_HEAD_VNNI 1
#endif

#define ROW_GROUP 4   /* activation rows sharing each weight load (their sums are independent chains) */
#define CHUNK 64      /* vocabulary blocks per OpenMP work item */

struct int8_head_args {
    int64_t rows, hidden, vocab; /* vocab: the real V (the packing pads it to blocks of 16) */
    const void *h;               /* [rows, hidden] contiguous, fp32 or bf16 as `bf16` says; also the output dtype */
    int64_t bf16;
    const int8_t *packed;        /* [ceil(V / 16)][ceil(H / 4)][16][4] */
    const int32_t *row_sums;     /* [ceil(V / 16) * 16] sum of each weight row's q */
    const float *scale;          /* [V] */
    void *out;                   /* [rows, vocab] contiguous, h's dtype */
    int64_t threads;
};

/* 16 vocabulary rows (one packed block w) against R activation rows: D_hi + 128 * row sum and D_lo, per row */
static inline __attribute__((always_inline)) void block_sums(const int8_t *w, const uint32_t *hi,
                                                             const uint32_t *lo, int64_t kq, const int R,
                                                             int32_t sum_hi[][16], int32_t sum_lo[][16]) {
#ifdef INT8_HEAD_VNNI
    /* two chains per row and part (even / odd k): a dot product instruction's latency is several cycles */
    __m512i ah[ROW_GROUP][2], al[ROW_GROUP][2];
    for (int r = 0; r < R; r++)
        for (int p = 0; p < 2; p++)
            ah[r][p] = al[r][p] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 2 <= kq; k += 2)
        for (int p = 0; p < 2; p++) {
            const __m512i wv = _mm512_loadu_si512(w + (k + p) * 64);
            for (int r = 0; r < R; r++) {
                ah[r][p] = _mm512_dpbusd_epi32(ah[r][p], _mm512_set1_epi32((int32_t)hi[r * kq + k + p]), wv);
                al[r][p] = _mm512_dpbusd_epi32(al[r][p], _mm512_set1_epi32((int32_t)lo[r * kq + k + p]), wv);
            }
        }
    if (k < kq) {
        const __m512i wv = _mm512_loadu_si512(w + k * 64);
        for (int r = 0; r < R; r++) {
            ah[r][0] = _mm512_dpbusd_epi32(ah[r][0], _mm512_set1_epi32((int32_t)hi[r * kq + k]), wv);
            al[r][0] = _mm512_dpbusd_epi32(al[r][0], _mm512_set1_epi32((int32_t)lo[r * kq + k]), wv);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm512_storeu_si512(sum_hi[r], _mm512_add_epi32(ah[r][0], ah[r][1]));
        _mm512_storeu_si512(sum_lo[r], _mm512_add_epi32(al[r][0], al[r][1]));
    }
#else
    for (int r = 0; r < R; r++) {
        for (int v = 0; v < 16; v++)
            sum_hi[r][v] = sum_lo[r][v] = 0;
        for (int64_t k = 0; k < kq; k++) {
            const uint32_t h4 = hi[r * kq + k], l4 = lo[r * kq + k];
            for (int v = 0; v < 16; v++)
                for (int j = 0; j < 4; j++) {
                    const int32_t q = w[k * 64 + v * 4 + j];
                    sum_hi[r][v] += (int32_t)((h4 >> (8 * j)) & 0xffu) * q;
                    sum_lo[r][v] += (int32_t)((l4 >> (8 * j)) & 0xffu) * q;
                }
        }
    }
#endif
}

static void run_blocks(const struct int8_head_args *a, const uint32_t *hi, const uint32_t *lo, const float *row_scale,
                       int64_t b0, int64_t b1) {
    const int64_t kq = (a->hidden + 3) / 4;
    for (int64_t b = b0; b < b1; b++) {
        const int8_t *w = a->packed + b * kq * 64;
        for (int64_t r0 = 0; r0 < a->rows; r0 += ROW_GROUP) {
            const int64_t R = a->rows - r0 < ROW_GROUP ? a->rows - r0 : ROW_GROUP;
            int32_t sum_hi[ROW_GROUP][16], sum_lo[ROW_GROUP][16];
            const uint32_t *h0 = hi + r0 * kq, *l0 = lo + r0 * kq;
            switch (R) { /* a constant R per call: the compiler keeps the chains in registers */
            case 1: block_sums(w, h0, l0, kq, 1, sum_hi, sum_lo); break;
            case 2: block_sums(w, h0, l0, kq, 2, sum_hi, sum_lo); break;
            case 3: block_sums(w, h0, l0, kq, 3, sum_hi, sum_lo); break;
            default: block_sums(w, h0, l0, kq, ROW_GROUP, sum_hi, sum_lo); break;
            }
            for (int64_t r = 0; r < R; r++)
                for (int64_t v = 0; v < 16 && b * 16 + v < a->vocab; v++) {
                    const int64_t col = b * 16 + v, at = (r0 + r) * a->vocab + col;
                    const float t = 256.0f * (float)(sum_hi[r][v] - 128 * a->row_sums[col]) + (float)sum_lo[r][v];
                    const float logit = (t * a->scale[col]) * row_scale[r0 + r];
                    if (a->bf16)
                        ((bf16_t *)a->out)[at] = bf16_store(logit);
                    else
                        ((float *)a->out)[at] = logit;
                }
        }
    }
}

/* 0, or 1 when scratch memory ran out */
int int8_head(const struct int8_head_args *a) {
    const int64_t kq = (a->hidden + 3) / 4, blocks = (a->vocab + 15) / 16;
    uint32_t *hi = malloc(sizeof(uint32_t) * (size_t)(2 * kq * a->rows) + sizeof(float) * (size_t)a->rows);
    if (!hi)
        return 1;
    uint32_t *lo = hi + kq * a->rows;
    float *row_scale = (float *)(lo + kq * a->rows);
    for (int64_t r = 0; r < a->rows; r++) {
        float m = 0.0f;
        for (int64_t c = 0; c < a->hidden; c++) {
            const float v = a->bf16 ? bf16_load(((const bf16_t *)a->h)[r * a->hidden + c])
                                    : ((const float *)a->h)[r * a->hidden + c];
            m = fabsf(v) > m ? fabsf(v) : m;
        }
        row_scale[r] = m / 32767.0f;
        const float inv = m > 0.0f ? 32767.0f / m : 0.0f;
        for (int64_t k = 0; k < kq; k++) {
            uint32_t h4 = 0, l4 = 0;
            for (int j = 0; j < 4; j++) {
                const int64_t c = k * 4 + j;
                const float v = c >= a->hidden ? 0.0f
                                : a->bf16 ? bf16_load(((const bf16_t *)a->h)[r * a->hidden + c])
                                          : ((const float *)a->h)[r * a->hidden + c];
                const int32_t q = (int32_t)lrintf(v * inv); /* ties to even, as torch.round */
                h4 |= (uint32_t)((q >> 8) + 128) << (8 * j);   /* arithmetic shift: floor(q / 256) */
                l4 |= ((uint32_t)q & 0xffu) << (8 * j);
            }
            hi[r * kq + k] = h4;
            lo[r * kq + k] = l4;
        }
    }
    const int64_t chunks = (blocks + CHUNK - 1) / CHUNK;
    const int threads = (int)(a->threads < 1 ? 1 : a->threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++)
        run_blocks(a, hi, lo, row_scale, c * CHUNK, (c + 1) * CHUNK < blocks ? (c + 1) * CHUNK : blocks);
    free(hi);
    return 0;
}
