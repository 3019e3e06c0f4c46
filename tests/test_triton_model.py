"""The Triton kernels of kernels/ (norms, conv1d, gated delta rule, paged attention, MoE, FP8 linears and experts)
inside the tiny model, through the real call sites, against the torch references: prefill chunks, decodes and a
fresh sequence in mixed batches. Without CUDA the model runs on CPU and the kernels through the Triton interpreter;
with CUDA both run on the GPU, the references there under QNEXT_KERNELS=reference."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first @triton.jit of the kernels
pytest.importorskip("triton", reason="triton is not installed")

from conftest import require_triton  # noqa: E402
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

# Triton vs references, relative errors. On CPU the interpreter computes in fp32 like the references. On a GPU the
# bounds are the kernel modules' own: the chunked gated delta rule's dots run in TF32 by design (2e-3 per call in
# test_triton_gated_delta_rule, compounded here over 4 layers), the FP8 GEMMs on Hopper's fp8 MMA (1e-3 in
# test_triton_fp8, 5e-3 for the fp32 experts in test_triton_moe).
MODEL_TOL = 1e-5 if DEVICE == "cpu" else 1e-2
FP8_LINEAR_TOL = 1e-5 if DEVICE == "cpu" else 1e-3
FP8_EXPERTS_TOL = 1e-5 if DEVICE == "cpu" else 5e-3


@pytest.fixture(scope="module", autouse=True)
def triton_runs():
    require_triton(DEVICE)  # a skip only where Triton cannot run at all; an error of our kernels fails its test


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    small = tiny_config(vocab_size=512, num_hidden_layers=4)
    return {"bf16": make_checkpoint(root / "bf16", small, seed=5, tokenizer=False),
            "fp8": make_checkpoint(root / "fp8", small, seed=5, fp8=True, tokenizer=False)}


def run(model, triton: bool) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    runner = PagedRunner(model, device=DEVICE)
    sids = [runner.new_seq() for _ in range(3)]
    logits = []
    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
        if not triton:
            mp.setenv(dispatch.ENV_VAR, "reference")  # on CUDA Triton is the default
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
    model = load_model(ckpts["bf16"], DEVICE, dtype=torch.float32)  # fp32 activations, as on CPU
    want, want_conv, want_ssm = run(model, triton=False)
    assert calls == {"attention": 0, "moe": 0}
    got, got_conv, got_ssm = run(model, triton=True)
    assert calls["attention"] > 0 and calls["moe"] > 0, calls
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    report("tiny model, Triton norms + conv1d + gated delta rule + attention + MoE vs references, worst logits "
           "rel err",
           f"{max(errs):.2e}")
    assert max(errs) < MODEL_TOL, errs
    assert rel_err(got_conv, want_conv) < MODEL_TOL
    assert rel_err(got_ssm, want_ssm) < MODEL_TOL


def test_fp8_linears_at_the_models_call_sites(ckpts, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each Fp8Linear call of a W8A8 forward, Triton vs reference on the same input. (End to end the two drift
    apart: a 1e-7 difference upstream flips an e4m3 rounding, and a random MoE amplifies it.)"""
    model = load_model(ckpts["fp8"], DEVICE, dtype=torch.float32, keep_fp8=True)
    calls = []

    def both(self: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
        want = reference.fp8_block_linear(x, self.weight, self.weight_scale_inv)
        with dispatch.force_triton():
            got = fp8.fp8_block_linear(x, self.weight, self.weight_scale_inv)
        calls.append((tuple(x.shape), tuple(self.weight.shape), rel_err(got, want)))
        return want

    monkeypatch.setattr(Fp8Linear, "forward", both)
    runner = PagedRunner(model, device=DEVICE)
    with torch.inference_mode():
        runner.step([(runner.new_seq(), list(range(3, 23))), (runner.new_seq(), [50])])
    assert len(calls) > 10
    assert max(err for _, _, err in calls) < FP8_LINEAR_TOL, calls


def test_fp8_experts_at_the_models_call_sites(ckpts, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each FP8 Experts call of a W8A8 forward (the tiny model's 16 experts, top-4), Triton vs reference on the
    same input and routing."""
    from qnext.kernels.moe import reference as moe_reference
    model = load_model(ckpts["fp8"], DEVICE, dtype=torch.float32, keep_fp8=True)
    calls = []

    def both(self: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        want = moe_reference.fused_moe(x, weights, ids, self.w_gate, self.w_up, self.w_down, self.scales)
        with dispatch.force_triton():
            got = moe.fused_moe(x, weights, ids, self.w_gate, self.w_up, self.w_down, self.scales)
        calls.append((tuple(x.shape), rel_err(got, want)))
        return want

    monkeypatch.setattr(Experts, "forward", both)
    runner = PagedRunner(model, device=DEVICE)
    with torch.inference_mode():
        runner.step([(runner.new_seq(), list(range(3, 15))), (runner.new_seq(), [50])])
    assert len(calls) >= 4 and all(s[0] == 13 for s, _ in calls)
    assert max(err for _, err in calls) < FP8_EXPERTS_TOL, calls
