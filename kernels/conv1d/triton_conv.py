"""Triton causal depthwise conv1d + SiLU over a packed varlen batch (docs/model.md §4.2), the semantics of
`reference.causal_conv1d_varlen`: prefill chunks, single-token decodes and speculative-verify chunks in one launch.

Sequence b's padded input is seq = [hist (K-1) | x[start_b : start_b + n_b]] with hist its conv state (zeros when
it has no initial state); out[t] = silu(sum_k w[:, k] * seq[t + k]); the new state is seq[-(K-1):]; a verify
sequence also keeps seq[j+1 : j+K] (the state after position j) at spec_conv[slot, j] for j < n_b - 1.

States are time-major, [S, K-1, D] (and spec_conv [S, J, K-1, D]): a state row is D contiguous channels, so a
tile's state loads and stores are coalesced like its input's.

Work is cut into (sequence, BLOCK_T tokens) items x BLOCK_D channels. Only a sequence's first item reads the
old state (BLOCK_T >= K-1 whenever a sequence spans several items), so that item alone writes the new one,
after a barrier that orders its reads of the slot before its writes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qnext.kernels.step_metadata import StepMetadata, VarlenLayout, query_starts


@triton.jit
def causal_conv1d_fwd_kernel(
    x_ptr, w_ptr, out_ptr, state_ptr, spec_ptr,  # x, out: [T, D]; w: [D, K]; state: [S, K-1, D]; spec: [S, J, K-1, D]
    slots_ptr, meta_ptr, items_ptr,  # slots: [B] int64; meta: [B+1 starts | B flags] int32; items: [n, 2] int32
    D, num_seqs, stride_x, stride_out, stride_wd, stride_ss, stride_st, stride_ps, stride_pj, stride_pt,
    K: tl.constexpr, HAS_VERIFY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next power of two >= K-1
):
    item = tl.program_id(0)
    b = tl.load(items_ptr + 2 * item)
    t0 = tl.load(items_ptr + 2 * item + 1)
    start = tl.load(meta_ptr + b)
    n = tl.load(meta_ptr + b + 1) - start
    flags = tl.load(meta_ptr + num_seqs + 1 + b)
    has_init = (flags & 1) != 0
    slot = tl.load(slots_ptr + b).to(tl.int64)
    state = state_ptr + slot * stride_ss  # 64-bit scalar bases, 32-bit offsets within a sequence
    x_seq = x_ptr + start.to(tl.int64) * stride_x

    t = t0 + tl.arange(0, BLOCK_T)  # positions in the sequence
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok, d_ok = t < n, d < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    first = t0 == 0  # only the first item of a sequence touches its conv state
    for k in tl.static_range(K):
        q = t + k  # index into seq: hist for q < K-1, else token q - (K-1)
        v = tl.load(x_seq + (q - (K - 1))[:, None] * stride_x + d[None, :],
                    mask=(t_ok & (q >= K - 1))[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_T, BLOCK_D]
        for r in tl.static_range(K - 1 - k):  # row t = r reads hist[r + k]: one [BLOCK_D] load per row
            h = tl.load(state + (r + k) * stride_st + d, mask=d_ok & has_init & first, other=0.0)
            v = tl.where((t == r)[:, None], h.to(v.dtype)[None, :], v)  # in x's dtype, like the reference
        wk = tl.load(w_ptr + d * stride_wd + k, mask=d_ok, other=0.0).to(tl.float32)
        acc += v.to(tl.float32) * wk[None, :]
        if HAS_VERIFY:
            if k >= 1:  # the state after position t holds seq[t+1 : t+K]; this tile is its entry k-1
                is_verify = (flags & 2) != 0
                spec = spec_ptr + slot * stride_ps + t[:, None] * stride_pj + d[None, :]
                tl.store(spec + (k - 1) * stride_pt, v.to(spec_ptr.dtype.element_ty),
                         mask=((t < n - 1) & is_verify)[:, None] & d_ok[None, :])
    y = acc * tl.sigmoid(acc)
    out_seq = out_ptr + start.to(tl.int64) * stride_out
    tl.store(out_seq + t[:, None] * stride_out + d[None, :], y.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])

    if first:  # new state = seq[n : n+K-1], read whole before any of it is written
        i = tl.arange(0, BLOCK_S)
        sq = n + i
        s_ok = i < K - 1
        sx = tl.load(x_seq + (sq - (K - 1))[:, None] * stride_x + d[None, :],
                     mask=(s_ok & (sq >= K - 1))[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
        sh = tl.load(state + sq[:, None] * stride_st + d[None, :],
                     mask=(s_ok & (sq < K - 1) & has_init)[:, None] & d_ok[None, :], other=0.0)
        new = tl.where((sq >= K - 1)[:, None], sx, sh.to(sx.dtype))
        tl.debug_barrier()
        tl.store(state + i[:, None] * stride_st + d[None, :], new.to(state_ptr.dtype.element_ty),
                 mask=s_ok[:, None] & d_ok[None, :])


def launch_config(max_len: int, D: int) -> dict[str, int]:
    """2K-element tiles; one-token tiles for pure decode. Compiles for sm_90 without spills but for one case
    (test_triton_compile.py): 4-token tiles without verify chunks keep 8 bytes on the stack since the states
    became time-major (hints and other address forms did not remove them; the same tile with verify chunks has
    none). Not yet timed on a GPU."""
    block_t = min(32, triton.next_power_of_2(max_len))
    block_d = min(triton.next_power_of_2(D), max(64, min(512, 2048 // block_t)))
    return dict(BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)


def conv1d_metadata(layout: VarlenLayout, block_t: int) -> list[int]:
    """[B+1 query starts | B flags (1: has initial state, 2: verify) | n x (sequence, first token) items]."""
    items = [(i, t0) for i, n in enumerate(layout.query_lens) for t0 in range(0, n, block_t)]
    flags = [int(h) | 2 * v for h, v in zip(layout.has_initial_state, layout.is_verify)]
    return query_starts(layout.query_lens) + flags + [v for it in items for v in it]


def causal_conv1d_varlen_fwd(
    x: torch.Tensor,  # [T, D]
    weight: torch.Tensor,  # [D, K]
    conv_state: torch.Tensor,  # [S, K-1, D], updated in place
    state_slots: torch.Tensor,  # [B] int64
    query_lens: list[int],
    has_initial_state: list[bool],
    is_verify: list[bool] | None = None,
    spec_conv: torch.Tensor | None = None,  # [S, J, K-1, D]
    out: torch.Tensor | None = None,  # [T, D]
    step_meta: StepMetadata | None = None,  # the step's shared device tables (kernels/step_metadata.py)
) -> torch.Tensor:
    """out [T, D] = silu(causal conv of each sequence continuing from its conv state); the pools are updated."""
    T, D = x.shape
    K = weight.shape[1]
    B = len(query_lens)
    assert x.stride(1) == 1, "x: [T, D] with a contiguous last dim"
    assert weight.shape == (D, K) and weight.stride(1) == 1, "weight: [D, K], K contiguous"
    assert conv_state.dim() == 3 and conv_state.shape[1:] == (K - 1, D) and conv_state.stride(2) == 1
    assert state_slots.shape == (B,) and len(has_initial_state) == B and sum(query_lens) == T
    assert 2 <= K <= 33, "kernel width: 2..33 (BLOCK_T >= K-1 keeps state reads in a sequence's first item)"
    verify = [bool(v) for v in is_verify] if is_verify else [False] * B
    if any(verify):
        assert spec_conv is not None and spec_conv.shape[2:] == (K - 1, D) and spec_conv.stride(3) == 1
        assert all(n - 1 <= spec_conv.shape[1] for n, v in zip(query_lens, verify) if v), "spec_conv too short"
    y = torch.empty(T, D, dtype=x.dtype, device=x.device) if out is None else out
    assert y.shape == (T, D) and y.stride(1) == 1
    if T == 0:
        return y
    if step_meta is None:  # a call outside a model step: tables of its own
        step_meta = StepMetadata(VarlenLayout.for_states(query_lens, has_initial_state, verify), x.device)
    assert len(step_meta.layout.query_lens) == B, "step_meta describes another batch"  # O(1): runs per layer
    cfg = launch_config(max(query_lens), D)
    block_t = cfg["BLOCK_T"]
    meta = step_meta.get(("conv1d", block_t), lambda layout: conv1d_metadata(layout, block_t))
    num_items = (meta.numel() - 2 * B - 1) // 2
    has_verify = any(verify)
    spec = spec_conv if has_verify else conv_state  # the pointer goes unused without verify chunks
    spec_strides = spec_conv.stride()[:3] if has_verify else (0, 0, 0)
    causal_conv1d_fwd_kernel[(num_items, triton.cdiv(D, cfg["BLOCK_D"]))](
        x, weight, y, conv_state, spec, state_slots.to(device=x.device, dtype=torch.int64).contiguous(),
        meta, meta[2 * B + 1:], D, B, x.stride(0), y.stride(0), weight.stride(0), conv_state.stride(0),
        conv_state.stride(1), *spec_strides,
        K=K, HAS_VERIFY=has_verify, BLOCK_S=triton.next_power_of_2(K - 1), **cfg)
    return y
