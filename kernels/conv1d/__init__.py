"""Causal depthwise conv1d + SiLU (docs/model.md §4.2): the Triton kernel on CUDA (`triton_conv.py`), the torch
reference elsewhere. triton is imported only when the kernel runs."""

import torch

from qnext.kernels.conv1d import reference
from qnext.kernels.dispatch import use_triton
from qnext.kernels.step_metadata import StepMetadata


def causal_conv1d_varlen(
    x: torch.Tensor,  # [T, D] packed inputs of B sequences
    weight: torch.Tensor,  # [D, K] depthwise kernel
    conv_state: torch.Tensor,  # [S, K-1, D] one layer's state pool (time-major), updated in place
    state_slots: torch.Tensor,  # [B] int64 slot of each sequence
    query_lens: list[int],  # tokens of each sequence in x (sum = T)
    has_initial_state: list[bool],  # False: the sequence starts here, its history is zeros
    is_verify: list[bool] | None = None,  # speculative verify: keep the conv state after every position
    spec_conv: torch.Tensor | None = None,  # [S, k_max, K-1, D]: state after position j of slot s at [s, j]
    step_meta: StepMetadata | None = None,  # the step's shared device tables (Triton only)
) -> torch.Tensor:  # [T, D] silu(conv(x))
    """Continues each sequence from its conv state (its last K-1 inputs) and leaves the new one in the pool."""
    if not use_triton(x):
        return reference.causal_conv1d_varlen(x, weight, conv_state, state_slots, query_lens, has_initial_state,
                                              is_verify, spec_conv)
    from qnext.kernels.conv1d.triton_conv import causal_conv1d_varlen_fwd
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    return causal_conv1d_varlen_fwd(x, weight, conv_state, state_slots, query_lens, has_initial_state, is_verify,
                                    spec_conv, step_meta=step_meta)


__all__ = ["causal_conv1d_varlen"]
