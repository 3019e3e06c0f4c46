"""kernels/cpu/deltanet.py: the C token steps of a DeltaNet layer against the layer's torch path (the conv, gated
delta rule and norm references, QNEXT_KERNELS=reference), and the properties greedy speculative decoding relies
on: a verify chunk's positions compute exactly what decode steps compute, and a sequence's numbers do not depend
on the call's other sequences."""

from __future__ import annotations

import pytest
import torch

from qnext.kernels.cpu import build
from qnext.kernels.cpu import deltanet as deltanet_cpu
from qnext.worker.cache_tensors import CacheShape, CacheTensors
from qnext.worker.loader import load_model
from qnext.worker.model_runner import SeqChunk, build_forward_batch
from qnext.worker.tiny import make_checkpoint, tiny_config

pytestmark = pytest.mark.usefixtures("cpu_kernels_built")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
K_MAX = 3  # verify chunks of up to 4 positions


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # 2 key heads and 4 value heads of 32 dims: value heads share key heads, as in the real model (16 / 32)
    return make_checkpoint(tmp_path_factory.mktemp("deltanet_cpu"), tiny_config(vocab_size=512, num_hidden_layers=4),
                           seed=3, tokenizer=False, with_mtp=False)


def _cache(model, act: torch.dtype, state: torch.dtype, seed: int) -> CacheTensors:
    """A cache whose pools hold random histories and states (rows that continue read them)."""
    cache = CacheTensors(model.config, CacheShape(64, 4, 8, act, state, act, act, K_MAX), torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    cache.conv_state.copy_(torch.randn(cache.conv_state.shape, generator=g))
    cache.ssm_state.copy_(0.1 * torch.randn(cache.ssm_state.shape, generator=g))
    return cache


def _batch():
    """A decode row with history, a one-token prompt (fresh), a verify chunk of 3, a prefill chunk continuing
    from history and a fresh one, and a decode row in a slot out of order."""
    chunks = [SeqChunk([0, 1], 5, 6, [11]), SeqChunk([2], 0, 0, [12]), SeqChunk([3, 4], 2, 5, [13, 14, 15]),
              SeqChunk([5, 6, 7], 7, 4, [16, 17, 18, 19, 20]), SeqChunk([8, 9], 3, 0, [21, 22, 23, 24]),
              SeqChunk([10, 11], 1, 7, [25])]
    return build_forward_batch(chunks, 4, torch.device("cpu"), is_verify=[False, False, True, False, False, False])


@pytest.mark.parametrize("state", DTYPES)
@pytest.mark.parametrize("act", DTYPES)
def test_token_steps_match_the_torch_path(ckpt, monkeypatch, act, state):
    model = load_model(ckpt, dtype=DTYPES[act])
    layer = model.model.layers[0].linear_attn
    batch = _batch()
    x = torch.randn(sum(batch.query_lens), model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    x = x.to(DTYPES[act])
    caches = {}
    for mode in ("reference", "auto"):
        monkeypatch.setenv("QNEXT_KERNELS", mode)
        assert deltanet_cpu.runs(x, DTYPES[state]) == (mode == "auto")
        caches[mode] = _cache(model, DTYPES[act], DTYPES[state], seed=2)
        with torch.inference_mode():
            caches[mode, "out"] = layer(x, batch, caches[mode])
    # fp32: sums in another order and exp to ~1 ulp (measured: 4e-7 of the largest output); bf16: one rounding
    tol = dict(atol=1e-5, rtol=1e-5) if act == "f32" else dict(atol=1e-2, rtol=8e-3)
    state_tol = dict(atol=1e-6, rtol=1e-5) if state == "f32" else dict(atol=1e-2, rtol=8e-3)
    ref, ours = caches["reference"], caches["auto"]
    torch.testing.assert_close(caches["auto", "out"], caches["reference", "out"], **tol)
    torch.testing.assert_close(ours.conv_state, ref.conv_state, **tol)
    torch.testing.assert_close(ours.ssm_state, ref.ssm_state, **state_tol)
    # the verify chunk (slot 2, 3 positions) kept the states after its first two positions
    torch.testing.assert_close(ours.spec_conv[:, 2, :2], ref.spec_conv[:, 2, :2], **tol)
    torch.testing.assert_close(ours.spec_ssm[:, 2, :2], ref.spec_ssm[:, 2, :2], **state_tol)
    assert ours.spec_ssm[:, 2, :2].abs().sum() > 0


def _kernel_inputs(act: torch.dtype, state: torch.dtype, T: int, seed: int = 0):
    """Random projections, fp32 parameters and pools for direct token_steps calls (Hk 2, Hv 4, dk 16, dv 24)."""
    Hk, Hv, dk, dv, K = 2, 4, 16, 24, 4
    D = 2 * Hk * dk + Hv * dv
    g = torch.Generator().manual_seed(seed)
    params = (torch.randn(K, D, generator=g), -torch.rand(Hv, generator=g) * 2, torch.randn(Hv, generator=g),
              torch.randn(dv, generator=g).to(act).float())
    wide = torch.randn(T, 2 * Hk * dk + 2 * Hv * dv + 7, generator=g).to(act)  # rows strided, as the fused GEMM's
    qkvz, ba = wide[:, :2 * Hk * dk + 2 * Hv * dv], torch.randn(T, 2 * Hv, generator=g).to(act)
    pools = (torch.randn(6, K - 1, D, generator=g).to(act), (0.1 * torch.randn(6, Hv, dk, dv, generator=g)).to(state),
             torch.zeros(6, K_MAX, K - 1, D, dtype=act), torch.zeros(6, K_MAX, Hv, dk, dv, dtype=state))
    return (Hk, Hv, dk, dv), params, qkvz, ba, pools


def _run(heads, params, qkvz, ba, pools, seqs: list[tuple[int, int, int, int, int]]) -> torch.Tensor:
    out = torch.zeros(qkvz.shape[0], heads[1] * heads[3], dtype=qkvz.dtype)
    deltanet_cpu.token_steps(qkvz, ba, torch.tensor(seqs, dtype=torch.int64), heads, *params, 1e-6, pools[0],
                             pools[1], pools[2], pools[3], out)
    return out


@pytest.mark.parametrize("act", DTYPES)
def test_a_verify_chunk_computes_what_decode_steps_compute(act):
    """With the fp32 state pool (the default) bit for bit: what greedy speculative decoding's exactness rests on.
    (A bf16 pool rounds the state after every decode step, while a chunk carries fp32 between its positions, as
    the torch reference does: the first test holds that case to the reference.)"""
    heads, params, qkvz, ba, pools = _kernel_inputs(DTYPES[act], torch.float32, T=4)
    stepped = [p.clone() for p in pools]
    outs, conv_after, ssm_after = [], [], []
    for j in range(4):  # four decode steps of slot 3
        outs.append(_run(heads, params, qkvz, ba, stepped, [(j, 1, 3, 0, 0)])[j])
        conv_after.append(stepped[0][3].clone())
        ssm_after.append(stepped[1][3].clone())
    chunk = [p.clone() for p in pools]
    out = _run(heads, params, qkvz, ba, chunk, [(0, 4, 3, 0, 1)])  # the same four tokens as one verify chunk
    assert torch.equal(out, torch.stack(outs))
    assert torch.equal(chunk[0][3], conv_after[-1]) and torch.equal(chunk[1][3], ssm_after[-1])
    for j in range(3):  # the states after positions 0..2
        assert torch.equal(chunk[2][3, j], conv_after[j]) and torch.equal(chunk[3][3, j], ssm_after[j])
    assert not torch.equal(ssm_after[0], ssm_after[1])
    untouched = [i for i in range(6) if i != 3]
    assert torch.equal(chunk[0][untouched], pools[0][untouched]) and torch.equal(chunk[1][untouched], pools[1][untouched])


def test_a_sequence_computes_the_same_alone_or_with_others():
    heads, params, qkvz, ba, pools = _kernel_inputs(torch.bfloat16, torch.float32, T=6, seed=4)
    alone = [p.clone() for p in pools]
    out_alone = _run(heads, params, qkvz, ba, alone, [(2, 3, 4, 0, 1)])
    together = [p.clone() for p in pools]
    out_together = _run(heads, params, qkvz, ba, together, [(0, 1, 1, 1, 0), (1, 1, 0, 0, 0), (2, 3, 4, 0, 1),
                                                            (5, 1, 5, 0, 0)])
    assert torch.equal(out_alone[2:5], out_together[2:5])
    assert torch.equal(alone[1][4], together[1][4]) and torch.equal(alone[3][4], together[3][4])
    # the fresh row (slot 1) started from zeros whatever its pool rows held
    fresh = [p.clone() for p in pools]
    fresh[0][1].fill_(7.0)
    fresh[1][1].fill_(7.0)
    assert torch.equal(_run(heads, params, qkvz, ba, fresh, [(0, 1, 1, 1, 0)])[0], out_together[0])



@pytest.mark.parametrize("state", DTYPES)
def test_any_thread_count_gives_the_same_bits(monkeypatch, state):
    """The call split over OpenMP threads (every (sequence, head) item on some thread, the threshold lowered so
    these small shapes split) equals the one-thread call bit for bit: outputs, pools, verify snapshots."""
    heads, params, qkvz, ba, pools = _kernel_inputs(torch.bfloat16, DTYPES[state], T=9, seed=6)
    seqs = [(0, 1, 1, 1, 0), (1, 4, 3, 0, 1), (5, 1, 0, 0, 0), (6, 3, 5, 0, 1)]
    monkeypatch.setattr(deltanet_cpu, "PARALLEL_MIN_WORK", 0)
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(deltanet_cpu.cpu, "openmp_threads", lambda n=threads: n)
        p = [x.clone() for x in pools]
        results.append((_run(heads, params, qkvz, ba, p, seqs), p))
    for out, p in results[1:]:
        assert torch.equal(out, results[0][0]) and all(torch.equal(a, b) for a, b in zip(p, results[0][1]))
    assert not torch.equal(results[0][1][1], pools[1])

def test_the_torch_path_runs_where_the_library_does_not(monkeypatch, tmp_path):
    x = torch.zeros(2, 4)
    monkeypatch.setenv("QNEXT_KERNELS", "reference")
    assert not deltanet_cpu.runs(x, torch.float32)
    monkeypatch.setenv("QNEXT_KERNELS", "auto")
    assert deltanet_cpu.runs(x, torch.float32) and not deltanet_cpu.runs(x.double(), torch.float32)
    assert not deltanet_cpu.runs(x, torch.float64) and not deltanet_cpu.runs(x.half(), torch.float32)
    monkeypatch.setenv("QNEXT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(build.BuildError, match="no-such-cc"):
        build.library_path()
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'cc: internal error' >&2\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with pytest.raises(build.BuildError, match="exited 3: cc: internal error"):
        build.library_path()
    assert not list((tmp_path / "cpu-kernels").glob("*.so")) and not list((tmp_path / "cpu-kernels").glob(".*tmp"))
