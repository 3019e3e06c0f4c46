/* Zero-centred RMSNorm rows on a CPU, optionally after the residual add: y = x / rms(x) * (1 + w), the decoder
 * layers' and the MTP head's norms (docs/model.md §3), with `h = x + residual` first where the layer adds one.
 *
 * Why C: torch's CPU rms_norm is five ops (pow, mean, add, rsqrt, two products) plus the dtype conversions, 25-30
 * us per call whatever the rows; a decode step at one sequence runs 17 of them (29 with MTP drafting). Here a call
 * on a few rows of 256 takes ~2 us (the Python wrapper around it ~8): the step 1.05x faster at one row on the
 * 2-core box, 1.025x at 16.
 *
 * The arithmetic is the torch path's (kernels/norms/reference.py): the residual sum rounded to the activation dtype,
 * then in fp32 the mean of squares, rstd = 1 / sqrt(mean + eps) (torch's rsqrt is that division), (x * rstd) *
 * (1 + w), one rounding at the end. Only the order of the sum of squares differs (common.h's dot_lanes: 8 lane
 * sums then a fixed tree; torch's vectorised reduction has its own), so fp32 results may differ by an ulp and bf16
 * ones rarely by one rounding. The order depends on the row alone: a row's result never depends on the other
 * rows of the call.
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
