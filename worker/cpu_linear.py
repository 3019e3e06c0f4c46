"""Linear layers on a CPU in bf16 / fp16 with their weights packed once for oneDNN.

`F.linear` on a CPU in bf16 hands oneDNN a plain row-major weight, which it reorders into its blocked layout on
every call: for the LM head (151,936 x 256 on the tiny checkpoints) that is a 78 MB copy per step, most of the
step at batch 16. Packing each weight once at load time (the `torch.ops.mkldnn` ops Inductor uses for frozen CPU
graphs) gives the same results bit for bit and, measured on the 2-core AVX512-BF16 box, 2.5x faster LM-head calls
at 3-16 rows (10.6 -> 4.2 ms at 16) and 1.3-2x faster small projections.

The plain weight stays on the module (the router reads `gate.weight`, tied embeddings share it), so linear
weights take twice the memory on a CPU: fine for the checkpoints a CPU serves. Not used on CUDA, in float32
(no bf16 blocked path to win), or under tensor parallelism (its all-reduce hooks sit on the original modules).
"""

from __future__ import annotations

import torch
from torch import nn

ROWS_HINT = 16  # the batch size oneDNN tunes the packed layout for; any row count works


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward runs on a prepacked copy of its weight."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), ROWS_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def packing_works(dtype: torch.dtype) -> bool:
    """Whether this torch build packs and runs a `dtype` linear on this CPU, with F.linear's result."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        lin = nn.Linear(32, 24, bias=True).to(dtype)
        x = torch.randn(3, 32).to(dtype)
        with torch.no_grad():
            return torch.equal(PackedLinear(lin)(x), lin(x))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def pack_linears(model: nn.Module) -> int:
    """Replace every plain nn.Linear of `model` by a PackedLinear; returns how many."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child))
    return len(swaps)
