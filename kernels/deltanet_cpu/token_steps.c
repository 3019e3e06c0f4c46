/* DeltaNet token steps on a CPU: for each sequence of the call, its tokens one after another through the causal
 * conv, the gates, the gated delta rule and the gated RMSNorm (docs/model.md §4), from the layer's projections
 * (in_proj_qkvz, in_proj_ba rows, checkpoint layout) to the rows out_proj reads. Decode tokens and speculative
 * verify chunks take this path, prefill chunks the chunked torch form.
 *
 * Why C: in torch a decode token is ~100 small ops per layer (2 ms of an 11 ms step at 16 sequences on the 2-core
 * box). Here it is one call per layer with no temporaries.
 *
 * The arithmetic mirrors the torch references op for op (kernels/conv1d/reference.py, gated_delta_rule/
 * reference.py, norms/reference.py): fp32 inside, rounded to the activation dtype where they round (the conv
 * output, beta, the rule's output, the normalised rows and the weight product, the gated output). Sums run in a
 * fixed order, so a token's result does not depend on the call's other sequences: a decode step and the same
 * position of a verify chunk compute the same numbers (greedy speculative decoding stays exact).
 *
 * Built by kernels/deltanet_cpu/build.py into one library holding four entry points, activations x state in
 * {fp32, bf16}: deltanet_token_steps_<act>_<state>. The body is token_steps_body.h, included once per pair.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16_t;

static inline float bf16_load(bf16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* fp32 -> bf16, round to nearest even (torch's conversion); NaN stays a quiet NaN */
static inline bf16_t bf16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

static inline float bf16_round(float f) { return bf16_load(bf16_store(f)); }

static inline float f32_load(float x) { return x; }
static inline float f32_store(float f) { return f; }
static inline float f32_round(float f) { return f; }

/* exp(x) in plain float arithmetic, so the compiler vectorises the loops calling it (libm's expf is a call per
 * element: the conv's and the gate's SiLU over every channel took most of a call). x = n ln2 + r with |r| <= ln2/2
 * (ln2 in two parts, Cody-Waite), exp(r) by Cephes' expf polynomial (~1 ulp), 2^n put into the exponent bits.
 * Arguments are clamped to [-87, 88] (2^n stays a normal float: exp(-87) ~ 1.6e-38 stands in for the underflow
 * to 0, exp(88) ~ 1.7e38 for the overflow); NaN stays NaN (both comparisons are false). */
static inline float exp_f(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it leaves round(x / ln2) in the low mantissa bits */
    const float t = x * 1.44269504088896341f + magic;
    const float n = t - magic;
    int32_t t_bits, magic_bits;
    memcpy(&t_bits, &t, sizeof t_bits);
    memcpy(&magic_bits, &magic, sizeof magic_bits);
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    const float p = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r
                      + 1.6666665459e-1f) * r + 5.0000001201e-1f) * (r * r) + r + 1.0f;
    const uint32_t scale_bits = (uint32_t)(t_bits - magic_bits + 127) << 23;
    float scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    return p * scale;
}

static inline float silu(float x) { return x / (1.0f + exp_f(-x)); }
static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_f(-x)); }
static inline float softplus(float x) { return x > 20.0f ? x : log1pf(exp_f(x)); } /* F.softplus, threshold 20 */

/* One call's arguments; kernels/deltanet_cpu/__init__.py fills the same struct through ctypes. Pointers to
 * activation / state data are void: their type is the entry point's. */
struct deltanet_args {
    int64_t num_seqs;
    const int64_t *seqs;      /* [num_seqs, 5]: first row, tokens, state slot, fresh (no history), verify */
    int64_t Hk, Hv, dk, dv, K;
    const void *qkvz;         /* [T, Hk * (2 dk + 2 (Hv / Hk) dv)] rows, stride qkvz_stride */
    int64_t qkvz_stride;
    const void *ba;           /* [T, Hk * 2 (Hv / Hk)], stride ba_stride */
    int64_t ba_stride;
    const float *conv_weight; /* [K, D] (time-major, as the state), D = 2 Hk dk + Hv dv */
    const float *neg_A;       /* [Hv] -exp(A_log) */
    const float *dt_bias;     /* [Hv] */
    const float *norm_weight; /* [dv], the activation dtype's values */
    float eps;                /* the gated RMSNorm's */
    void *conv_state;         /* [S, K-1, D] activations */
    void *ssm_state;          /* [S, Hv, dk, dv] state dtype */
    void *spec_conv;          /* [S, k_max, K-1, D] or NULL: the state after position j < n-1 of a verify chunk */
    void *spec_ssm;           /* [S, k_max, Hv, dk, dv] or NULL */
    int64_t k_max;
    void *out;                /* [T, Hv dv] activations, contiguous */
};

#define ACT_T float
#define ACT_LOAD f32_load
#define ACT_STORE f32_store
#define ACT_ROUND f32_round
#define STATE_T float
#define STATE_LOAD f32_load
#define STATE_STORE f32_store
#define STATE_IS_F32 1
#define ENTRY deltanet_token_steps_f32_f32
#include "token_steps_body.h"

#define ACT_T float
#define ACT_LOAD f32_load
#define ACT_STORE f32_store
#define ACT_ROUND f32_round
#define STATE_T bf16_t
#define STATE_LOAD bf16_load
#define STATE_STORE bf16_store
#define STATE_IS_F32 0
#define ENTRY deltanet_token_steps_f32_bf16
#include "token_steps_body.h"

#define ACT_T bf16_t
#define ACT_LOAD bf16_load
#define ACT_STORE bf16_store
#define ACT_ROUND bf16_round
#define STATE_T float
#define STATE_LOAD f32_load
#define STATE_STORE f32_store
#define STATE_IS_F32 1
#define ENTRY deltanet_token_steps_bf16_f32
#include "token_steps_body.h"

#define ACT_T bf16_t
#define ACT_LOAD bf16_load
#define ACT_STORE bf16_store
#define ACT_ROUND bf16_round
#define STATE_T bf16_t
#define STATE_LOAD bf16_load
#define STATE_STORE bf16_store
#define STATE_IS_F32 0
#define ENTRY deltanet_token_steps_bf16_bf16
#include "token_steps_body.h"
