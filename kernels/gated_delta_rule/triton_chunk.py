"""Triton gated delta rule for prefill, chunked (docs/model.md §4.5, chunk C = 64): the semantics of
`reference.chunk_forward` over the multi-token sequences of a packed varlen batch, in two launches.

Per chunk of one sequence and value head, with q, k L2-normalised (q also scaled by dk^-0.5), G the cumulative
sum of g inside the chunk and D[i, j] = exp(G_i - G_j) for i >= j:

1. `gdr_chunk_inverse_kernel`, one program per (chunk, head), all chunks in parallel: the WY factor
   A = (I + L)^-1, L = strictly_lower(diag(beta) K K^T * D), into a [chunks, H, C, C] fp32 workspace: forward
   substitution inside the four 16-row diagonal blocks (15 steps, the blocks side by side in one tile, each step
   a dot), then the off-diagonal blocks in closed form (four dots). This is the only sequential-in-C part of a
   chunk, so it is kept off the chunk-to-chunk path.
2. `gdr_chunk_fwd_kernel`, one program per (sequence, head, BLOCK_V state columns), walking its chunks in order
   with the [dk, BLOCK_V] state slice S in registers (fp32), from the pool slot (zeros for a fresh sequence)
   back to it:
       V_new = A (diag(beta) V - diag(beta exp(G)) K S)        (= U - W S of the reference)
       O     = diag(exp(G)) Q S + (Q K^T * D) V_new             (lower triangle, diagonal included)
       S     = exp(G_last) S + (diag(exp(G_last - G)) K)^T V_new
   Every exponent is <= 0 (g <= 0 makes G decrease along the chunk), and D is masked before the exp.

A chunk's tail past the sequence's end loads k = v = g = beta = 0, as the reference pads: those rows neither
decay nor write the state and their outputs are not stored. Dots take fp32 operands; `launch_config` says at
which precision the GPU multiplies them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK_SIZE = 64


@triton.jit
def gdr_chunk_inverse_kernel(
    k_ptr, g_ptr, beta_ptr, a_ptr,  # k: [T, Hk, dk]; g, beta: [T, H]; a: [chunks, H, C, C] fp32
    items_ptr,  # [chunks, 2] int32: first row, tokens (<= C)
    dk, group, stride_kt, stride_kh, stride_gt, stride_bt,
    C: tl.constexpr, SUB: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(C == 4 * SUB, "the block inverse below is written for 4 diagonal blocks")
    chunk = tl.program_id(0)
    h = tl.program_id(1)
    H = tl.num_programs(1)
    row0 = tl.load(items_ptr + 2 * chunk).to(tl.int64)
    n = tl.load(items_ptr + 2 * chunk + 1)
    i = tl.arange(0, C)
    d = tl.arange(0, BLOCK_K)
    ok = i < n
    k = tl.load(k_ptr + row0 * stride_kt + (h // group) * stride_kh + i[:, None] * stride_kt + d[None, :],
                mask=ok[:, None] & (d < dk)[None, :], other=0.0).to(tl.float32)  # [C, BLOCK_K]
    k = k * tl.rsqrt(tl.sum(k * k, 1) + 1e-6)[:, None]
    g = tl.load(g_ptr + row0 * stride_gt + i * stride_gt + h, mask=ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + row0 * stride_bt + i * stride_bt + h, mask=ok, other=0.0).to(tl.float32)
    G = tl.cumsum(g, 0)
    below = i[:, None] > i[None, :]
    decay = tl.exp(tl.where(below, G[:, None] - G[None, :], float("-inf")))  # 0 on and above the diagonal
    L = tl.dot(k, tl.trans(k), input_precision=DOT_PRECISION) * beta[:, None] * decay  # [C, C] strictly lower
    # (I + L)^-1 by blocks of SUB rows. The diagonal blocks first, all at once: forward substitution on
    # X = -L_diag, row r of every block from the rows above it (final already),
    # X[r, :r] += X[r, :r] @ X[:r, :r]; X's zeros outside the diagonal blocks keep the blocks apart.
    same = (i[:, None] // SUB) == (i[None, :] // SUB)
    eye = (i[:, None] == i[None, :]).to(tl.float32)
    X = tl.where(same, -L, 0.0)
    for r in range(1, SUB):
        is_r = (i % SUB == r)[:, None]
        X_r = tl.where(is_r, X, 0.0)
        X = tl.where(is_r, X_r + tl.dot(X_r, X, input_precision=DOT_PRECISION), X)
    Td = X + eye  # (I + L_diag)^-1, block diagonal
    # I + L = (I + L_diag)(I + N) with N = Td L_off strictly block-lower, so N^(C/SUB) = 0 and
    # (I + L)^-1 = (I - N + N^2 - N^3) Td for C / SUB = 4 blocks.
    N = tl.dot(Td, tl.where(same, 0.0, L), input_precision=DOT_PRECISION)
    N2 = tl.dot(N, N, input_precision=DOT_PRECISION)
    P = eye - N + N2 - tl.dot(N, N2, input_precision=DOT_PRECISION)
    A = tl.dot(P, Td, input_precision=DOT_PRECISION)
    a = a_ptr + (chunk * H + h).to(tl.int64) * (C * C)
    tl.store(a + i[:, None] * C + i[None, :], A)


@triton.jit
def gdr_chunk_fwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, out_ptr, a_ptr,  # out like v; a: the inverse kernel's workspace
    state_ptr, slots_ptr, meta_ptr,  # state: [S, H, dk, dv]; meta: [n, 5] int32
    dk, dv, group, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_bt, stride_ot, stride_oh,
    stride_ss, stride_sh, stride_sk,
    C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    e = meta_ptr + 5 * tl.program_id(0)
    b = tl.load(e)  # index of the sequence in the batch
    start = tl.load(e + 1).to(tl.int64)
    n = tl.load(e + 2)
    has_init = (tl.load(e + 3) & 1) != 0
    chunk0 = tl.load(e + 4)  # its first chunk in the workspace
    h = tl.program_id(1)
    H = tl.num_programs(1)
    kh = h // group
    slot = tl.load(slots_ptr + b).to(tl.int64)

    i = tl.arange(0, C)
    d = tl.arange(0, BLOCK_K)
    c = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    d_ok, c_ok = d < dk, c < dv
    tile = d[:, None] * stride_sk + c[None, :]
    tile_ok = d_ok[:, None] & c_ok[None, :]
    state = state_ptr + slot * stride_ss + h * stride_sh
    S = tl.load(state + tile, mask=tile_ok & has_init, other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_V]
    lower = i[:, None] >= i[None, :]

    ci = 0
    while ci * C < n:  # not `range`: the interpreter cannot take a loaded scalar as a range bound
        rows = start + ci * C + i  # int64
        ok = ci * C + i < n
        qf = tl.load(q_ptr + rows[:, None] * stride_qt + kh * stride_qh + d[None, :],
                     mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [C, BLOCK_K]
        kf = tl.load(k_ptr + rows[:, None] * stride_kt + kh * stride_kh + d[None, :],
                     mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        # The L2 norms (and every other per-row factor) scale rows of a dot's operand, so they are applied to
        # its result or to the small [C, BLOCK_V] operand instead: Q and K enter the dots as loaded, with no
        # scaled [C, BLOCK_K] copies (those made the compiled kernel spill), and bf16 inputs, exact in TF32,
        # multiply exactly.
        rq = tl.rsqrt(tl.sum(qf * qf, 1) + 1e-6) * scale  # [C]
        rk = tl.rsqrt(tl.sum(kf * kf, 1) + 1e-6)
        v = tl.load(v_ptr + rows[:, None] * stride_vt + h * stride_vh + c[None, :],
                    mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)  # [C, BLOCK_V]
        g = tl.load(g_ptr + rows * stride_gt + h, mask=ok, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + rows * stride_bt + h, mask=ok, other=0.0).to(tl.float32)
        G = tl.cumsum(g, 0)
        G_last = tl.sum(tl.where(i == C - 1, G, 0.0), 0)
        eG = tl.exp(G)
        a = a_ptr + ((chunk0 + ci) * H + h).to(tl.int64) * (C * C)
        A = tl.load(a + i[:, None] * C + i[None, :])  # [C, C]

        kS = tl.dot(kf, S, input_precision=DOT_PRECISION)  # [C, BLOCK_V], unnormalised K
        rhs = beta[:, None] * (v - (rk * eG)[:, None] * kS)
        v_new = tl.dot(A, rhs, input_precision=DOT_PRECISION)  # [C, BLOCK_V]
        decay = tl.exp(tl.where(lower, G[:, None] - G[None, :], float("-inf")))
        attn = tl.dot(qf, tl.trans(kf), input_precision=DOT_PRECISION) * (rq[:, None] * rk[None, :] * decay)
        o = tl.dot(qf, S, input_precision=DOT_PRECISION) * (rq * eG)[:, None]
        o = tl.dot(attn, v_new, o, input_precision=DOT_PRECISION)
        tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + c[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=ok[:, None] & c_ok[None, :])
        v_end = v_new * (rk * tl.exp(G_last - G))[:, None]
        S = tl.dot(tl.trans(kf), v_end, S * tl.exp(G_last), input_precision=DOT_PRECISION)
        ci += 1
    tl.store(state + tile, S.to(state_ptr.dtype.element_ty), mask=tile_ok)


def launch_config(dk: int, dv: int, on_cuda: bool) -> dict[str, object]:
    """tl.dot wants every dim >= 16. BLOCK_V = 32: at dk = dv = 128, 32 heads x 4 column blocks = 128 programs
    per prefilling sequence (about one per SM of an H200), 8 warps. Dot precision on the GPU (the interpreter
    multiplies in fp32 whatever it is told): the inverse, parallel and off the chunk-to-chunk path, runs
    "tf32x3" (about fp32); the chunk walk runs plain TF32, whose 2^-11 per product is below the bf16 rounding of
    the outputs and finer than the bf16 operands flash-linear-attention and vLLM use there. tf32x3 in the walk
    spilled 2.3 KB of registers at these tiles (test_triton_compile.py); TF32 still spills about 0.6 KB (BLOCK_V
    = 16 spills 0.25 KB but doubles the Q K^T work and the programs), which the first GPU timing should weigh.
    Not yet timed on a GPU."""
    return dict(BLOCK_K=max(16, triton.next_power_of_2(dk)), BLOCK_V=max(16, min(32, triton.next_power_of_2(dv))),
                DOT_PRECISION="tf32" if on_cuda else "ieee", INVERSE_PRECISION="tf32x3" if on_cuda else "ieee",
                num_warps=8)


def gdr_chunk_fwd(
    q: torch.Tensor,  # [T, Hk, dk]
    k: torch.Tensor,  # [T, Hk, dk]
    v: torch.Tensor,  # [T, H, dv]
    g: torch.Tensor,  # [T, H]
    beta: torch.Tensor,  # [T, H]
    ssm_state: torch.Tensor,  # [S, H, dk, dv], updated in place
    state_slots: torch.Tensor,  # [B] int64 on the device
    meta: torch.Tensor,  # [n, 5] int32: (sequence index, first row, tokens, has_init, first chunk)
    items: torch.Tensor,  # [chunks, 2] int32: (first row, tokens) of every chunk of those sequences, in order
    out: torch.Tensor,  # [T, H, dv], the rows of these sequences are written
) -> None:
    """Chunked prefill of the n sequences of `meta` (shapes checked by the caller, gdr_varlen_fwd)."""
    dk, H, dv = q.shape[2], v.shape[1], v.shape[2]
    group = H // q.shape[1]
    cfg = launch_config(dk, dv, q.is_cuda)
    block_k, prec, warps = cfg["BLOCK_K"], cfg["DOT_PRECISION"], cfg["num_warps"]
    a = torch.empty(items.shape[0], H, CHUNK_SIZE, CHUNK_SIZE, dtype=torch.float32, device=q.device)
    gdr_chunk_inverse_kernel[(items.shape[0], H)](
        k, g, beta, a, items, dk, group, k.stride(0), k.stride(1), g.stride(0), beta.stride(0),
        C=CHUNK_SIZE, SUB=CHUNK_SIZE // 4, BLOCK_K=block_k, DOT_PRECISION=cfg["INVERSE_PRECISION"], num_warps=4)
    gdr_chunk_fwd_kernel[(meta.shape[0], H, triton.cdiv(dv, cfg["BLOCK_V"]))](
        q, k, v, g, beta, out, a, ssm_state, state_slots, meta, dk, dv, group, dk ** -0.5,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0), beta.stride(0),
        out.stride(0), out.stride(1), *ssm_state.stride()[:3],
        C=CHUNK_SIZE, BLOCK_K=block_k, BLOCK_V=cfg["BLOCK_V"], DOT_PRECISION=prec, num_warps=warps)
