"""Gated delta rule (docs/model.md §4.4-4.5): the Triton kernels on CUDA (`triton_gdr.py`: chunked prefill, recurrent
decode and speculative verify), the torch reference elsewhere. triton is imported only when the kernels run."""

import torch

from qnext.kernels.dispatch import use_triton
from qnext.kernels.gated_delta_rule import reference
from qnext.kernels.step_metadata import StepMetadata


def gated_delta_rule_varlen(
    q: torch.Tensor,  # [T, Hk, dk] packed queries of B sequences; value head h reads key head h // (H // Hk)
    k: torch.Tensor,  # [T, Hk, dk]
    v: torch.Tensor,  # [T, H, dv]
    g: torch.Tensor,  # [T, H] log decay (<= 0)
    beta: torch.Tensor,  # [T, H]
    ssm_state: torch.Tensor,  # [S, H, dk, dv] one layer's state pool, updated in place
    state_slots: torch.Tensor,  # [B] int64 slot of each sequence
    query_lens: list[int],  # tokens of each sequence (sum = T); 0 leaves the slot as it is
    has_initial_state: list[bool],  # False: the sequence starts here from a zero state
    is_verify: list[bool] | None = None,  # speculative verify: keep the state after every position
    spec_ssm: torch.Tensor | None = None,  # [S, k_max, H, dk, dv]: state after position j of slot s at [s, j]
    step_meta: StepMetadata | None = None,  # the step's shared device tables (Triton only)
) -> torch.Tensor:  # [T, H, dv] in v's dtype
    """Continues each sequence from its state slot (L2-normalised q, k; q scaled by dk^-0.5; fp32 inside) and
    leaves the new state in the slot: prefills chunked, decodes and verify chunks token by token."""
    if not use_triton(v):
        return reference.gated_delta_rule_varlen(q, k, v, g, beta, ssm_state, state_slots, query_lens,
                                                 has_initial_state, is_verify, spec_ssm)
    from qnext.kernels.gated_delta_rule.triton_gdr import gdr_varlen_fwd
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    g, beta = (x if x.stride(-1) == 1 else x.contiguous() for x in (g, beta))
    return gdr_varlen_fwd(q, k, v, g, beta, ssm_state, state_slots, query_lens, has_initial_state, is_verify,
                          spec_ssm, step_meta=step_meta)


__all__ = ["gated_delta_rule_varlen"]
