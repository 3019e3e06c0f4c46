"""kernels/cpu/lm_head.py: the C bf16 LM head against its torch reference (the instruction's arithmetic: equal bit
for bit), against float64 logits (within fp32 accumulation and bf16 rounding), a row's logits the same in any batch
and on any thread count, and as worker/cpu_linear.py's PackedLinear uses it."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from torch import nn

from qnext.kernels.cpu import build
from qnext.kernels.cpu import lm_head as lm_head_cpu
from qnext.worker.cpu_linear import WIDE_OUT_FEATURES, PackedLinear, packing_works


def _the_build_can_target_avx512_bf16() -> bool:
    """Whether the library's compiler, building for this CPU (-march=native, build.py), defines the macros lm_head.c
    needs: the CPU has the instructions and the compiler knows them."""
    try:
        done = subprocess.run([build.compiler(), "-march=native", "-dM", "-E", "-"], input="", capture_output=True,
                              text=True, timeout=60)
    except (build.BuildError, OSError, subprocess.SubprocessError):
        return False
    return all(f"#define {m} 1" in done.stdout for m in ("__AVX512BF16__", "__AVX512BW__", "__AVX512VL__"))


pytestmark = pytest.mark.usefixtures("cpu_kernels_built")
# every test but the build check: where the library has no head there is nothing to test (the check says why)
needs_head = pytest.mark.skipif(not lm_head_cpu.available(), reason="library built without AVX512-BF16")


def weights(V: int, H: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(V, H, generator=g) * 0.05).bfloat16()


def rows(R: int, H: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, H, generator=g) * 3
    if R > 1:
        x[1] = 0.0  # an all-zero row: logits 0
    if R > 2:
        x[2, 0] = 1e4  # one element far above the rest
    return x.bfloat16()


def test_built_wherever_the_compiler_can_target_avx512_bf16():
    """The worker must not silently lose the kernel: where the compiler, building for this CPU, has AVX512-BF16,
    the library has the head."""
    assert lm_head_cpu.available() == _the_build_can_target_avx512_bf16()


@needs_head
@pytest.mark.parametrize("V,H", [(1, 2), (15, 64), (16, 130), (17, 256), (1003, 64), (300, 2048)])
def test_equals_the_reference_bit_for_bit(V, H):
    w = weights(V, H, seed=V + H)
    packed = lm_head_cpu.pack(w)
    for R in (1, 2, 5, 16, 17, 33):
        x = rows(R, H, seed=R)
        got = lm_head_cpu.lm_head(x, packed, V)
        assert got.dtype == torch.bfloat16 and got.shape == (R, V)
        assert torch.equal(got.view(torch.int16), lm_head_cpu.reference(x, w).view(torch.int16)), (V, H, R)
        if R > 1:
            assert not got[1].any()


@needs_head
def test_empty_shapes():
    """No rows, no vocabulary, no hidden columns: empty or zero logits, no crash."""
    w = weights(40, 8, seed=1)
    assert lm_head_cpu.lm_head(rows(0, 8, seed=1), lm_head_cpu.pack(w), 40).shape == (0, 40)
    assert lm_head_cpu.lm_head(rows(3, 8, seed=1), lm_head_cpu.pack(w[:0]), 0).shape == (3, 0)
    empty_hidden = lm_head_cpu.lm_head(torch.zeros(3, 0, dtype=torch.bfloat16), lm_head_cpu.pack(w[:, :0]), 40)
    assert empty_hidden.shape == (3, 40) and not empty_hidden.any()


@needs_head
def test_denormal_inputs_read_as_zero():
    """A bf16 denormal times a large weight would be a normal product: the instruction (and the reference) read
    the denormal as 0."""
    w = torch.full((16, 4), 1e30).bfloat16()
    x = torch.tensor([[1e-39, 0.0, 0.0, 0.0], [1e-39, 0.0, 1.0, 0.0]]).bfloat16()
    assert x[0, 0] != 0  # a denormal, not already 0
    got = lm_head_cpu.lm_head(x, lm_head_cpu.pack(w), 16)
    assert torch.equal(got, lm_head_cpu.reference(x, w))
    assert not got[0].any() and torch.equal(got[1], w[:, 2])


@needs_head
def test_close_to_float64():
    """Within the fp32 sum's rounding (H additions, each within 2^-24 of the running sum of |products|) plus the
    output's bf16 rounding."""
    V, H = 5000, 256
    w, x = weights(V, H, seed=1), rows(7, H, seed=2)
    got = lm_head_cpu.lm_head(x, lm_head_cpu.pack(w), V).double()
    exact = x.double() @ w.double().T
    bound = H * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T) + exact.abs() * 2.0 ** -8 + 1e-30
    assert ((got - exact).abs() <= bound).all()


@needs_head
def test_a_rows_logits_do_not_depend_on_the_batch_or_the_thread_count():
    V, H = 20000, 128
    w = weights(V, H, seed=3)
    packed = lm_head_cpu.pack(w)
    x = rows(40, H, seed=4)
    alone = torch.cat([lm_head_cpu.lm_head(x[i:i + 1], packed, V) for i in range(40)])
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for batch in (3, 16, 17, 40):
                assert torch.equal(lm_head_cpu.lm_head(x[:batch], packed, V), alone[:batch]), (n, batch)
    finally:
        torch.set_num_threads(before)


@needs_head
def test_runs_on_torchs_threads_only():
    """A multi-threaded call starts no thread of its own (the library's loops run on torch's OpenMP pool)."""
    x = torch.randn(256, 256)
    x @ x  # torch's pool up
    before = len(os.listdir("/proc/self/task"))
    w = weights(4096, 64, seed=5)
    lm_head_cpu.lm_head(rows(4, 64, seed=6), lm_head_cpu.pack(w), 4096)
    assert len(os.listdir("/proc/self/task")) <= before  # fewer where the pool let go of an earlier test's third


@needs_head
@pytest.mark.skipif(not packing_works(torch.bfloat16), reason="no oneDNN bf16 linear in this build")
def test_packed_linear_uses_it_and_falls_back(monkeypatch):
    """A vocabulary-wide bf16 linear without bias runs here for 2-D rows; oneDNN's packed copy is made only when a
    call needs it (QNEXT_KERNELS=reference), and gives the same logits up to its own summation order."""
    g = torch.Generator().manual_seed(7)
    lin = nn.Linear(64, WIDE_OUT_FEATURES + 5, bias=False).bfloat16()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
    head = PackedLinear(lin)
    assert head.head_packed is not None and head._packed is None
    x = rows(3, 64, seed=8)
    out = head(x)
    assert torch.equal(out, lm_head_cpu.reference(x, lin.weight))
    assert head._packed is None
    monkeypatch.setenv("QNEXT_KERNELS", "reference")
    onednn = head(x)
    assert head._packed is not None
    assert torch.allclose(onednn.float(), out.float(), atol=1e-2, rtol=1e-2)
    narrow = PackedLinear(nn.Linear(64, 100, bias=False).bfloat16())  # not vocabulary-wide: oneDNN's
    assert narrow.head_packed is None and narrow._packed is not None
    biased = PackedLinear(nn.Linear(64, WIDE_OUT_FEATURES, bias=True).bfloat16())
    assert biased.head_packed is None


@needs_head
def test_the_start_up_line_says_the_head_runs_here(default_ckpt):
    """The worker's start-up log (ModelRunner.cpu_token_steps) names the C head where the loaded bf16 model's LM
    head takes it, and not in float32."""
    from qnext.worker.engine import Engine
    from qnext.worker.types import EngineConfig
    for dtype, said in (("bfloat16", True), ("float32", False)):
        engine = Engine(EngineConfig(model=str(default_ckpt), dtype=dtype, cache_memory=32 << 20, max_num_seqs=2))
        assert ("lm_head.c" in engine.runner.cpu_token_steps) == said, engine.runner.cpu_token_steps


@needs_head
def test_pack_layout():
    """Block b holds vocabulary rows 16b..16b+15, a pair of hidden columns per 64 bytes, zero rows past V."""
    w = torch.arange(17 * 6, dtype=torch.float32).view(17, 6).bfloat16()
    packed = lm_head_cpu.pack(w)
    assert packed.shape == (2, 3, 16, 2)
    assert packed[0, 2, 3, 1] == w[3, 5] and packed[1, 1, 0, 0] == w[16, 2]
    assert not packed[1, :, 1:].any()
