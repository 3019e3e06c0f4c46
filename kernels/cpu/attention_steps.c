/* Gated attention token steps on a CPU: for each sequence of the call, its tokens' q / k norms and RoPE, their keys
 * and values written into the paged KV cache, causal attention over the sequence's cached context read through its
 * block table, and the per-head sigmoid output gate (docs/model.md §5), from the layer's q / k / v projections to
 * the rows o_proj reads. Decode tokens and speculative verify chunks take this path, prefill chunks the torch one.
 *
 * Why C: in torch a decode step of the layer is ~80 small ops (norms, RoPE's halves and concatenations, the cache
 * write, the block-table gather of the context, the fused attention's conversions, the gate): ~0.7 ms of an 8.7 ms
 * step at one sequence on the 2-core box, nearly all of it dispatch. Here it is one call with no temporaries.
 *
 * The arithmetic mirrors the torch path (worker/model.py GatedAttention with kernels/norms/reference.py and
 * kernels/attention/reference.py): the normed q and k rounded to the activation dtype, RoPE's two products and
 * their sum each rounded (torch's bf16 elementwise ops), attention in fp32 (scores, max-subtracted softmax, the
 * weighted sum of values) rounded once, sigmoid(gate) and the gated product rounded. Dot products sum in 16 lanes
 * then a fixed tree, every other sum in position order: a token's numbers depend only on its own row and its
 * sequence's cache, so a decode step and the same position of a verify chunk agree bit for bit (greedy
 * speculative decoding stays exact), whatever else is in the call.
 *
 * Built by kernels/cpu/build.py into one library with deltanet_steps.c; entry points attention_token_steps_<act>
 * for activations (and KV cache) in fp32 and bf16. The body is attention_steps_body.h, included once per dtype.
 */

#include "common.h"

/* One call's arguments; kernels/cpu/attention.py fills the same struct through ctypes. */
struct attention_args {
    int64_t num_seqs;
    const int64_t *seqs;          /* [num_seqs, 4]: first row, tokens, context length (cached + new), block-table row */
    int64_t Hq, Hkv, D, R;        /* query / KV heads, head dim, rotary dims (the first R of each head, NeoX halves) */
    const void *qg;               /* [T, Hq * 2 D] rows, stride qg_stride: per head [query (D) | gate (D)] */
    int64_t qg_stride;
    const void *k;                /* [T, Hkv * D] rows, stride k_stride */
    int64_t k_stride;
    const void *v;                /* [T, Hkv * D] rows, stride v_stride */
    int64_t v_stride;
    const void *cos, *sin;        /* [T, R], contiguous: each row's RoPE factors (YaRN's scale folded in) */
    const float *q_norm, *k_norm; /* [D]: 1 + w, the zero-centred RMSNorms' factors */
    float eps, scale;             /* the norms' epsilon; the softmax scale (D^-0.5) */
    void *k_cache, *v_cache;      /* [num_blocks, block_size, Hkv, D], the activation dtype */
    int64_t block_size;
    const int64_t *slot_mapping;  /* [T] flat cache slot of each row's key / value; < 0 writes nothing */
    const int32_t *block_tables;  /* [B, bt_stride] */
    int64_t bt_stride;
    void *out;                    /* [T, Hq * D] contiguous */
    int64_t threads;              /* at most this many OpenMP threads (kernels/cpu openmp_threads) */
    int64_t parallel_min_work;    /* below this much work (attention.py PARALLEL_MIN_WORK) one thread */
};

/* the cache slot of a sequence's position: its block table's block, the offset in it; block sizes are powers of
 * two in practice, where this is a shift and a mask instead of a 64-bit division per key */
static inline int64_t slot_of(const int32_t *table, int64_t bs, int64_t pos) {
    if ((bs & (bs - 1)) == 0) {
        const int shift = __builtin_ctzll((unsigned long long)bs);
        return (int64_t)table[pos >> shift] * bs + (pos & (bs - 1));
    }
    return (int64_t)table[pos / bs] * bs + pos % bs;
}

#define PASTE2(a, b) a##b
#define PASTE(a, b) PASTE2(a, b)
#define NORM_ROPE PASTE(ENTRY, _norm_rope)

#define ACT_T float
#define ACT_LOAD f32_load
#define ACT_STORE f32_store
#define ACT_ROUND f32_round
#define ENTRY attention_token_steps_f32
#include "attention_steps_body.h"

#define ACT_T bf16_t
#define ACT_LOAD bf16_load
#define ACT_STORE bf16_store
#define ACT_ROUND bf16_round
#define ENTRY attention_token_steps_bf16
#define NORM_ROPE PASTE(ENTRY, _norm_rope)
#include "attention_steps_body.h"
