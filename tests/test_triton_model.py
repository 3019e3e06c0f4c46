"""The Triton kernels of kernels/ (norms, conv1d, gated delta rule, paged attention, MoE, FP8 linears and experts)
inside the tiny model, through the real call sites, against the torch references: prefill chunks, decodes and a
fresh sequence in mixed batches. The model runs on CPU, the kernels through the Triton interpreter (so the module
is skipped where CUDA is present)."""

from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("the tiny model runs on CPU here (PagedRunner), through the interpreter; on a GPU machine the "
                "kernels are checked by the other test_triton_* modules", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # must precede the first @triton.jit of the kernels
pytest.importorskip("triton", reason="triton is not installed")

from qnext.kernels import dispatch, fp8, moe  # noqa: E402
from qnext.kernels.fp8 import reference  # noqa: E402
from paged_runner import PagedRunner  # noqa: E402
from qnext.worker.fp8 import Fp8Linear  # noqa: E402
from qnext.worker.model import Experts  # noqa: E402
from qnext.worker.loader import load_model  # noqa: E402
from qnext.worker.tiny import make_checkpoint, tiny_config  # noqa: E402

# Steps of (sequence, tokens): two prefills (one longer than the conv kernel's 32-token tile and the gated delta
# rule's 64-token chunk), then decodes mixed with a new sequence.
STEPS = [[(0, list(range(3, 73))), (1, list(range(80, 85)))],
         [(0, [7]), (1, [9]), (2, [11, 12, 13])],
         [(0, [8]), (1, [10]), (2, [14])]]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    small = tiny_config(vocab_size=512, num_hidden_layers=4)
    return {"bf16": make_checkpoint(root / "bf16", small, seed=5, tokenizer=False),
            "fp8": make_checkpoint(root / "fp8", small, seed=5, fp8=True, tokenizer=False)}


def run(model, triton: bool) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    runner = PagedRunner(model)
    sids = [runner.new_seq() for _ in range(3)]
    logits = []
    with torch.inference_mode():
        for step in STEPS:
            chunks = [(sids[i], toks) for i, toks in step]
            if triton:
                with dispatch.force_triton():
                    logits += runner.step(chunks)
            else:
                logits += runner.step(chunks)
    return logits, runner.cache.conv_state.clone(), runner.cache.ssm_state.clone()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def test_model_with_triton_kernels_matches_references(ckpts, report, monkeypatch: pytest.MonkeyPatch) -> None:
    from qnext.kernels.attention import triton_attention
    from qnext.kernels.moe import triton_moe
    calls = {"attention": 0, "moe": 0}

    def counted(name: str, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(triton_attention, "paged_attention_fwd",
                        counted("attention", triton_attention.paged_attention_fwd))
    monkeypatch.setattr(triton_moe, "fused_moe_fwd", counted("moe", triton_moe.fused_moe_fwd))
    model = load_model(ckpts["bf16"])  # fp32 activations
    want, want_conv, want_ssm = run(model, triton=False)
    assert calls == {"attention": 0, "moe": 0}
    got, got_conv, got_ssm = run(model, triton=True)
    assert calls["attention"] > 0 and calls["moe"] > 0, calls
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    report("tiny model, Triton norms + conv1d + gated delta rule + attention + MoE vs references, worst logits "
           "rel err",
           f"{max(errs):.2e}")
    assert max(errs) < 1e-5, errs
    assert rel_err(got_conv, want_conv) < 1e-5
    assert rel_err(got_ssm, want_ssm) < 1e-5


def test_fp8_linears_at_the_models_call_sites(ckpts, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each Fp8Linear call of a W8A8 forward, Triton vs reference on the same input. (End to end the two drift
    apart: a 1e-7 difference upstream flips an e4m3 rounding, and a random MoE amplifies it.)"""
    model = load_model(ckpts["fp8"], keep_fp8=True)
    calls = []

    def both(self: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
        want = reference.fp8_block_linear(x, self.weight, self.weight_scale_inv)
        with dispatch.force_triton():
            got = fp8.fp8_block_linear(x, self.weight, self.weight_scale_inv)
        calls.append((tuple(x.shape), tuple(self.weight.shape), rel_err(got, want)))
        return want

    monkeypatch.setattr(Fp8Linear, "forward", both)
    runner = PagedRunner(model)
    with torch.inference_mode():
        runner.step([(runner.new_seq(), list(range(3, 23))), (runner.new_seq(), [50])])
    assert len(calls) > 10
    assert max(err for _, _, err in calls) < 1e-5, calls


def test_fp8_experts_at_the_models_call_sites(ckpts, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each FP8 Experts call of a W8A8 forward (the tiny model's 16 experts, top-4), Triton vs reference on the
    same input and routing."""
    from qnext.kernels.moe import reference as moe_reference
    model = load_model(ckpts["fp8"], keep_fp8=True)
    calls = []

    def both(self: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        want = moe_reference.fused_moe(x, weights, ids, self.w_gate, self.w_up, self.w_down, self.scales)
        with dispatch.force_triton():
            got = moe.fused_moe(x, weights, ids, self.w_gate, self.w_up, self.w_down, self.scales)
        calls.append((tuple(x.shape), rel_err(got, want)))
        return want

    monkeypatch.setattr(Experts, "forward", both)
    runner = PagedRunner(model)
    with torch.inference_mode():
        runner.step([(runner.new_seq(), list(range(3, 15))), (runner.new_seq(), [50])])
    assert len(calls) >= 4 and all(s[0] == 13 for s, _ in calls)
    assert max(err for _, err in calls) < 1e-5, calls
