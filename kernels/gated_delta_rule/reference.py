"""Gated delta rule (docs/model.md §4.4-4.5), plain torch, fp32 inside (fp64 for fp64 inputs).

Recurrence per value head, state S: [dk, dv]:
    S_t = exp(g_t) * S_{t-1};  u_t = beta_t * (v_t - S_t^T k_t);  S_t += k_t u_t^T;  o_t = S_t^T q_t
with q, k L2-normalised and q scaled by dk^-0.5. The chunked form (chunk 64, WY representation) is the
same function computed chunk-parallel; it is what prefill uses, the recurrent step is what decode uses.
Both take and return the state, so prefill can continue from a cached state.
"""

import torch

from qnext.kernels.state_rows import read_rows, write_rows

CHUNK_SIZE = 64
# Recurrent steps over at most this many state elements (B x H x dk x dv) use the broadcast form, larger ones
# batched matmuls: the crossover measured on a 2-core CPU (e.g. 1 sequence x 4 heads x 32 x 32: 85 vs 112 us,
# 16 x 4 x 64 x 64: 1.4 ms vs 0.16 ms). Only tiny models fall below it; the same arithmetic either way.
SMALL_STATE = 32768


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 (tests use it to show the algorithms are exact)."""
    return torch.promote_types(dtype, torch.float32)


def _prepare(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = q.shape[-1] ** -0.5
    ct = compute_dtype(q.dtype)
    return l2norm(q.to(ct)) * scale, l2norm(k.to(ct))


def recurrent_step(
    q: torch.Tensor,  # [B, H, dk]
    k: torch.Tensor,  # [B, H, dk]
    v: torch.Tensor,  # [B, H, dv]
    g: torch.Tensor,  # [B, H] log decay (<= 0)
    beta: torch.Tensor,  # [B, H]
    s: torch.Tensor,  # [B, H, dk, dv] in the compute dtype: advanced IN PLACE to the state after this token
) -> torch.Tensor:  # o [B, H, dv] (compute dtype)
    """One token of the recurrence. In place because every caller owns a fresh copy of the state (gathered from
    the slot pool), so a second copy per token would be pure cost."""
    q, k = _prepare(q, k)
    ct = q.dtype
    dk, dv = s.shape[-2:]
    s.mul_(g.to(ct).exp()[..., None, None])
    if s.numel() <= SMALL_STATE:
        # broadcast-multiply-and-sum: fewest dispatch hops, cheapest while the [B, H, dk, dv] temporaries are small
        u = (v.to(ct) - (s * k[..., None]).sum(-2)) * beta.to(ct)[..., None]
        s.add_(k[..., None] * u[..., None, :])
        return (s * q[..., None]).sum(-2)
    # Batched [1, dk] @ [dk, dv] products: no [B, H, dk, dv] temporary per product (3.7x faster for a decode
    # step of 16 sequences on a CPU)
    kv = (k[..., None, :] @ s)[..., 0, :]  # S^T k: [B, H, dv]
    u = (v.to(ct) - kv) * beta.to(ct)[..., None]
    s.view(-1, dk, dv).baddbmm_(k.reshape(-1, dk, 1), u.reshape(-1, 1, dv))  # S += k u^T
    return (q[..., None, :] @ s)[..., 0, :]


def chunk_forward(
    q: torch.Tensor,  # [n, H, dk] one sequence
    k: torch.Tensor,  # [n, H, dk]
    v: torch.Tensor,  # [n, H, dv]
    g: torch.Tensor,  # [n, H]
    beta: torch.Tensor,  # [n, H]
    state: torch.Tensor | None,  # [H, dk, dv] or None (zeros)
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:  # o [n, H, dv], final state [H, dk, dv] (compute dtype)
    n, H, dk = q.shape
    dv = v.shape[-1]
    C = chunk_size
    q, k = _prepare(q, k)
    ct = q.dtype
    v, g, beta = v.to(ct), g.to(ct), beta.to(ct)
    pad = (C - n % C) % C
    # [H, n_pad, d]; padded tokens have k = v = beta = g = 0, so they neither write nor decay the state.
    q, k, v = (torch.nn.functional.pad(t.transpose(0, 1), (0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (torch.nn.functional.pad(t.transpose(0, 1), (0, pad)) for t in (g, beta))
    N = (n + pad) // C
    q, k, v = (t.reshape(H, N, C, -1) for t in (q, k, v))
    g, beta = g.reshape(H, N, C), beta.reshape(H, N, C)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    G = g.cumsum(-1)  # [H, N, C]
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[i, j] = exp(G_i - G_j) for i >= j; mask before exp so the upper triangle cannot overflow.
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    # Solve (I + strictly_lower(diag(beta) K K^T * decay)) A = I by forward substitution (WY form).
    strictly_lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    A = -(k_beta @ k.transpose(-1, -2) * decay).masked_fill(~strictly_lower, 0.0)
    for i in range(1, C):
        A[..., i, :i] = A[..., i, :i] + (A[..., i, :i, None] * A[..., :i, :i]).sum(-2)
    A = A + torch.eye(C, dtype=ct, device=q.device)
    U = A @ v_beta  # [H, N, C, dv]
    W = A @ (k_beta * G.exp()[..., None])  # [H, N, C, dk]
    S = torch.zeros(H, dk, dv, dtype=ct, device=q.device) if state is None else state.to(ct).clone()
    out = torch.empty(H, N, C, dv, dtype=ct, device=q.device)
    for c in range(N):
        qc, kc, Gc = q[:, c], k[:, c], G[:, c]
        attn = (qc @ kc.transpose(-1, -2) * decay[:, c])  # already zero above the diagonal
        v_new = U[:, c] - W[:, c] @ S
        out[:, c] = (qc * Gc.exp()[..., None]) @ S + attn @ v_new
        last = Gc[:, -1:]  # [H, 1]
        S = S * last.exp()[..., None] + (kc * (last - Gc).exp()[..., None]).transpose(-1, -2) @ v_new
    o = out.reshape(H, N * C, dv)[:, :n].transpose(0, 1)
    return o, S


def _initial_states(ssm_state: torch.Tensor, slots: torch.Tensor, keep: list[bool]) -> torch.Tensor:
    """[B, H, dk, dv]: the slots' states where `keep`, else zeros. A fresh sequence's slot may hold anything
    (a freed slot, NaN in tests), so it is selected away, not multiplied by zero."""
    s = ssm_state.index_select(0, slots)  # a fresh copy (and 4x faster than ssm_state[slots] on a CPU)
    if all(keep):  # every decode step: no select pass over the states
        return s
    keep_t = torch.tensor(keep, device=s.device)
    return torch.where(keep_t[:, None, None, None], s, torch.zeros((), dtype=s.dtype, device=s.device))


def _chunked_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     ssm_state: torch.Tensor, state_slots: torch.Tensor, starts: list[int], query_lens: list[int],
                     has_initial_state: list[bool], seqs: list[int], out: torch.Tensor) -> None:
    """All multi-token sequences in one chunked pass: each is zero-padded at its end to the longest, and
    (sequence, head) pairs are folded into one head axis. A padded token has k = v = g = beta = 0, so it
    neither decays nor writes the state: every sequence's final state is exactly its own."""
    n_max = max(query_lens[i] for i in seqs)
    B, H = len(seqs), q.shape[1]
    rows = torch.tensor([starts[i] + t for i in seqs for t in range(n_max)], device=q.device)
    valid = torch.tensor([t < query_lens[i] for i in seqs for t in range(n_max)], device=q.device)
    rows = torch.where(valid, rows, 0)

    def packed(x: torch.Tensor) -> torch.Tensor:  # [T, H, ...] -> [n_max, B * H, ...] with zero padding
        y = x[rows] * valid.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        y = y.view(B, n_max, *x.shape[1:]).transpose(0, 1)
        return y.reshape(n_max, B * H, *x.shape[2:])

    slots = state_slots[seqs]
    s0 = _initial_states(ssm_state, slots, [has_initial_state[i] for i in seqs]).reshape(B * H, *ssm_state.shape[2:])
    o, s1 = chunk_forward(packed(q), packed(k), packed(v), packed(g), packed(beta), s0)
    o = o.reshape(n_max, B, H, -1).transpose(0, 1).reshape(B * n_max, H, -1)
    out[rows[valid]] = o[valid]
    ssm_state[slots] = s1.reshape(B, *ssm_state.shape[1:]).to(ssm_state.dtype)


def gated_delta_rule_varlen(
    q: torch.Tensor,  # [T, Hk, dk] with H % Hk == 0: value head h reads key head h // (H // Hk)
    k: torch.Tensor,  # [T, Hk, dk]
    v: torch.Tensor,  # [T, H, dv]
    g: torch.Tensor,  # [T, H]
    beta: torch.Tensor,  # [T, H]
    ssm_state: torch.Tensor,  # [S, H, dk, dv] one layer's state pool, updated in place
    state_slots: torch.Tensor,  # [B] int64
    query_lens: list[int],
    has_initial_state: list[bool],
    is_verify: list[bool] | None = None,  # speculative verify: keep the state after every position
    spec_ssm: torch.Tensor | None = None,  # [S, k_max, H, dk, dv]: state after position j of slot s at [s, j]
) -> torch.Tensor:  # [T, H, dv] in v's dtype
    """Prefill chunks (chunked form), decodes (one batched recurrent step) and speculative-verify chunks
    (recurrent steps, recording the state after each position but the last so the engine can roll the slot
    back to the last accepted token) in one packed batch. A sequence of 0 tokens leaves its slot as it is."""
    H = v.shape[1]
    assert q.shape == k.shape and H % q.shape[1] == 0, "q, k: [T, Hk, dk] with Hk dividing v's H"
    if q.shape[1] != H:
        q, k = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (q, k))
    is_verify = is_verify or [False] * len(query_lens)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    ct = compute_dtype(v.dtype)
    single = [i for i, n in enumerate(query_lens) if n == 1]
    all_decode = len(single) == len(query_lens)  # rows are 0..T-1: no row gathers or scatters
    if single:
        slots = state_slots if all_decode else state_slots[single]
        rows = None if all_decode else torch.tensor([starts[i] for i in single], device=v.device)
        keep = [has_initial_state[i] for i in single]
        if all(keep):  # every sequence continues: advance its state in the pool's own rows where it can
            s0, run = read_rows(ssm_state, slots, ct)
        else:
            s0, run = _initial_states(ssm_state, slots, keep).to(ct), None  # ours to advance, scattered back
        o = recurrent_step(*((x if all_decode else x[rows]) for x in (q, k, v, g, beta)), s0)
        write_rows(ssm_state, slots, run, s0)
        if all_decode:
            return o.to(v.dtype)
    out = torch.empty(v.shape, dtype=ct, device=v.device)
    if single:
        out[rows] = o
    # verify chunks, batched by length: one recurrent step of the whole group per position (per sequence and
    # position it was 6 layers x 16 sequences x 3 positions of single-row steps at batch 16, k = 2)
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(query_lens):
        if n > 1 and is_verify[i]:
            by_len.setdefault(n, []).append(i)
    for n, group in by_len.items():
        assert all(has_initial_state[i] for i in group) and spec_ssm is not None and n - 1 <= spec_ssm.shape[1]
        slots = state_slots[group]
        st, run = read_rows(ssm_state, slots, ct)  # ours to advance, or the pool's own rows (then in place)
        for j in range(n):
            r = (slice(starts[group[0]] + j, starts[group[0]] + j + 1) if len(group) == 1 else
                 torch.tensor([starts[i] + j for i in group], device=v.device))
            out[r] = recurrent_step(q[r], k[r], v[r], g[r], beta[r], st)
            if j < n - 1:
                spec_ssm[slots, j] = st.to(spec_ssm.dtype)
        write_rows(ssm_state, slots, run, st)
    prefill = [i for i, n in enumerate(query_lens) if n > 1 and not is_verify[i]]
    if prefill:
        _chunked_prefill(q, k, v, g, beta, ssm_state, state_slots, starts, query_lens, has_initial_state, prefill,
                         out)
    return out.to(v.dtype)
