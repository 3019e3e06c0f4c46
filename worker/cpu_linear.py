"""Linear layers on a CPU in bf16 / fp16 with their weights packed once for oneDNN.

`F.linear` on a CPU in bf16 hands oneDNN a plain row-major weight, which it reorders into its blocked layout on
every call: for the LM head (151,936 x 256 on the tiny checkpoints) that is a 78 MB copy per step, most of the
step at batch 16. Packing each weight once at load time (the `torch.ops.mkldnn` ops Inductor uses for frozen CPU
graphs) gives the same results bit for bit and, measured on the 2-core AVX512-BF16 box, 2.5x faster LM-head calls
at 3-16 rows (10.6 -> 4.2 ms at 16) and 1.3-2x faster small projections.

The plain weight stays on the module (the router reads `gate.weight`, tied embeddings share it), so linear
weights take twice the memory on a CPU: fine for the checkpoints a CPU serves. Not used on CUDA, in float32
(no bf16 blocked path to win), or under tensor parallelism (its all-reduce hooks sit on the original modules).

The routed experts of a small MoE (at most `DENSE_MAX_EXPERTS`: the tiny checkpoints, never the real 512) run
the same way as `PackedDenseExperts`: every expert on every token as two packed GEMMs, the routing weights
(zero for unselected experts) applied between them so the second GEMM sums over the experts. Not bit-identical to
the reference's three `bmm`s (the weighted sum happens in the GEMM's fp32 accumulator instead of after a bf16
rounding per expert), and 2.4x faster at 16 tokens on the box above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qnext.kernels.moe.reference import DENSE_MAX_EXPERTS
from qnext.worker.model import Experts

ROWS_HINT = 16  # the batch size oneDNN tunes the packed layout for; any row count works


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward runs on a prepacked copy of its weight."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = _pack(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_linear(x, self.packed, self.bias)


class PackedProjections:
    """Several linears that read the same input (a module's PROJECTIONS: q/k/v, the DeltaNet input projections,
    the router with the shared expert's gate/up/gate-weight) as one packed GEMM over their stacked weights; returns
    their outputs in order. At 16 tokens a small packed GEMM costs ~20 us however few its columns, so one call
    instead of four is most of the saving. Each output column is the same dot product as before."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.sizes = [lin.out_features for lin in linears]
        self.packed = _pack(torch.cat([lin.weight for lin in linears]))
        biases = [lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in linears]
        self.bias = torch.cat(biases) if any(lin.bias is not None for lin in linears) else None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(_packed_linear(x, self.packed, self.bias).split(self.sizes, dim=-1))


def fuse_projections(model: nn.Module) -> set[int]:
    """Give every module with PROJECTIONS made of plain linears a `fused_projections` (read by
    worker/model.py's `project`); returns the ids of the linears it covers, which the forward no longer calls."""
    fused: set[int] = set()
    for module in model.modules():
        names = getattr(type(module), "PROJECTIONS", None)
        if not names:
            continue
        linears = [module.get_submodule(name) for name in names]
        if all(type(lin) is nn.Linear for lin in linears) and len({lin.in_features for lin in linears}) == 1:
            module.fused_projections = PackedProjections(linears)
            fused |= {id(lin) for lin in linears}
    return fused


class PackedDenseExperts(Experts):
    """Experts whose forward runs every expert on every token as two packed GEMMs:
    h = silu(x W_gate^T) * (x W_up^T) for all E experts at once ([T, E*I]), each expert's slice scaled by its
    routing weight (0 when not routed), then y = h W_down^T with W_down laid out [H, E*I], which sums over E."""

    def __init__(self, experts: Experts) -> None:
        nn.Module.__init__(self)
        self.w_gate, self.w_up, self.w_down, self.is_fp8 = experts.w_gate, experts.w_up, experts.w_down, False
        E, I, H = experts.w_gate.shape
        self.gate_up = _pack(torch.cat([experts.w_gate.reshape(E * I, H), experts.w_up.reshape(E * I, H)]))
        self.down = _pack(experts.w_down.permute(1, 0, 2).reshape(H, E * I))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        T, (E, I, _) = x.shape[0], self.w_gate.shape
        gate, up = _packed_linear(x, self.gate_up).split(E * I, dim=-1)
        h = (F.silu(gate) * up).view(T, E, I)
        route_w = torch.zeros(T, E, dtype=torch.float32, device=x.device).scatter_(1, ids, weights.float())
        h = (h * route_w[:, :, None]).to(x.dtype).view(T, E * I)
        return _packed_linear(h, self.down)


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


def _packed(module: nn.Module, fused: set[int]) -> nn.Module | None:
    if type(module) is nn.Linear and id(module) not in fused:  # a fused one keeps its plain weight, unpacked
        return PackedLinear(module)
    if type(module) is Experts and not module.is_fp8 and module.w_gate.shape[0] <= DENSE_MAX_EXPERTS:
        return PackedDenseExperts(module)
    return None


def pack_linears(model: nn.Module) -> int:
    """Fuse the projections that share an input (fuse_projections), then replace every plain nn.Linear of
    `model` (not covered by a fusion) by a PackedLinear, and small bf16 / fp16 routed experts by
    PackedDenseExperts; returns how many modules were replaced."""
    fused = fuse_projections(model)
    swaps = [(parent, name, packed) for parent in model.modules() for name, child in parent.named_children()
             if (packed := _packed(child, fused)) is not None]
    for parent, name, packed in swaps:
        setattr(parent, name, packed)
    return len(swaps)
