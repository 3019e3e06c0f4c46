"""Linear layers on a CPU in bf16 / fp16 with their weights packed once for oneDNN.

`F.linear` on a CPU in bf16 hands oneDNN a plain row-major weight, which it reorders into its blocked layout on
every call: for the LM head (151,936 x 256 on the tiny checkpoints) that is a 78 MB copy per step, most of the
step at batch 16. Packing each weight once at load time (the `torch.ops.mkldnn` ops Inductor uses for frozen CPU
graphs) gives the same results bit for bit and, measured on the 2-core AVX512-BF16 box, 2.5x faster LM-head calls
at 3-16 rows (10.6 -> 4.2 ms at 16) and 1.3-2x faster small projections.

The plain weight stays on the module (the router reads `gate.weight`, tied embeddings share it), so linear
weights take twice the memory on a CPU: fine for the checkpoints a CPU serves. Not used on CUDA, in float32
(no bf16 blocked path to win), or under tensor parallelism (its all-reduce hooks sit on the original modules).

A small MoE block (at most `DENSE_MAX_EXPERTS` routed experts: the tiny checkpoints, never the real 512) runs
whole as `PackedDenseMoE`: two packed GEMMs for the router, the shared expert and every routed expert on every
token, the routing weights (zero for unselected experts) and the shared expert's sigmoid gate applied between
them, so the second GEMM sums over the experts. Not bit-identical to the reference (the weighted sum happens in
the GEMM's fp32 accumulator instead of after a bf16 rounding per expert); it replaced six GEMM calls per block
(router + shared gate/up, experts gate/up, experts down, shared down were four, and the experts were three
`bmm`s before that). The rows between the two GEMMs come from one C pass where kernels/cpu builds
(`moe_hidden.c`; the torch way, `hidden_reference`, otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qnext.kernels.cpu import lm_head as lm_head_cpu
from qnext.kernels.cpu import moe_hidden as moe_hidden_cpu
from qnext.kernels.moe import route_logits
from qnext.kernels.moe.reference import DENSE_MAX_EXPERTS
from qnext.worker.model import Experts, SparseMoE

ROWS_HINT = 16  # the batch size oneDNN tunes the packed layout for; any row count works
# A vocabulary-wide linear (the LM head) on oneDNN runs at least this many rows: its 1- and 2-row path over the packed
# 151,936 x 256 bf16 weight was slower than its 4-row one on the 2-core AVX512-BF16 box (3.2-4.5 vs 3.0-3.7 ms;
# a batch-1 decode step 0.952x, 0.971x padded to 3). Rows are independent: the real rows' logits are bit for bit
# those of the unpadded call (tests/test_throughput_knobs.py). Narrow linears gain nothing (16-26 us either way).
WIDE_MIN_ROWS = 4
WIDE_OUT_FEATURES = 32768


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward runs on a prepacked copy of its weight.

    A vocabulary-wide bf16 linear without bias (the LM head) is packed for kernels/cpu/lm_head.c where the library
    has it (AVX512-BF16): 2-D rows go there (1.5-1.6x oneDNN at 1 and 16 rows on the 2-core box), and
    oneDNN's copy is packed only if a call needs it (QNEXT_KERNELS=reference, other shapes), so the head's weight
    is not held three times."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        wide = self.out_features >= WIDE_OUT_FEATURES
        self.head_packed = (lm_head_cpu.pack(linear.weight) if wide and linear.bias is None
                            and linear.weight.dtype == torch.bfloat16 and self.in_features % 2 == 0
                            and lm_head_cpu.available() else None)
        self._packed = None if self.head_packed is not None else _pack(linear.weight)

    @property
    def packed(self) -> torch.Tensor:
        """oneDNN's packed copy of the weight (made on first use when the C head serves this linear)."""
        if self._packed is None:
            self._packed = _pack(self.weight)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.head_packed is not None and lm_head_cpu.runs(x):
            return lm_head_cpu.lm_head(x, self.head_packed, self.out_features)
        if x.dim() == 2 and rows < WIDE_MIN_ROWS and self.out_features >= WIDE_OUT_FEATURES:
            x = F.pad(x, (0, 0, 0, WIDE_MIN_ROWS - rows))
            return _packed_linear(x, self.packed, self.bias)[:rows]
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


class PackedDenseMoE:
    """A SparseMoE block's forward as two packed GEMMs over all E experts (docs/model.md §6, same function):
    1. x @ [router | shared gate | shared up | shared-expert gate | every expert's gate | every expert's up]^T;
    2. [h_e * routing weight_e for every e (0 where not routed) | h_shared * sigmoid(shared-expert gate)]
       @ [every expert's down | shared down]^T, which sums the routed experts and the shared expert.
    h = silu(gate) * up throughout. Set on the module as `fused_forward` (read by SparseMoE.forward)."""

    def __init__(self, moe: SparseMoE) -> None:
        experts, shared = moe.experts, moe.shared_expert
        E, I, H = experts.w_gate.shape
        self.top_k, self.renormalize, self.E, self.I = moe.top_k, moe.norm_topk_prob, E, I
        first = [moe.gate, shared.gate_proj, shared.up_proj, moe.shared_expert_gate]
        self.sizes = [lin.out_features for lin in first] + [E * I, E * I]
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.offsets = tuple(starts[1:])  # columns of shared gate, shared up, shared-expert gate, gates, ups
        self.first = _pack(torch.cat([lin.weight for lin in first]
                                     + [experts.w_gate.reshape(E * I, H), experts.w_up.reshape(E * I, H)]))
        self.second = _pack(torch.cat([experts.w_down.permute(1, 0, 2).reshape(H, E * I), shared.down_proj.weight],
                                      dim=1))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        first = _packed_linear(x, self.first)
        weights, ids = route_logits(first[:, :self.sizes[0]], self.top_k, self.renormalize)
        if moe_hidden_cpu.runs(first, self.E):  # kernels/cpu/moe_hidden.c: the same rows in one pass
            hidden = moe_hidden_cpu.moe_hidden(first, self.offsets, (self.E, self.I, self.sizes[1]),
                                               weights.float(), ids)
        else:
            hidden = self.hidden_reference(first, weights, ids)
        return _packed_linear(hidden, self.second)

    def hidden_reference(self, first: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The second GEMM's input rows from the first GEMM's output and the routing, in torch."""
        T, E, I = first.shape[0], self.E, self.I
        _, s_gate, s_up, s_weight, gate, up = first.split(self.sizes, dim=-1)
        route_w = torch.zeros(T, E, dtype=torch.float32, device=first.device).scatter_(1, ids, weights.float())
        h = ((F.silu(gate) * up).view(T, E, I) * route_w[:, :, None]).to(first.dtype).view(T, E * I)
        h_shared = F.silu(s_gate) * s_up * torch.sigmoid(s_weight)
        return torch.cat([h, h_shared], dim=-1)

    @staticmethod
    def fits(moe: nn.Module) -> bool:
        """A SparseMoE this handles: small unquantised experts, bias-free plain linears."""
        if type(moe) is not SparseMoE or type(moe.experts) is not Experts or moe.experts.is_fp8:
            return False
        linears = [moe.gate, moe.shared_expert_gate, *moe.shared_expert.children()]
        return (moe.experts.w_gate.shape[0] <= DENSE_MAX_EXPERTS
                and all(type(lin) is nn.Linear and lin.bias is None for lin in linears))


def fuse_projections(model: nn.Module) -> set[int]:
    """Give every small MoE block a `fused_forward` (PackedDenseMoE), and every other module with PROJECTIONS made
    of plain linears a `fused_projections` (read by worker/model.py's `project`); returns the ids of the linears
    they cover, which the forward no longer calls."""
    fused: set[int] = set()  # ids of the linears covered, and of every module inside a fused MoE block
    for module in model.modules():
        if id(module) in fused:
            continue
        if PackedDenseMoE.fits(module):
            module.fused_forward = PackedDenseMoE(module)
            fused |= {id(m) for m in module.modules()}
            continue
        names = getattr(type(module), "PROJECTIONS", None)
        if not names:
            continue
        linears = [module.get_submodule(name) for name in names]
        if all(type(lin) is nn.Linear for lin in linears) and len({lin.in_features for lin in linears}) == 1:
            module.fused_projections = PackedProjections(linears)
            fused |= {id(lin) for lin in linears}
    return fused


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
    """Fuse the small MoE blocks and the projections that share an input (fuse_projections), then replace every
    plain nn.Linear of `model` not covered by a fusion (which keeps its plain weight, unpacked) by a PackedLinear;
    returns how many modules were replaced."""
    fused = fuse_projections(model)
    swaps = [(parent, name, PackedLinear(child)) for parent in model.modules()
             for name, child in parent.named_children() if type(child) is nn.Linear and id(child) not in fused]
    for parent, name, packed in swaps:
        setattr(parent, name, packed)
    return len(swaps)
