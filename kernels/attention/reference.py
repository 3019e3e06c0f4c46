"""Causal GQA attention over a paged KV cache, for a packed varlen batch (prefill chunks and decodes mixed).

The new keys/values are first written into the cache at `slot_mapping`; each sequence then attends over its
whole context (cached prefix + this step's tokens) read back through its block table, so a chunked prefill
sees exactly what a one-shot prefill sees.

An FP8 cache (`--kv-cache-dtype fp8`, docs/architecture.md §5.1) holds float8_e4m3fn values with one float32
scale per (block, position, KV head) in k_scale / v_scale [num_blocks, block_size, Hkv]: each row of D values is
quantised when it is written, scale = amax(|row|) / 448, so nothing overflows and no calibration is needed.
Reads dequantise (fp8 -> fp32 x scale -> q's dtype) before the products.
"""

import torch
import torch.nn.functional as F

from qnext.kernels.fp8.reference import per_token_group_quant
from qnext.kernels.gated_delta_rule.reference import compute_dtype

# the floor of a row's amax: an all-zero row gets scale 1e-10 / 448 and stays exact zeros (the Triton write uses it too)
KV_SCALE_EPS = 1e-10
# Chunks of 2..BATCHED_CHUNK_MAX tokens (verify chunks, the MTP head's catch-up rows, short prefill chunks) attend
# in one padded call per chunk length, as the decodes do; longer chunks one sequence at a time (a padded batch of
# long chunks at different context lengths would gather far more K/V than it reads)
BATCHED_CHUNK_MAX = 64


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, Hkv, D] -> (float8_e4m3fn [T, Hkv, D], float32 scales [T, Hkv]): one scale per head row."""
    T, H, D = x.shape
    q, s = per_token_group_quant(x.reshape(T * H, D), group=D, eps=KV_SCALE_EPS)
    return q.view(T, H, D), s.view(T, H)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8 [..., D] with float32 scales [...] -> [..., D] in `dtype` (fp32 product, then one rounding)."""
    return (q.float() * scale[..., None]).to(dtype)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """k_cache/v_cache: [num_blocks, block_size, Hkv, D]; k, v: [T, Hkv, D]; slot_mapping: [T] flat slot ids,
    < 0 for a padding token (a CUDA-graph batch's padded rows), which writes nothing. With scales
    ([num_blocks, block_size, Hkv] float32) the caches are FP8 and each row is quantised."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    for cache, scale, x in ((k_cache, k_scale, k), (v_cache, v_scale, v)):
        rows = cache.view(-1, *cache.shape[2:])
        if scale is None:
            rows[slots] = x[keep].to(cache.dtype)
        else:
            rows[slots], scale.view(-1, scale.shape[2])[slots] = quantize_kv(x[keep])


def _read(cache: torch.Tensor, scale: torch.Tensor | None, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The cache rows at flat slots [n]: [n, Hkv, D], an FP8 cache's dequantised to `dtype`."""
    # index_select, not cache[slots]: 4x faster on a CPU for these row gathers
    rows = cache.view(-1, *cache.shape[2:]).index_select(0, slots)
    if scale is None:
        return rows
    return dequantize_kv(rows, scale.view(-1, scale.shape[2]).index_select(0, slots), dtype)


def _gather(cache: torch.Tensor, scale: torch.Tensor | None, block_table: torch.Tensor, length: int,
            dtype: torch.dtype) -> torch.Tensor:
    """The first `length` cached positions of one sequence: [length, Hkv, D]."""
    bs = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    slots = block_table[pos // bs].long() * bs + pos % bs
    return _read(cache, scale, slots, dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [b, n, Hq, D]; k, v: [b, L, Hkv, D]; mask: [b, n, L] True = may attend. Returns [b, n, Hq, D] (compute dtype).

    softmax(q k^T * scale, masked) v in the compute dtype, query head h reading KV head h // (Hq / Hkv): torch's
    fused attention (one op; 4x the speed of the einsum-softmax-einsum form it replaced at 16 decode rows on a
    2-core CPU, and no repeated K/V copies per query head). Every query row sees at least one key here."""
    ct = compute_dtype(q.dtype)
    o = F.scaled_dot_product_attention(q.to(ct).transpose(1, 2), k.to(ct).transpose(1, 2), v.to(ct).transpose(1, 2),
                                       attn_mask=mask[:, None], scale=scale, enable_gqa=True)
    return o.transpose(1, 2)


def paged_attention_varlen(
    q: torch.Tensor,  # [T, Hq, D], RoPE applied
    k: torch.Tensor,  # [T, Hkv, D], RoPE applied
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], written in place
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    query_lens: list[int],  # new tokens per sequence
    context_lens: list[int],  # cached + new tokens per sequence
    scale: float,
    k_scale: torch.Tensor | None = None,  # [num_blocks, block_size, Hkv] float32: the caches are FP8
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [T, Hq, D] in q's dtype
    write_kv(k_cache, v_cache, k, v, slot_mapping, k_scale, v_scale)
    out = torch.empty(q.shape, dtype=compute_dtype(q.dtype), device=q.device)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    # Sequences with the same number of new tokens n <= BATCHED_CHUNK_MAX (decodes: n = 1) go together in one
    # padded batch; query j of a sequence of context length C sits at position C - n + j and sees positions <= it.
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(query_lens):
        if 1 <= n <= BATCHED_CHUNK_MAX:
            by_len.setdefault(n, []).append(i)
    bs = k_cache.shape[1]
    for n, group in by_len.items():
        L = max(context_lens[i] for i in group)
        pos = torch.arange(L, device=q.device)
        tables = block_tables[group].long().clamp(min=0)  # padding entries are masked below
        slots = tables[:, pos // bs] * bs + pos % bs  # [b, L]
        ks = _read(k_cache, k_scale, slots.view(-1), q.dtype).view(*slots.shape, *k.shape[1:])
        vs = _read(v_cache, v_scale, slots.view(-1), q.dtype).view(*slots.shape, *v.shape[1:])
        last = torch.tensor([context_lens[i] - n for i in group], device=q.device)[:, None] + \
            torch.arange(n, device=q.device)  # [b, n] each query's position
        mask = pos[None, None, :] <= last[:, :, None]  # [b, n, L]
        if n == 1 and len(group) == len(query_lens):  # a pure decode step: rows are 0..T-1
            return _attend(q[:, None], ks, vs, mask, scale)[:, 0].to(q.dtype)
        rows = torch.tensor([starts[i] + j for i in group for j in range(n)], device=q.device)
        out[rows] = _attend(q[rows].view(len(group), n, *q.shape[1:]), ks, vs, mask, scale).flatten(0, 1)
    batched = {i for group in by_len.values() for i in group}
    for i, n in enumerate(query_lens):
        if n == 0 or i in batched:
            continue
        s, L = starts[i], context_lens[i]
        ks = _gather(k_cache, k_scale, block_tables[i], L, q.dtype)[None]
        vs = _gather(v_cache, v_scale, block_tables[i], L, q.dtype)[None]
        qpos = torch.arange(L - n, L, device=q.device)
        mask = (torch.arange(L, device=q.device)[None, :] <= qpos[:, None])[None]
        out[s:s + n] = _attend(q[s:s + n][None], ks, vs, mask, scale)[0]
    return out.to(q.dtype)
