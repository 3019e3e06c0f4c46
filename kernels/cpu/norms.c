/* Zero-centred RMSNorm rows on a CPU, optionally after the residual add: y = x / rms(x) * (1 + w), the decoder
 * layers' and the MTP head's norms (docs/model.md §3), with `h = x + residual` first where the layer adds one.
 *
 * Why C: torch's CPU rms_norm is five ops (pow, mean, add, rsqrt, two products) plus the dtype conversions, 25-30
 * us per call whatever the rows; a decode step at one sequence runs 17 of them (29 with MTP drafting), ~8% of the
 * step on the 2-core box. Here a call on a few rows of 256 takes a few microseconds.
 *
 * The arithmetic is the torch path's (kernels/norms/reference.py): the residual sum rounded to the activation dtype,
 * then in fp32 the mean of squares, rstd = 1 / sqrt(mean + eps) (torch's rsqrt is that division), (x * rstd) *
 * (1 + w), one rounding at the end. Only the order of the sum of squares differs (16 lane sums then a fixed tree
 * here; torch's vectorised reduction its own), so fp32 results may differ by an ulp and bf16 ones rarely by one
 * rounding. The order depends on the row alone: a row's result never depends on the other rows of the call.
 *
 * Entry points rms_norm_zc_<act> for activations in fp32 and bf16; the weight in the activation dtype.
 */

#include "common.h"

/* One call's arguments; kernels/cpu/norms.py fills the same struct through ctypes. */
struct rms_norm_args {
    int64_t rows, dim;
    const void *x;        /* [rows, dim], row stride x_stride, columns contiguous */
    int64_t x_stride;
    const void *residual; /* NULL, or [rows, dim] at residual_stride: added to x first */
    int64_t residual_stride;
    const void *weight;   /* [dim]: w of (1 + w) */
    float eps;
    void *out;            /* [rows, dim] contiguous: the normed rows */
    void *sum_out;        /* [rows, dim] contiguous: x + residual (written only with a residual) */
};

typedef float vf16 __attribute__((vector_size(64))); /* 16 fp32 lanes: one AVX-512 register */

/* sum of t[i]^2: lane l sums i = l mod 16 in order of i, then a fixed tree over the lanes */
static inline float sum_squares(const float *t, int64_t n) {
    vf16 acc = {0.0f};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        vf16 v;
        memcpy(&v, t + i, sizeof v);
        acc += v * v;
    }
    float part[16];
    memcpy(part, &acc, sizeof part);
    for (; i < n; i++)
        part[i % 16] += t[i] * t[i];
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; l++)
            part[l] += part[l + w];
    return part[0];
}

#define PASTE2(a, b) a##b
#define PASTE(a, b) PASTE2(a, b)

#define ACT_T float
#define ACT_LOAD f32_load
#define ACT_STORE f32_store
#define ENTRY rms_norm_zc_f32
#include "norms_body.h"

#define ACT_T bf16_t
#define ACT_LOAD bf16_load
#define ACT_STORE bf16_store
#define ENTRY rms_norm_zc_bf16
#include "norms_body.h"
