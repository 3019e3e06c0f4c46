"""The Triton gated delta rule over a packed varlen batch: splits the batch the way the reference does and
launches the two paths. Sequences of one token (decodes) and speculative-verify chunks run the recurrent kernel
(`triton_recurrent.py`), one launch for all of them; the other multi-token sequences run the chunked kernels
(`triton_chunk.py`). Sequences of 0 tokens run nothing, so their slots stay as they are. All metadata goes to the
device in one copy."""

from __future__ import annotations

import torch

from qnext.kernels.gated_delta_rule.triton_chunk import CHUNK_SIZE, gdr_chunk_fwd
from qnext.kernels.gated_delta_rule.triton_recurrent import gdr_recurrent_fwd
from qnext.kernels.step_metadata import StepMetadata, VarlenLayout, query_starts


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
    step_meta: StepMetadata | None = None,  # the step's shared device tables (kernels/step_metadata.py)
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

    if step_meta is None:  # a call outside a model step: tables of its own
        marked = [bool(x) for x in is_verify] if is_verify else [False] * B  # as the caller marked them
        step_meta = StepMetadata(VarlenLayout.for_states(query_lens, has_initial_state, marked), v.device)
    assert len(step_meta.layout.query_lens) == B, "step_meta describes another batch"  # O(1): runs per layer
    meta = step_meta.get("gated_delta_rule", gdr_metadata)
    recurrent, chunked = step_meta.derived("gated_delta_rule", split_recurrent_chunked)  # once per step
    n_rec, n_chunk = 4 * len(recurrent), 5 * len(chunked)
    slots = state_slots.to(device=v.device, dtype=torch.int64)
    if recurrent:
        gdr_recurrent_fwd(q, k, v, g, beta, ssm_state, spec_ssm, slots, meta[:n_rec].view(-1, 4), any(verify), y)
    if chunked:
        gdr_chunk_fwd(q, k, v, g, beta, ssm_state, slots, meta[n_rec:n_rec + n_chunk].view(-1, 5),
                      meta[n_rec + n_chunk:].view(-1, 2), y)
    return y


def split_recurrent_chunked(layout: VarlenLayout) -> tuple[list[int], list[int]]:
    """Sequences for the recurrent kernel (one token, or a verify chunk) and for the chunked one (the rest of
    the non-empty ones)."""
    recurrent, chunked = [], []
    for i, (n, verify) in enumerate(zip(layout.query_lens, layout.is_verify)):
        if n == 1 or (verify and n > 1):
            recurrent.append(i)
        elif n > 1:
            chunked.append(i)
    return recurrent, chunked


def gdr_metadata(layout: VarlenLayout) -> list[int]:
    """[recurrent sequences x (sequence, start, length, flags: 1 initial state, 2 verify) | chunked sequences x
    (sequence, start, length, has initial state, first item) | items x (first row, tokens) of CHUNK_SIZE]."""
    starts = query_starts(layout.query_lens)
    lens, init, verify = layout.query_lens, layout.has_initial_state, layout.is_verify
    recurrent, chunked = split_recurrent_chunked(layout)
    rec_meta = [x for i in recurrent for x in (i, starts[i], lens[i], int(init[i]) | 2 * (verify[i] and lens[i] > 1))]
    chunk_meta, items = [], []
    for i in chunked:
        chunk_meta += [i, starts[i], lens[i], int(init[i]), len(items) // 2]
        items += [x for t0 in range(0, lens[i], CHUNK_SIZE) for x in (starts[i] + t0, min(CHUNK_SIZE, lens[i] - t0))]
    return rec_meta + chunk_meta + items
