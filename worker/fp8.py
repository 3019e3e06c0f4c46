"""Keep FP8 block-128 weights as FP8 on the device: swap the built model's linears for `Fp8Linear`.

Applied to a model built on the meta device, before loading, so the parameters get FP8 dtype and the
checkpoint's `weight_scale_inv` tensors have somewhere to go. On CPU the loader dequantizes instead.
"""

from __future__ import annotations

import torch
from torch import nn

from qnext.kernels.fp8 import fp8_block_linear
from qnext.kernels.fp8.reference import FP8_DTYPE
from qnext.worker.config import QuantConfig
from qnext.worker.model import Experts


def _blocks(n: int, block: int = 128) -> int:
    return -(-n // block)


class Fp8Linear(nn.Module):
    """y = x W^T with W fp8 [out, in] and block scales [ceil(out/128), ceil(in/128)]; activations quantised
    per token per 128-group at run time (dynamic scheme)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(_blocks(out_features), _blocks(in_features), dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_block_linear(x, self.weight, self.weight_scale_inv)


def is_quantized_linear(module: nn.Module, name: str, quant: QuantConfig) -> bool:
    """Linears stored as FP8 in the checkpoint: every nn.Linear not listed in modules_to_not_convert."""
    return isinstance(module, (nn.Linear, Fp8Linear)) and quant.is_quantized(name)


def experts_are_quantized(experts_name: str, quant: QuantConfig) -> bool:
    return quant.is_quantized(f"{experts_name}.0.gate_proj")


def apply_fp8(model: nn.Module, quant: QuantConfig) -> None:
    """Replace quantized linears and expert stacks in place (model on the meta device)."""
    for name, module in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.Linear) and is_quantized_linear(module, name, quant):
            assert module.bias is None, f"{name}: FP8 linears with bias are not supported"
            with torch.device(module.weight.device):
                setattr(parent, attr, Fp8Linear(module.in_features, module.out_features))
        elif isinstance(module, Experts) and experts_are_quantized(name, quant):
            with torch.device(module.w_gate.device):
                for proj in ("w_gate", "w_up", "w_down"):
                    w = getattr(module, proj)
                    E, rows, cols = w.shape
                    setattr(module, proj, nn.Parameter(torch.empty(E, rows, cols, dtype=FP8_DTYPE),
                                                       requires_grad=False))
                    setattr(module, f"{proj}_scale_inv", nn.Parameter(
                        torch.empty(E, _blocks(rows), _blocks(cols), dtype=torch.float32), requires_grad=False))
            module.is_fp8 = True
