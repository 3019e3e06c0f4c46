"""Plain-torch norms of Qwen3-Next (docs/model.md §3)."""

import torch
import torch.nn.functional as F

from qnext.kernels.gated_delta_rule.reference import compute_dtype


def rms_norm_zero_centred(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / rms(x) * (1 + w), computed in fp32, returned in x's dtype. x: [..., D], weight: [D]."""
    ct = compute_dtype(x.dtype)
    # torch's fused rms_norm: the same fp32 arithmetic (x * rsqrt(mean(x^2) + eps) * w) in one op, not five
    return F.rms_norm(x.to(ct), x.shape[-1:], 1.0 + weight.to(ct), eps).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Norm before gate: y = w * (x / rms(x)) * silu(z). x, z: [..., D]; weight: [D] (plain, not 1+w)."""
    x32 = x.to(compute_dtype(x.dtype))
    y = weight * F.rms_norm(x32, x.shape[-1:], None, eps).to(x.dtype)
    return (y * F.silu(z.to(x32.dtype))).to(x.dtype)
