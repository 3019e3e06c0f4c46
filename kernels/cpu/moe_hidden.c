/* The rows between a small MoE block's two packed GEMMs on a CPU (worker/cpu_linear.py PackedDenseMoE): from the
 * first GEMM's row [router | shared gate | shared up | shared-expert gate | every expert's gate | every expert's
 * up] and the routing (top-k ids and weights, chosen by torch from the router's logits), the second GEMM's input
 * row [h_e * routing weight_e for every expert e (0 where not routed) | h_shared * sigmoid(shared-expert gate)],
 * h = silu(gate) * up.
 *
 * Why C: in torch that is ~12 ops per block (a zeroed [T, E] scatter of the weights, two SiLUs, four products, a
 * sigmoid, conversions and a concatenation), ~50 us per block at 1-16 rows on the 2-core box: more than the
 * block's two GEMMs at one row. Here one pass with no temporaries.
 *
 * The arithmetic is the torch path's (PackedDenseMoE.hidden_reference), bf16 throughout: silu(gate) rounded, its
 * product with up rounded, that times the fp32 routing weight rounded once (an unrouted expert's product with 0,
 * so -0 and NaN come out as torch's do); the shared part's silu, product, sigmoid and product each rounded. Only
 * exp differs (common.h's, within an ulp of torch's), so a value rarely differs by one rounding.
 */

#include "common.h"

struct moe_hidden_args {
    int64_t rows, E, I, Is, top_k;  /* experts, expert / shared intermediate sizes, routed experts per row */
    const bf16_t *first;            /* [rows, *] at first_stride: the first GEMM's output */
    int64_t first_stride;
    int64_t s_gate, s_up, s_weight, gate, up; /* column offsets in a first row: shared gate / up (Is each),
                                                  shared-expert gate (1), every expert's gate / up (E * I each) */
    const int64_t *ids;             /* [rows, top_k] routed experts */
    const float *weights;           /* [rows, top_k] their routing weights */
    bf16_t *out;                    /* [rows, E * I + Is] contiguous */
};

int moe_hidden_bf16(const struct moe_hidden_args *a) {
    const int64_t E = a->E, I = a->I, Is = a->Is, width = E * I + Is;
    float route[256];
    if (E > 256)
        return -1;
    for (int64_t r = 0; r < a->rows; r++) {
        const bf16_t *row = a->first + r * a->first_stride;
        bf16_t *out = a->out + r * width;
        for (int64_t e = 0; e < E; e++)
            route[e] = 0.0f;
        for (int64_t j = 0; j < a->top_k; j++) {
            const int64_t e = a->ids[r * a->top_k + j];
            if (e < 0 || e >= E)
                return -2;
            route[e] = a->weights[r * a->top_k + j];
        }
        const bf16_t *gate = row + a->gate, *up = row + a->up;
        for (int64_t e = 0; e < E; e++)
            for (int64_t i = 0; i < I; i++) {
                const int64_t c = e * I + i;
                const float h = bf16_round(bf16_round(silu(bf16_load(gate[c]))) * bf16_load(up[c]));
                out[c] = bf16_store(h * route[e]);
            }
        const float sig = bf16_round(sigmoid(bf16_load(row[a->s_weight])));
        const bf16_t *sg = row + a->s_gate, *su = row + a->s_up;
        for (int64_t i = 0; i < Is; i++) {
            const float h = bf16_round(bf16_round(silu(bf16_load(sg[i]))) * bf16_load(su[i]));
            out[E * I + i] = bf16_store(h * sig);
        }
    }
    return 0;
}
