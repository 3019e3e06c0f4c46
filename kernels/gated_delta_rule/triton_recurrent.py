"""Triton gated delta rule, token by token (docs/model.md §4.4): single-token decodes and speculative-verify
chunks, the semantics of `reference.recurrent_step` applied along each sequence.

One program owns (sequence, value head, BLOCK_V columns of the state) and keeps that [dk, BLOCK_V] slice of S in
registers, fp32, for all the sequence's tokens: the slice is read from the slot pool once (zeros for a fresh
sequence) and written back once. Columns of S never mix in the recurrence (S^T k and S^T q reduce over dk only),
so the dv split needs no communication. A verify sequence also stores its slice after every position but the
last into spec_ssm[slot, j], which is what the engine rolls back to.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def gdr_recurrent_fwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, out_ptr,  # q, k: [T, Hk, dk]; v, out: [T, H, dv]; g, beta: [T, H]
    state_ptr, spec_ptr, slots_ptr, meta_ptr,  # state: [S, H, dk, dv]; spec: [S, J, H, dk, dv]; meta: [n, 4] int32
    dk, dv, group, scale,  # group = H // Hk
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_bt, stride_ot, stride_oh,
    stride_ss, stride_sh, stride_sk, stride_ps, stride_pj, stride_ph, stride_pk,
    HAS_VERIFY: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.load(meta_ptr + 4 * tl.program_id(0))  # index of the sequence in the batch
    start = tl.load(meta_ptr + 4 * tl.program_id(0) + 1)
    n = tl.load(meta_ptr + 4 * tl.program_id(0) + 2)
    flags = tl.load(meta_ptr + 4 * tl.program_id(0) + 3)
    has_init = (flags & 1) != 0
    h = tl.program_id(1)
    kh = h // group
    slot = tl.load(slots_ptr + b).to(tl.int64)

    d = tl.arange(0, BLOCK_K)
    c = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    d_ok, c_ok = d < dk, c < dv
    tile = d[:, None] * stride_sk + c[None, :]  # 32-bit offsets inside one head's state
    tile_ok = d_ok[:, None] & c_ok[None, :]
    state = state_ptr + slot * stride_ss + h * stride_sh  # 64-bit bases
    S = tl.load(state + tile, mask=tile_ok & has_init, other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_V]

    row = start.to(tl.int64)
    j = 0
    while j < n:  # not `range(n)`: the interpreter cannot take a loaded scalar as a range bound
        qj = tl.load(q_ptr + row * stride_qt + kh * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)
        kj = tl.load(k_ptr + row * stride_kt + kh * stride_kh + d, mask=d_ok, other=0.0).to(tl.float32)
        vj = tl.load(v_ptr + row * stride_vt + h * stride_vh + c, mask=c_ok, other=0.0).to(tl.float32)
        gj = tl.load(g_ptr + row * stride_gt + h).to(tl.float32)
        bj = tl.load(beta_ptr + row * stride_bt + h).to(tl.float32)
        qj = qj * (tl.rsqrt(tl.sum(qj * qj, 0) + 1e-6) * scale)  # l2norm(q) / sqrt(dk)
        kj = kj * tl.rsqrt(tl.sum(kj * kj, 0) + 1e-6)
        S = S * tl.exp(gj)
        u = (vj - tl.sum(S * kj[:, None], 0)) * bj  # beta (v - S^T k), with the decayed S: [BLOCK_V]
        S = S + kj[:, None] * u[None, :]
        o = tl.sum(S * qj[:, None], 0)
        tl.store(out_ptr + row * stride_ot + h * stride_oh + c, o.to(out_ptr.dtype.element_ty), mask=c_ok)
        if HAS_VERIFY:
            keep = ((flags & 2) != 0) & (j < n - 1)  # the state after the last position goes to the pool instead
            spec = spec_ptr + slot * stride_ps + j * stride_pj + h * stride_ph
            tl.store(spec + d[:, None] * stride_pk + c[None, :], S.to(spec_ptr.dtype.element_ty),
                     mask=tile_ok & keep)
        row += 1
        j += 1
    tl.store(state + tile, S.to(state_ptr.dtype.element_ty), mask=tile_ok)


def launch_config(dk: int, dv: int) -> dict[str, int]:
    """32 fp32 columns (one 128-byte line per state row) per program: at the real dk = 128 that is 4K state
    values, 32 registers a thread at 4 warps, and B * 32 heads * 4 programs, 128 at batch 1 (one per SM).
    Not yet timed on a GPU."""
    return dict(BLOCK_K=triton.next_power_of_2(dk), BLOCK_V=min(32, triton.next_power_of_2(dv)), num_warps=4)


def gdr_recurrent_fwd(
    q: torch.Tensor,  # [T, Hk, dk]
    k: torch.Tensor,  # [T, Hk, dk]
    v: torch.Tensor,  # [T, H, dv]
    g: torch.Tensor,  # [T, H]
    beta: torch.Tensor,  # [T, H]
    ssm_state: torch.Tensor,  # [S, H, dk, dv], updated in place
    spec_ssm: torch.Tensor | None,  # [S, J, H, dk, dv] when some sequence verifies
    state_slots: torch.Tensor,  # [B] int64 on the device
    meta: torch.Tensor,  # [n, 4] int32 on the device: (sequence index, first row, tokens, has_init | 2 * verify)
    has_verify: bool,
    out: torch.Tensor,  # [T, H, dv], the rows of these sequences are written
) -> None:
    """Runs the recurrence over the n sequences of `meta` (shapes checked by the caller, gdr_varlen_fwd)."""
    dk, H, dv = q.shape[2], v.shape[1], v.shape[2]
    cfg = launch_config(dk, dv)
    spec = spec_ssm if has_verify else ssm_state  # the pointer goes unused without verify chunks
    spec_strides = spec_ssm.stride()[:4] if has_verify else (0, 0, 0, 0)
    gdr_recurrent_fwd_kernel[(meta.shape[0], H, triton.cdiv(dv, cfg["BLOCK_V"]))](
        q, k, v, g, beta, out, ssm_state, spec, state_slots, meta, dk, dv, H // q.shape[1], dk ** -0.5,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0), beta.stride(0),
        out.stride(0), out.stride(1), *ssm_state.stride()[:3], *spec_strides,
        HAS_VERIFY=has_verify, **cfg)
