"""RMSNorms (docs/model.md §3): the Triton kernels on CUDA (`triton_norms.py`), the zero-centred ones in C on a
CPU (kernels/cpu/norms.py) where the library built, the torch references elsewhere.

triton is imported only when a kernel runs, so CPU installs need not have it.
"""

import torch

from qnext.kernels.cpu import norms as cpu_norms
from qnext.kernels.dispatch import use_triton
from qnext.kernels.norms import reference


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [rows, D] with a contiguous last dim (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_zero_centred(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., D], weight: [D] -> [..., D] in x's dtype: x / rms(x) * (1 + w), computed in fp32."""
    if not use_triton(x):
        if cpu_norms.runs(x, weight):
            return cpu_norms.rms_norm_zero_centred(x, weight, eps)[0]
        return reference.rms_norm_zero_centred(x, weight, eps)
    from qnext.kernels.norms.triton_norms import rms_norm_fwd
    y, _ = rms_norm_fwd(_rows(x), weight.contiguous(), eps)
    return y.view(x.shape)


def add_rms_norm_zero_centred(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [..., D] -> (normed, h), h = x + residual in x's dtype, normed = rms_norm_zero_centred(h):
    the decoder block's `r = x + r; x = norm(r)` in one pass."""
    if not use_triton(x):
        if cpu_norms.runs(x, weight, residual):
            return cpu_norms.rms_norm_zero_centred(x, weight, eps, residual)
        h = x + residual
        return reference.rms_norm_zero_centred(h, weight, eps), h
    from qnext.kernels.norms.triton_norms import rms_norm_fwd
    y, h = rms_norm_fwd(_rows(x), weight.contiguous(), eps, residual=_rows(residual))
    return y.view(x.shape), h.view(x.shape)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x, z: [..., D], weight: [D] (plain, not 1 + w) -> [..., D] in x's dtype: w * (x / rms(x)) * silu(z)."""
    if not use_triton(x):
        return reference.gated_rms_norm(x, z, weight, eps)
    from qnext.kernels.norms.triton_norms import gated_rms_norm_fwd
    return gated_rms_norm_fwd(_rows(x), _rows(z), weight.contiguous(), eps).view(x.shape)


__all__ = ["rms_norm_zero_centred", "add_rms_norm_zero_centred", "gated_rms_norm"]
