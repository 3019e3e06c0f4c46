"""Triton causal GQA attention over a paged KV cache (docs/model.md §5), the semantics of
`reference.paged_attention_varlen`: prefill chunks, speculative-verify chunks and single-token decodes of a packed
varlen batch in one launch, after a second small kernel has written this step's keys/values into the pools.

Design. Work is cut into (sequence, BLOCK_Q query tokens) items x KV heads. A program owns the GROUP query heads
that share one KV head, packed into the rows of its tile (row r = token r // GROUP_P, head r % GROUP_P), so every
key/value tile it loads serves all of them: at decode (one token) the 8 heads of a Qwen3-Next group fill 8 rows of
a 16-row tile instead of one row of eight tiles. Query token t of a sequence with n new tokens and context length
L sits at position L - n + t and sees keys 0 ..= that position; the key loop stops at the tile's last position.
Keys are gathered position by position through the block table (any block size, any BLOCK_N). Online softmax in
base 2 with fp32 accumulators; probabilities are cast to V's dtype for the second product, like FlashAttention.

FP8 pools (`--kv-cache-dtype fp8`, the format in reference.py): the write kernel quantises each head's row as it
stores it, with the reference's arithmetic (div_rn, and round_to_e4m3 before the cast, which the interpreter gets
wrong on its own); the key loop loads the e4m3 tiles and their per-key scales and dequantises (fp32 x scale, then
q's dtype) before each product. The interpreter runs float8 loads and stores, so the CPU tests run this path
against the reference (tests/test_kv_cache_fp8.py); on the GPU it is compiled for sm_90 (test_triton_compile.py).

The sigmoid output gate stays in the model. Fusing it (one more strided load in the epilogue) would save one
elementwise launch and a [T, 4096] round trip per attention layer, at the price of a gate argument in this op's
signature and the model's call site; under CUDA graphs (issue 6, item 9) the launch is nearly free, so it waits
for a profile that shows it.

Small batches of long contexts would leave most SMs idle (batch-1 decode is 2 programs, one per KV head), so the
keys can be split across programs (flash-decoding): each split writes its normalised partial output and
log2-sum-exp, and a small kernel merges them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qnext.kernels.attention.reference import KV_SCALE_EPS
from qnext.kernels.fp8.reference import FP8_DTYPE, FP8_MAX
from qnext.kernels.fp8.triton_quant import round_to_e4m3
from qnext.kernels.step_metadata import StepMetadata, VarlenLayout, query_starts
from qnext.kernels.triton_common import dot, interpreting


@triton.jit
def _quantize_rows(x, EPS: tl.constexpr, FP8_MAX: tl.constexpr):
    """x [BLOCK_H, BLOCK_D] (masked entries 0) -> (values rounded to e4m3, still fp32; fp32 scale per row):
    `reference.quantize_kv` bit for bit (div_rn: the reference divides tensor by tensor, rounding once)."""
    x = x.to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), EPS), FP8_MAX)
    return round_to_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -FP8_MAX), FP8_MAX)), scale


@triton.jit
def kv_cache_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,  # k, v: [T, Hkv, D]; caches: [blocks, BS, Hkv, D]
    k_scale_ptr, v_scale_ptr,  # QUANT: [blocks, BS, Hkv] fp32 (else unused)
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cp, stride_ch, stride_vb, stride_vp, stride_vch,
    stride_sb, stride_sp,
    HKV: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr, EPS: tl.constexpr, FP8_MAX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t)
    if slot < 0:  # a padding token (vLLM's convention); the engine never sends one today
        return
    blk, off = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    heads = tl.arange(0, BLOCK_H)
    h = heads[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < HKV) & (d < D)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask, other=0.0)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask, other=0.0)
    if QUANT:  # FP8 cache: each head's row scaled into e4m3's range, its scale stored beside it
        k, k_scale = _quantize_rows(k, EPS, FP8_MAX)
        v, v_scale = _quantize_rows(v, EPS, FP8_MAX)
        tl.store(k_scale_ptr + blk * stride_sb + off * stride_sp + heads, k_scale, mask=heads < HKV)
        tl.store(v_scale_ptr + blk * stride_sb + off * stride_sp + heads, v_scale, mask=heads < HKV)
    tl.store(k_cache_ptr + blk * stride_cb + off * stride_cp + h * stride_ch + d,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + blk * stride_vb + off * stride_vp + h * stride_vch + d,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attend_keys(acc, m_i, l_i, q, start, hi, qpos, table, kvh, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                 stride_kb, stride_kp, stride_kh, stride_vb, stride_vp, stride_vh, stride_sb, stride_sp, scale_log2,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 QUANT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """One BLOCK_N tile of keys [start, start + BLOCK_N) folded into the online softmax of the rows. QUANT: the
    tiles are FP8, dequantised as `reference.dequantize_kv` does (fp32 x each key's scale, then q's dtype)."""
    kpos = start + tl.arange(0, BLOCK_N)
    k_ok = kpos < hi
    blk = tl.load(table + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)  # physical block of each key
    off = kpos % BLOCK_SIZE
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    kt = tl.load(k_cache_ptr + blk[None, :] * stride_kb + off[None, :] * stride_kp + kvh * stride_kh + d[:, None],
                 mask=d_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
    if QUANT:
        ks = tl.load(k_scale_ptr + blk * stride_sb + off * stride_sp + kvh, mask=k_ok, other=0.0)
        kt = kt.to(tl.float32) * ks[None, :]
    s = dot(q, kt.to(q.dtype), PRECISION, INTERPRET) * scale_log2  # [BLOCK_M, BLOCK_N], log2 units
    s = tl.where((kpos[None, :] <= qpos[:, None]) & k_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vp + kvh * stride_vh + d[None, :],
                mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    if QUANT:
        vs = tl.load(v_scale_ptr + blk * stride_sb + off * stride_sp + kvh, mask=k_ok, other=0.0)
        v = v.to(tl.float32) * vs[:, None]
    acc = acc * alpha[:, None] + dot(p.to(q.dtype), v.to(q.dtype), PRECISION, INTERPRET)
    return acc, m_new, l_i


@triton.jit
def paged_attention_fwd_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, tables_ptr,  # q, out: [T, Hq, D]; tables: [B, max_blocks] int32
    k_scale_ptr, v_scale_ptr,  # QUANT: [blocks, BS, Hkv] fp32 scales of the FP8 caches (else unused)
    meta_ptr, items_ptr,  # meta: [B+1 query starts | B context lens] int32; items: [n, 2] (sequence, first token)
    part_ptr, lse_ptr,  # split-KV partials: out [S, T, Hq, D] fp32, log2-sum-exp [S, T, Hq] fp32
    num_seqs, stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kp, stride_kh,
    stride_vb, stride_vp, stride_vh, stride_sb, stride_sp, stride_table, stride_ps, stride_pt, stride_ls, stride_lt,
    scale_log2,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr,  # q heads per KV head, and that rounded up to a power of two
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, QUANT: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
    item = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    b = tl.load(items_ptr + 2 * item)
    t0 = tl.load(items_ptr + 2 * item + 1)
    start = tl.load(meta_ptr + b)
    n = tl.load(meta_ptr + b + 1) - start
    ctx = tl.load(meta_ptr + num_seqs + 1 + b)

    r = tl.arange(0, BLOCK_M)
    t = t0 + r // GROUP_P  # token within the sequence
    h = kvh * GROUP + r % GROUP_P  # query head
    row_ok = (t < n) & (r % GROUP_P < GROUP)
    qpos = ctx - n + t  # absolute position: the last key this row may see
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    row_off = (start + t).to(tl.int64)
    q = tl.load(q_ptr + row_off[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    # m starts finite: a row that sees no key in a tile (a padding row, or a causal row in the last tile) keeps
    # alpha = 1 and p = 0 instead of exp2(-inf - -inf) = NaN
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    end = tl.minimum(ctx, ctx - n + t0 + BLOCK_Q)  # one past the tile's last visible key
    # this split's keys: an equal share of [0, end), whole BLOCK_N tiles (the last splits may get none)
    chunk = tl.cdiv(tl.cdiv(end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(end, lo + chunk)
    table = tables_ptr + b.to(tl.int64) * stride_table
    if INTERPRET:  # the interpreter's for loops need a constant bound (triton_common.interpreting)
        s0 = lo
        while s0 < hi:
            acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, s0, hi, qpos, table, kvh, k_cache_ptr, v_cache_ptr,
                                         k_scale_ptr, v_scale_ptr, stride_kb, stride_kp, stride_kh, stride_vb,
                                         stride_vp, stride_vh, stride_sb, stride_sp, scale_log2, HEAD_DIM,
                                         BLOCK_SIZE, BLOCK_N, BLOCK_D, QUANT, PRECISION, INTERPRET)
            s0 += BLOCK_N
    else:
        for s0 in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, s0, hi, qpos, table, kvh, k_cache_ptr, v_cache_ptr,
                                         k_scale_ptr, v_scale_ptr, stride_kb, stride_kp, stride_kh, stride_vb,
                                         stride_vp, stride_vh, stride_sb, stride_sp, scale_log2, HEAD_DIM,
                                         BLOCK_SIZE, BLOCK_N, BLOCK_D, QUANT, PRECISION, INTERPRET)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + row_off[:, None] * stride_ot + h[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:  # this split's normalised output and its log2-sum-exp; a split that saw no key has weight 0
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        part = part_ptr + split.to(tl.int64) * stride_ps
        tl.store(part + row_off[:, None] * stride_pt + h[:, None] * HEAD_DIM + d[None, :], o,
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + split.to(tl.int64) * stride_ls + row_off * stride_lt + h, lse, mask=row_ok)


@triton.jit
def split_kv_combine_kernel(
    part_ptr, lse_ptr, out_ptr,  # part: [S, T, Hq, D] fp32; lse: [S, T, Hq] fp32; out: [T, Hq, D]
    stride_ps, stride_pt, stride_ls, stride_lt, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    lse = tl.load(lse_ptr + sp * stride_ls + t * stride_lt + h, mask=sp < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)  # finite: split 0 holds key 0, which every query sees
    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    den = 0.0
    for s in range(NUM_SPLITS):
        w = tl.exp2(tl.load(lse_ptr + s * stride_ls + t * stride_lt + h) - m)
        part = tl.load(part_ptr + s * stride_ps + t * stride_pt + h * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0)
        acc += w * part
        den += w
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, (acc / den).to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def launch_config(max_query_len: int, group: int, head_dim: int) -> dict[str, int]:
    """Rows of a tile = BLOCK_Q tokens x the group's heads (padded to a power of two): 16 rows or more for
    tl.dot, 64 at most for prefill (the fp32 accumulator is rows x head_dim). Decode-only steps take 16-row
    tiles; in a mixed step the decodes ride in the prefill's tile shape (idle rows, but decode is bound by
    reading K/V, not by the MMA). Checked for spills on sm_90 at head_dim 256 (test_triton_compile.py); not yet
    tuned."""
    group_p = triton.next_power_of_2(group)
    rows = 64 if max_query_len > 1 else 16
    block_q = max(1, 16 // group_p, min(triton.next_power_of_2(max_query_len), rows // group_p))
    block_d = triton.next_power_of_2(head_dim)
    block_n = 32 if block_d >= 256 else 64
    return dict(BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4 if block_d <= 128 else 8,
                num_stages=2)


def _scale_strides(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                   v_scale: torch.Tensor | None) -> tuple[tuple[int, int], bool]:
    """((block, position) strides of the scales, shared by K and V, or (0, 0)), and whether the caches are FP8."""
    if k_scale is None:
        assert v_scale is None and k_cache.dtype != FP8_DTYPE, "an FP8 cache needs its scales"
        return (0, 0), False
    assert k_cache.dtype == v_cache.dtype == FP8_DTYPE, "scales come with a float8_e4m3fn cache"
    for sc in (k_scale, v_scale):
        assert sc.shape == k_cache.shape[:3] and sc.dtype == torch.float32 and sc.stride(2) == 1
    assert v_scale.stride() == k_scale.stride()
    return (k_scale.stride(0), k_scale.stride(1)), True


def write_kv_fwd(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
    """k, v [T, Hkv, D] -> k_cache/v_cache [num_blocks, block_size, Hkv, D] at flat slots [T] (< 0: skipped);
    with scales [num_blocks, block_size, Hkv] fp32 the caches are FP8 and each head's row is quantised."""
    T, Hkv, D = k.shape
    assert v.shape == k.shape and k_cache.shape[2:] == (Hkv, D) and v_cache.shape == k_cache.shape
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert slot_mapping.shape == (T,)
    (stride_sb, stride_sp), quant = _scale_strides(k_cache, v_cache, k_scale, v_scale)
    if T == 0:
        return
    kv_cache_write_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping.to(device=k.device, dtype=torch.int64).contiguous(),
        k_scale if quant else k_cache, v_scale if quant else v_cache,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), stride_sb, stride_sp,
        HKV=Hkv, D=D, BLOCK_SIZE=k_cache.shape[1], BLOCK_H=triton.next_power_of_2(Hkv),
        BLOCK_D=triton.next_power_of_2(D), QUANT=quant, EPS=KV_SCALE_EPS, FP8_MAX=FP8_MAX, num_warps=4)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_programs: int, max_context: int, device: torch.device) -> int:
    """Split the keys (flash-decoding) when the (item, KV head) programs cannot fill the GPU: enough splits for
    about two programs per SM, each still >= 512 keys, at most 32. On CPU (the interpreter) one split."""
    if device.type != "cuda":
        return 1
    return max(1, min(32, triton.cdiv(2 * _num_sms(device), num_programs), max_context // 512))


def attention_metadata(layout: VarlenLayout, block_q: int) -> list[int]:
    """[B+1 query starts | B context lens | n x (sequence, first token) work items of BLOCK_Q tokens]."""
    items = [(i, t0) for i, n in enumerate(layout.query_lens) for t0 in range(0, n, block_q)]
    return query_starts(layout.query_lens) + list(layout.context_lens) + [v for it in items for v in it]


def paged_attention_fwd(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    query_lens: list[int],
    context_lens: list[int],
    scale: float,
    out: torch.Tensor | None = None,  # [T, Hq, D]
    num_splits: int | None = None,  # key splits per (item, KV head); None: choose_num_splits
    step_meta: StepMetadata | None = None,  # the step's shared device tables (kernels/step_metadata.py)
    k_scale: torch.Tensor | None = None,  # [num_blocks, block_size, Hkv] fp32: the caches are FP8
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [T, Hq, D] (q's dtype) = causal softmax(q k^T * scale) v of each sequence over its cached context,
    whose last query_len positions are this step's tokens (already in the cache).

    With num_splits > 1 each program attends over a share of the keys and a second kernel merges the partial
    outputs by their log-sum-exp: more programs for small batches of long contexts. The split count changes the
    order of the sums, so results differ in the last bits between batch compositions (as in vLLM)."""
    T, Hq, D = q.shape
    num_blocks, block_size, Hkv, _ = k_cache.shape
    B = len(query_lens)
    assert Hq % Hkv == 0 and k_cache.shape[3] == D and v_cache.shape == k_cache.shape
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "head dim contiguous"
    assert len(context_lens) == B and sum(query_lens) == T and block_tables.shape[0] >= B
    assert all(0 <= n <= c for n, c in zip(query_lens, context_lens)), "query_len <= context_len"
    assert all(c <= block_tables.shape[1] * block_size for c in context_lens), "block table too short"
    (stride_sb, stride_sp), quant = _scale_strides(k_cache, v_cache, k_scale, v_scale)
    if step_meta is None:  # a call outside a model step: tables of its own
        step_meta = StepMetadata(VarlenLayout.of(query_lens, context_lens), q.device)
    assert len(step_meta.layout.query_lens) == B, "step_meta describes another batch"  # O(1): runs per layer
    y = torch.empty_like(q) if out is None else out
    assert y.shape == q.shape and y.stride(2) == 1
    if T == 0:
        return y
    group = Hq // Hkv
    cfg = launch_config(max(query_lens), group, D)
    block_q = cfg["BLOCK_Q"]
    meta = step_meta.get(("attention", block_q), lambda layout: attention_metadata(layout, block_q))
    num_items = (meta.numel() - 2 * B - 1) // 2
    tables = block_tables.to(device=q.device, dtype=torch.int32)
    tables = tables if tables.stride(1) == 1 else tables.contiguous()
    S = num_splits or choose_num_splits(num_items * Hkv, step_meta.layout.max_context, q.device)
    assert S >= 1
    if S > 1:
        part = torch.empty(S, T, Hq, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(S, T, Hq, dtype=torch.float32, device=q.device)
    else:
        part, lse = y, y  # unused pointers
    # fp32 activations (the CPU/tiny model) get exact fp32 products; on the GPU the model runs in bf16
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    paged_attention_fwd_kernel[(num_items, Hkv, S)](
        q, k_cache, v_cache, y, tables, k_scale if quant else k_cache, v_scale if quant else v_cache, meta,
        meta[2 * B + 1:], part, lse, B, q.stride(0), q.stride(1), y.stride(0), y.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), stride_sb,
        stride_sp, tables.stride(0), T * Hq * D, Hq * D, T * Hq, Hq, scale * 1.4426950408889634, GROUP=group,
        GROUP_P=triton.next_power_of_2(group), HEAD_DIM=D, BLOCK_SIZE=block_size, NUM_SPLITS=S, QUANT=quant,
        PRECISION=precision, INTERPRET=interpreting(), **cfg)
    if S > 1:
        split_kv_combine_kernel[(T, Hq)](
            part, lse, y, T * Hq * D, Hq * D, T * Hq, Hq, y.stride(0), y.stride(1), HEAD_DIM=D, NUM_SPLITS=S,
            BLOCK_S=triton.next_power_of_2(S), BLOCK_D=triton.next_power_of_2(D), num_warps=2)
    return y
