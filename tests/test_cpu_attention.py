"""kernels/cpu/attention.py: the C token steps of a gated attention layer against the layer's torch path (the norm,
RoPE and paged-attention references, QNEXT_KERNELS=reference), and the properties greedy speculative decoding relies
on: a verify chunk's positions compute exactly what decode steps compute, and a sequence's numbers do not depend on
the call's other sequences."""

from __future__ import annotations

import pytest
import torch

from qnext.kernels.cpu import attention as attention_cpu
from qnext.worker.cache_tensors import CacheShape, CacheTensors
from qnext.worker.loader import load_model
from qnext.worker.model_runner import SeqChunk, build_forward_batch
from qnext.worker.tiny import make_checkpoint, tiny_config

pytestmark = pytest.mark.usefixtures("cpu_kernels_built")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
BLOCK = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # 4 query heads sharing 2 KV heads of 32 dims, RoPE on the first 8 of each (partial_rotary_factor 0.25)
    return make_checkpoint(tmp_path_factory.mktemp("attention_cpu"), tiny_config(vocab_size=512, num_hidden_layers=4),
                           seed=5, tokenizer=False, with_mtp=False)


def _cache(model, act: torch.dtype, seed: int) -> CacheTensors:
    """A cache whose KV pools hold random keys and values: the cached context of the rows that continue."""
    cache = CacheTensors(model.config, CacheShape(32, BLOCK, 8, act, torch.float32, act, act, 3), torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    for pool in (*cache.k_cache, *cache.v_cache):  # one per attention layer
        pool.copy_(torch.randn(pool.shape, generator=g))
    return cache


def _batch(token_step_max_len: int = 1):
    """A decode row after 9 cached positions, a one-token prompt, a verify chunk of 3 after 6, a prefill chunk
    continuing after 5 and a fresh one (5 tokens each), and a decode row whose blocks are out of order."""
    chunks = [SeqChunk([0, 1, 2], 0, 9, [11]), SeqChunk([3], 1, 0, [12]), SeqChunk([4, 5, 6], 2, 6, [13, 14, 15]),
              SeqChunk([7, 8, 9], 3, 5, [16, 17, 18, 19, 20]), SeqChunk([10, 11], 4, 0, [21, 22, 23, 24, 25]),
              SeqChunk([14, 12, 13], 5, 10, [26])]
    return build_forward_batch(chunks, BLOCK, torch.device("cpu"), is_verify=[False, False, True, False, False, False],
                               token_step_max_len=token_step_max_len)


@pytest.mark.parametrize("token_step_max_len", [1, 5])
@pytest.mark.parametrize("act", DTYPES)
def test_token_steps_match_the_torch_path(ckpt, monkeypatch, act, token_step_max_len):
    """token_step_max_len 5 (as the MTP's catch-up batches set it): the two 5-token prefill chunks take the C path
    too."""
    model = load_model(ckpt, dtype=DTYPES[act])
    layer = model.model.layers[3].self_attn
    batch = _batch(token_step_max_len)
    assert batch.attention_step_seqs.shape[0] == (4 if token_step_max_len == 1 else 6)
    x = torch.randn(sum(batch.query_lens), model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    x = x.to(DTYPES[act])
    cos, sin = model.rotary.cos_sin(batch.positions, x.dtype)
    runs = {}
    for mode in ("reference", "auto"):
        monkeypatch.setenv("QNEXT_KERNELS", mode)
        cache = _cache(model, DTYPES[act], seed=2)
        assert attention_cpu.runs(x, *cache.kv_pool(layer.cache_index)[::2]) == (mode == "auto")
        with torch.inference_mode():
            runs[mode] = layer(x, batch, cache, cos, sin), cache
    # fp32: sums in another order and exp to ~1 ulp; bf16: one rounding
    tol = dict(atol=1e-5, rtol=1e-5) if act == "f32" else dict(atol=1e-2, rtol=8e-3)
    (ref, ref_cache), (ours, our_cache) = runs["reference"], runs["auto"]
    torch.testing.assert_close(ours, ref, **tol)
    (ref_k, ref_v, _, _), (our_k, our_v, _, _) = (c.kv_pool(layer.cache_index) for c in (ref_cache, our_cache))
    torch.testing.assert_close(our_k, ref_k, **tol)
    assert torch.equal(our_v, ref_v)  # values are copied as they are
    assert not torch.equal(our_k, _cache(model, DTYPES[act], seed=2).kv_pool(layer.cache_index)[0])  # keys written


HEADS = (4, 2, 32)  # Hq, Hkv, D
ROTARY = 8


def _kernel_inputs(act: torch.dtype, T: int, seed: int = 0):
    """Random projections (rows strided, as the fused GEMM's), RoPE factors, norm factors and KV pools."""
    Hq, Hkv, D = HEADS
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(T, 2 * Hq * D + 2 * Hkv * D + 5, generator=g).to(act)
    qg, k, v = wide[:, :2 * Hq * D], wide[:, 2 * Hq * D:2 * Hq * D + Hkv * D], wide[:, 2 * Hq * D + Hkv * D:-5]
    angles = torch.rand(T, ROTARY, generator=g) * 6
    norms = (1 + 0.1 * torch.randn(D, generator=g), 1 + 0.1 * torch.randn(D, generator=g))
    pools = (torch.randn(16, BLOCK, Hkv, D, generator=g).to(act), torch.randn(16, BLOCK, Hkv, D, generator=g).to(act))
    return (qg, k, v), (angles.cos().to(act), angles.sin().to(act)), norms, pools


def _run(rows, rope, norms, pools, seqs, slots, tables) -> torch.Tensor:
    out = torch.zeros(rows[0].shape[0], HEADS[0] * HEADS[2], dtype=rows[0].dtype)
    attention_cpu.token_steps(*rows, torch.tensor(seqs, dtype=torch.int64), HEADS, *rope, *norms, 1e-6,
                              HEADS[2] ** -0.5, *pools, torch.tensor(slots, dtype=torch.int64),
                              torch.tensor(tables, dtype=torch.int32), out)
    return out


@pytest.mark.parametrize("act", DTYPES)
def test_a_verify_chunk_computes_what_decode_steps_compute(act):
    """Bit for bit, keys in the cache included: what greedy speculative decoding's exactness rests on."""
    rows, rope, norms, pools = _kernel_inputs(DTYPES[act], T=4)
    table = [[5, 2, 9]]  # positions 0..11; the sequence has 7 cached, rows 0..3 are positions 7..10
    slots = [table[0][p // BLOCK] * BLOCK + p % BLOCK for p in range(7, 11)]
    stepped = [p.clone() for p in pools]
    outs = [_run(rows, rope, norms, stepped, [(j, 1, 8 + j, 0)], slots, table)[j] for j in range(4)]
    chunk = [p.clone() for p in pools]
    out = _run(rows, rope, norms, chunk, [(0, 4, 11, 0)], slots, table)
    assert torch.equal(out, torch.stack(outs))
    assert torch.equal(chunk[0], stepped[0]) and torch.equal(chunk[1], stepped[1])
    written = torch.tensor([s // BLOCK for s in slots]), torch.tensor([s % BLOCK for s in slots])
    assert torch.equal(chunk[1][written], rows[2].reshape(4, *HEADS[1:]))
    untouched = [b for b in range(16) if b not in (2, 9)]
    assert torch.equal(chunk[0][untouched], pools[0][untouched])


def test_a_sequence_computes_the_same_alone_or_with_others():
    rows, rope, norms, pools = _kernel_inputs(torch.bfloat16, T=6, seed=4)
    tables = [[0, 1, 0], [2, 3, 0], [4, 5, 6], [7, 0, 0]]
    slots = [1 * BLOCK + 1, 2 * BLOCK + 0, 5 * BLOCK + 1, 5 * BLOCK + 2, 5 * BLOCK + 3, 7 * BLOCK + 2]
    alone = [p.clone() for p in pools]
    out_alone = _run(rows, rope, norms, alone, [(2, 3, 8, 2)], slots, tables)
    together = [p.clone() for p in pools]
    out_together = _run(rows, rope, norms, together, [(0, 1, 6, 0), (1, 1, 1, 1), (2, 3, 8, 2), (5, 1, 3, 3)],
                        slots, tables)
    assert torch.equal(out_alone[2:5], out_together[2:5])
    assert torch.equal(alone[0][4:7], together[0][4:7]) and torch.equal(alone[1][4:7], together[1][4:7])
    # a one-token prompt attends to itself alone: its output is its own value, gated
    Hq, Hkv, D = HEADS
    v = rows[2][1].reshape(Hkv, D).float().repeat_interleave(Hq // Hkv, dim=0)
    gate = torch.sigmoid(rows[0][1].reshape(Hq, 2, D)[:, 1].float()).to(torch.bfloat16).float()
    assert torch.equal(out_together[1], (v.to(torch.bfloat16).float() * gate).to(torch.bfloat16).reshape(-1))



def test_any_thread_count_gives_the_same_bits(monkeypatch):
    """The call split over OpenMP threads (cache writes per sequence, then every (sequence, position, KV head)
    item on some thread; the threshold lowered so these small shapes split) equals the one-thread call bit for
    bit, the cache included: a verify chunk reads the keys its earlier positions wrote whichever thread wrote them."""
    rows, rope, norms, pools = _kernel_inputs(torch.bfloat16, T=6, seed=7)
    tables = [[0, 1, 0], [2, 3, 0], [4, 5, 6], [7, 0, 0]]
    slots = [1 * BLOCK + 1, 2 * BLOCK + 0, 5 * BLOCK + 1, 5 * BLOCK + 2, 5 * BLOCK + 3, 7 * BLOCK + 2]
    seqs = [(0, 1, 6, 0), (1, 1, 1, 1), (2, 3, 8, 2), (5, 1, 3, 3)]
    monkeypatch.setattr(attention_cpu, "PARALLEL_MIN_WORK", 0)
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(attention_cpu.cpu, "openmp_threads", lambda n=threads: n)
        p = [x.clone() for x in pools]
        results.append((_run(rows, rope, norms, p, seqs, slots, tables), p))
    for out, p in results[1:]:
        assert torch.equal(out, results[0][0]) and all(torch.equal(a, b) for a, b in zip(p, results[0][1]))

def test_the_torch_path_runs_where_the_kernel_does_not(monkeypatch):
    x = torch.zeros(2, 4)
    pool = torch.zeros(2, BLOCK, 2, 4)
    monkeypatch.setenv("QNEXT_KERNELS", "auto")
    assert attention_cpu.runs(x, pool, None)
    assert not attention_cpu.runs(x, pool.to(torch.float8_e4m3fn), torch.ones(2, BLOCK, 2))  # FP8 cache
    assert not attention_cpu.runs(x, pool.bfloat16(), None) and not attention_cpu.runs(x.half(), pool.half(), None)
    monkeypatch.setenv("QNEXT_KERNELS", "reference")
    assert not attention_cpu.runs(x, pool, None)
