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
 * Built by kernels/cpu/build.py into one library with attention_steps.c; four entry points here, activations x
 * state in {fp32, bf16}: deltanet_token_steps_<act>_<state>. The body is deltanet_steps_body.h, included once per pair.
 */

#include "common.h"

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
    int64_t threads;          /* at most this many OpenMP threads (kernels/cpu openmp_threads) */
    int64_t parallel_min_work; /* below this much work (deltanet.py PARALLEL_MIN_WORK) one thread */
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
#include "deltanet_steps_body.h"

#define ACT_T float
#define ACT_LOAD f32_load
#define ACT_STORE f32_store
#define ACT_ROUND f32_round
#define STATE_T bf16_t
#define STATE_LOAD bf16_load
#define STATE_STORE bf16_store
#define STATE_IS_F32 0
#define ENTRY deltanet_token_steps_f32_bf16
#include "deltanet_steps_body.h"

#define ACT_T bf16_t
#define ACT_LOAD bf16_load
#define ACT_STORE bf16_store
#define ACT_ROUND bf16_round
#define STATE_T float
#define STATE_LOAD f32_load
#define STATE_STORE f32_store
#define STATE_IS_F32 1
#define ENTRY deltanet_token_steps_bf16_f32
#include "deltanet_steps_body.h"

#define ACT_T bf16_t
#define ACT_LOAD bf16_load
#define ACT_STORE bf16_store
#define ACT_ROUND bf16_round
#define STATE_T bf16_t
#define STATE_LOAD bf16_load
#define STATE_STORE bf16_store
#define STATE_IS_F32 0
#define ENTRY deltanet_token_steps_bf16_bf16
#include "deltanet_steps_body.h"
