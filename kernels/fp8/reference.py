"""Fine-grained FP8 (e4m3, 128x128 weight blocks, dynamic per-token-group activations), docs/model.md §8.

weight_scale_inv is the dequantisation multiplier: W = W_fp8 * weight_scale_inv[i // 128, j // 128].
"""

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = torch.float8_e4m3fn


def _expand_blocks(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """[ceil(N/bn), ceil(K/bk)] block scales -> [N, K] per-element scales."""
    bn, bk = block
    return scale.repeat_interleave(bn, 0)[: shape[0]].repeat_interleave(bk, 1)[:, : shape[1]]


def quantize_weight_block(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (fp8 [N, K], weight_scale_inv fp32 [ceil(N/bn), ceil(K/bk)]); scale = amax(block) / 448."""
    N, K = w.shape
    bn, bk = block
    nb, kb = -(-N // bn), -(-K // bk)
    padded = torch.nn.functional.pad(w.float(), (0, kb * bk - K, 0, nb * bn - N))
    amax = padded.reshape(nb, bn, kb, bk).abs().amax(dim=(1, 3))
    scale_inv = amax.clamp(min=1e-12) / FP8_MAX
    q = (w.float() / _expand_blocks(scale_inv, (N, K), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale_inv


def dequantize_weight_block(w: torch.Tensor, scale_inv: torch.Tensor,
                            block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """fp8 [N, K] + [ceil(N/bn), ceil(K/bk)] -> fp32 [N, K]."""
    return w.float() * _expand_blocks(scale_inv.float(), tuple(w.shape), block)


def per_token_group_quant(x: torch.Tensor, group: int = 128, eps: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (fp8 [M, K], scales fp32 [M, ceil(K/group)]); s = max(amax(|x_group|), eps) / 448."""
    M, K = x.shape
    g = -(-K // group)
    padded = torch.nn.functional.pad(x.float(), (0, g * group - K)).reshape(M, g, group)
    amax = padded.abs().amax(-1).clamp(min=eps)
    # divide by a tensor, not a Python scalar: on CUDA torch turns division by a scalar into a multiplication by
    # its reciprocal (one ulp off in some scales); tensor / tensor rounds once, as the Triton kernel's div_rn
    s = amax / torch.full_like(amax, FP8_MAX)
    q = (padded / s[..., None]).clamp(-FP8_MAX, FP8_MAX).reshape(M, g * group)[:, :K].to(FP8_DTYPE)
    return q, s


def fp8_block_linear(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor,
                     block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """y = x W^T with W8A8 block scaling: x [..., K] quantised per token per 128-group, W fp8 [N, K]. Returns x.dtype.

    The reference dequantises both operands to fp32 and multiplies: the same sum as the blocked kernel's
    sum_kb (x_q . w_q) * s_x * s_w, in fp32.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, xs = per_token_group_quant(x2, block[1])
    x_deq = xq.float() * xs.repeat_interleave(block[1], 1)[:, : shape[-1]]
    y = x_deq @ dequantize_weight_block(w, scale_inv, block).t()
    return y.to(x.dtype).reshape(*shape[:-1], w.shape[0])
