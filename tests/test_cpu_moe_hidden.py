"""kernels/cpu/moe_hidden.py: the C rows between a small MoE block's two packed GEMMs against the torch way
(PackedDenseMoE.hidden_reference) and a float64 computation with the same roundings, and the block using it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qnext.kernels.cpu import moe_hidden as moe_hidden_cpu
from qnext.kernels.moe import route_logits
from qnext.worker.config import config_from_dict
from qnext.worker.cpu_linear import PackedDenseMoE, packing_works
from qnext.worker.model import SparseMoE
from qnext.worker.tiny import tiny_config

pytestmark = [pytest.mark.usefixtures("cpu_kernels_built"),
              pytest.mark.skipif(not packing_works(torch.bfloat16), reason="no oneDNN bf16 linear in this build")]


def block(top_k: int, renormalize: bool, experts: int = 16) -> PackedDenseMoE:
    torch.manual_seed(top_k)
    cfg = config_from_dict(tiny_config(num_experts=experts, num_experts_per_tok=top_k, hidden_size=128,
                                       moe_intermediate_size=40, shared_expert_intermediate_size=24,
                                       norm_topk_prob=renormalize))
    moe = SparseMoE(cfg)
    for w in moe.parameters():
        nn.init.normal_(w, std=0.3)
    return PackedDenseMoE(copy.deepcopy(moe).to(torch.bfloat16))


def first_rows(packed: PackedDenseMoE, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    width = sum(packed.sizes)
    wide = (torch.randn(T, width + 5, generator=g) * 3).bfloat16()
    return wide[:, 2:width + 2]  # rows strided, as the GEMM's output split never is: the stride is honoured


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.float().bfloat16().double()


def float64_hidden(packed: PackedDenseMoE, first: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
    """The formula in float64 with a bf16 rounding wherever the torch path rounds."""
    E, I = packed.E, packed.I
    _, sg, su, sw, gate, up = [t.double() for t in first.split(packed.sizes, dim=-1)]
    route = torch.zeros(first.shape[0], E, dtype=torch.float64).scatter_(1, ids, weights.double())
    h = bf16(bf16(gate * torch.sigmoid(gate)) * up).view(-1, E, I) * route[:, :, None]
    shared = bf16(bf16(sg * torch.sigmoid(sg)) * su) * bf16(torch.sigmoid(sw))
    return torch.cat([bf16(h.reshape(first.shape[0], E * I)), bf16(shared)], dim=-1)


@pytest.mark.parametrize("top_k,renormalize", [(1, False), (4, True), (4, False), (16, True)])
@pytest.mark.parametrize("T", [1, 3, 16, 64])
def test_matches_torch_and_float64(T, top_k, renormalize):
    packed = block(top_k, renormalize)
    first = first_rows(packed, T, T * 10 + top_k)
    weights, ids = route_logits(first[:, :packed.sizes[0]], top_k, renormalize)
    assert moe_hidden_cpu.runs(first, packed.E)
    got = moe_hidden_cpu.moe_hidden(first, packed.offsets, (packed.E, packed.I, packed.sizes[1]), weights, ids)
    ref = packed.hidden_reference(first, weights, ids)
    assert got.shape == ref.shape == (T, packed.E * packed.I + packed.sizes[1]) and got.dtype == torch.bfloat16
    routed = got[:, :packed.E * packed.I].view(T, packed.E, packed.I)
    unrouted = torch.ones(T, packed.E, dtype=torch.bool).scatter_(1, ids, False)
    assert (routed[unrouted] == 0).all()  # every unrouted expert's columns are zero
    want = float64_hidden(packed, first, weights, ids)
    step = want.abs() * 2.0 ** -7 + 1e-30  # one bf16 rounding of an fp32 difference in exp
    assert ((got.double() - want).abs() <= step).all()
    assert (got != ref).float().mean() <= 0.003  # exp within an ulp of torch's: a rounding flips now and then


def test_the_block_uses_it_and_ignores_the_batch(monkeypatch):
    packed = block(4, True)
    x = torch.randn(16, 128).bfloat16()
    calls = []
    real = moe_hidden_cpu.moe_hidden
    monkeypatch.setattr(moe_hidden_cpu, "moe_hidden", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        got = packed(x)
        alone = torch.cat([packed(x[t:t + 1]) for t in range(16)])
        assert calls and torch.equal(got, alone)
        monkeypatch.setenv("QNEXT_KERNELS", "reference")
        n = len(calls)
        ref = packed(x)
    assert len(calls) == n  # the torch way under QNEXT_KERNELS=reference
    assert ((got.double() - ref.double()).norm() / ref.double().norm()).item() < 4e-3


def test_what_stays_on_torch():
    first = torch.randn(4, 100).bfloat16()
    assert moe_hidden_cpu.runs(first, 16)
    assert not moe_hidden_cpu.runs(first.float(), 16) and not moe_hidden_cpu.runs(first.half(), 16)
    assert not moe_hidden_cpu.runs(first[:, ::2], 16) and not moe_hidden_cpu.runs(first, 257)


def test_an_expert_id_out_of_range_is_refused():
    packed = block(1, False)
    first = first_rows(packed, 2, 0)
    ids = torch.tensor([[3], [packed.E]])
    with pytest.raises(ValueError, match="expert id"):
        moe_hidden_cpu.moe_hidden(first, packed.offsets, (packed.E, packed.I, packed.sizes[1]),
                                  torch.ones(2, 1), ids)
