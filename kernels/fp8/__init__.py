"""Fine-grained FP8 (docs/model.md §8): Triton quantisation and block-scaled GEMM on CUDA (`triton_quant.py`,
`triton_gemm.py`), the torch references elsewhere. triton is imported only when a kernel runs."""

import torch

from qnext.kernels.dispatch import use_triton
from qnext.kernels.fp8 import reference
from qnext.kernels.fp8.reference import dequantize_weight_block, quantize_weight_block


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [M, K] with a contiguous last dim (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def per_token_group_quant(x: torch.Tensor, group: int = 128, eps: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 e4m3 [M, K], scales fp32 [M, ceil(K/group)]); s = max(amax(|x_group|), eps) / 448."""
    if not use_triton(x):
        return reference.per_token_group_quant(x, group, eps)
    from qnext.kernels.fp8.triton_quant import per_token_group_quant_fwd
    return per_token_group_quant_fwd(_rows(x), group, eps)


def fp8_block_linear(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor,
                     block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """y = x W^T, W8A8 block-scaled. x [..., K] (quantised per token per block[1]-group here),
    w fp8 [N, K], scale_inv fp32 [ceil(N/block[0]), ceil(K/block[1])] -> [..., N] in x's dtype."""
    if not use_triton(x):
        return reference.fp8_block_linear(x, w, scale_inv, block)
    from qnext.kernels.fp8.triton_gemm import fp8_block_gemm_fwd
    from qnext.kernels.fp8.triton_quant import per_token_group_quant_fwd
    xq, xs = per_token_group_quant_fwd(_rows(x), block[1])
    y = fp8_block_gemm_fwd(xq, xs, w, scale_inv, block, out_dtype=x.dtype)
    return y.view(*x.shape[:-1], w.shape[0])


__all__ = ["fp8_block_linear", "per_token_group_quant", "quantize_weight_block", "dequantize_weight_block"]
