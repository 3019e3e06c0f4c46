"""The Triton gated delta rule over a packed varlen batch: splits the batch the way the reference does and
launches the two paths. Sequences of one token (decodes) and speculative-verify chunks run the recurrent kernel
(`triton_recurrent.py`), one launch for all of them; the other multi-token sequences run the chunked kernels
(`triton_chunk.py`). Sequences of 0 tokens run nothing, so their slots stay as they are. All metadata goes to the
device in one copy."""

from __future__ import annotations

import torch

from kernels.gated_delta_rule.triton_chunk import CHUNK_SIZE, gdr_chunk_fwd
from kernels.gated_delta_rule.triton_recurrent import gdr_recurrent_fwd
from kernels.triton_common import int32_on


def gdr_varlen_fwd(
    q: torch.Tensor,  # [T, Hk, dk]
    k: torch.Tensor,  # [T, Hk, dk]
    v: torch.Tensor,  # [T, H, dv], H % Hk == 0
    g: torch.Tensor,  # [T, H]
    beta: torch.Tensor,  # [T, H]
    ssm_state: torch.Tensor,  # [S, H, dk, dv], updated in place
    state_slots: torch.Tensor,  # [B] int64
    query_lens: list[int],
    has_initial_state: list[bool],
    is_verify: list[bool] | None = None,
    spec_ssm: torch.Tensor | None = None,  # [S, J, H, dk, dv]
    out: torch.Tensor | None = None,  # [T, H, dv]
) -> torch.Tensor:
    """out [T, H, dv] in v's dtype; the slots' states advance, verify chunks keep every intermediate state."""
    T, Hk, dk = q.shape
    H, dv = v.shape[1:]
    B = len(query_lens)
    assert k.shape == q.shape and v.shape[0] == T and H % Hk == 0, "q, k: [T, Hk, dk]; v: [T, H, dv], Hk | H"
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1, "contiguous head dims"
    assert g.shape == (T, H) and beta.shape == (T, H) and g.stride(1) == 1 and beta.stride(1) == 1
    assert ssm_state.dim() == 4 and ssm_state.shape[1:] == (H, dk, dv) and ssm_state.stride(3) == 1
    assert state_slots.shape == (B,) and len(has_initial_state) == B and sum(query_lens) == T
    verify = [bool(x) and n > 1 for x, n in zip(is_verify, query_lens)] if is_verify else [False] * B
    if any(verify):
        assert spec_ssm is not None and spec_ssm.shape[2:] == (H, dk, dv) and spec_ssm.stride(4) == 1
        assert all(n - 1 <= spec_ssm.shape[1] for n, x in zip(query_lens, verify) if x), "spec_ssm too short"
        assert all(h for h, x in zip(has_initial_state, verify) if x), "a verify chunk continues a sequence"
    y = torch.empty(T, H, dv, dtype=v.dtype, device=v.device) if out is None else out
    assert y.shape == (T, H, dv) and y.stride(2) == 1
    if T == 0:
        return y

    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    recurrent = [i for i, n in enumerate(query_lens) if n == 1 or verify[i]]
    chunked = [i for i, n in enumerate(query_lens) if n > 1 and not verify[i]]
    rec_meta = [x for i in recurrent
                for x in (i, starts[i], query_lens[i], int(has_initial_state[i]) | 2 * verify[i])]
    chunk_meta, items = [], []
    for i in chunked:
        chunk_meta += [i, starts[i], query_lens[i], int(has_initial_state[i]), len(items) // 2]
        items += [x for t0 in range(0, query_lens[i], CHUNK_SIZE)
                  for x in (starts[i] + t0, min(CHUNK_SIZE, query_lens[i] - t0))]
    # one host -> device copy for the call's metadata
    meta = int32_on(rec_meta + chunk_meta + items, v.device)  # no host stall per layer
    slots = state_slots.to(device=v.device, dtype=torch.int64)
    n_rec, n_chunk = len(rec_meta), len(chunk_meta)
    if recurrent:
        gdr_recurrent_fwd(q, k, v, g, beta, ssm_state, spec_ssm, slots, meta[:n_rec].view(-1, 4), any(verify), y)
    if chunked:
        gdr_chunk_fwd(q, k, v, g, beta, ssm_state, slots, meta[n_rec:n_rec + n_chunk].view(-1, 5),
                      meta[n_rec + n_chunk:].view(-1, 2), y)
    return y
