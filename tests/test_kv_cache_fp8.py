"""`--kv-cache-dtype fp8`: float8_e4m3fn KV pools with a float32 scale per (block, position, KV head).

- the quantiser against a plain cast of x / (amax / 448), and its round-trip error against e4m3's half ulp;
- the Triton write and attention kernels with an FP8 cache against the torch reference (the kernels run on CPU
  through the Triton interpreter where there is no GPU; it loads and stores float8 tiles);
- the engine on the embedded default checkpoint, fp8 vs auto: teacher-forced KL and top-1, greedy agreement;
- cache sizing (same --cache-memory, about twice the tokens), copy-on-write of the scales, and the prefix cache
  being exact with FP8 blocks (a hit re-uses the very quantised rows a cold run writes);
- qnext-validate --kv-cache-dtype fp8 scores the FP8 KV cache against the reference's unquantised one.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first @triton.jit of the kernels below

from conftest import require_triton  # noqa: E402

from qnext.kernels.attention import reference  # noqa: E402
from qnext.kernels.fp8.reference import FP8_DTYPE  # noqa: E402
from qnext.worker import validate_cli  # noqa: E402
from qnext.worker.cache_tensors import CacheShape, CacheTensors, kv_bytes_per_block  # noqa: E402
from qnext.worker.config import load_config  # noqa: E402
from qnext.worker.engine import Engine  # noqa: E402
from qnext.worker.tiny import make_checkpoint, tiny_config  # noqa: E402
from qnext.worker.types import EngineConfig, GenerationRequest, SamplingParams, StoppingParams  # noqa: E402

BLOCK = 16
GREEDY = SamplingParams(temperature=0.0)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Compare float8 tensors bit for bit (NaN included) as bytes."""
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t.view(torch.int32)


def rows_of_mixed_magnitude(n: int, h: int, d: int, seed: int) -> torch.Tensor:
    """[n, h, d]: rows of magnitudes 1e-4 .. 1e3 (each gets its own scale), an outlier per row (so the rest of
    the row spreads over e4m3's exponents, down to its subnormals), one all-zero row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, d, generator=gen) * torch.logspace(-4, 3, n * h).view(n, h, 1)
    x[:, :, 0] *= 50.0  # an outlier sets the scale: the rest of the row spreads over e4m3's exponents
    x[n // 2, 0] = 0.0
    return x


# ---- the format --------------------------------------------------------------------------------------------------

def test_quantize_round_trip():
    x = rows_of_mixed_magnitude(40, 2, 64, seed=0)
    q, s = reference.quantize_kv(x)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (40, 2)
    # independent: the scale is the row's amax / 448, the values x / scale cast by torch (round to nearest even)
    amax = x.abs().amax(-1)
    want_s = torch.where(amax > 0, amax / 448.0, s)  # a zero row: any scale (the value below must be 0)
    assert torch.equal(s, want_s)
    assert torch.equal(bits(q), bits((x / want_s[..., None]).to(FP8_DTYPE)))
    back = reference.dequantize_kv(q, s, torch.float32)
    assert torch.equal(back[20, 0], torch.zeros(64))  # the zero row stays exact zeros
    # e4m3: 3 mantissa bits, so rounding moves a normal value by at most 2^-4 of itself; below 2^-6 (subnormals)
    # the spacing is 2^-9, half of it 2^-10; both in units of the row's scale. 1e-6: the fp32 product's rounding.
    err = (back - x).abs()
    bound = torch.maximum(x.abs() * 2 ** -4, s[..., None] * 2 ** -10) * (1 + 1e-6)
    assert (err <= bound).all(), (err / bound).max().item()
    assert back.abs().max() <= x.abs().max()  # the amax maps to 448 exactly: nothing grows, nothing overflows


def test_engine_config_names_the_field():
    with pytest.raises(ValueError, match=r"^kv_cache_dtype: must be one of auto, fp8, got 'int8'"):
        EngineConfig(kv_cache_dtype="int8")
    args = validate_cli.build_parser().parse_args(["--model", "a", "--reference", "b", "--kv-cache-dtype", "fp8"])
    assert args.kv_cache_dtype == "fp8"


# ---- the Triton kernels --------------------------------------------------------------------------------------------

def fp8_batch(query_lens: list[int], context_lens: list[int], Hq: int, Hkv: int, D: int, dtype: torch.dtype,
              seed: int):
    """An FP8 cache whose sequences' prefixes (context - query positions) were written by the reference, shuffled
    block tables, and this step's q/k/v with their slots. Returns (q, k, v, pools, poisoned pools, slots,
    tables): in `poisoned` every row no prefix holds (this step's included) is NaN, values and scales."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-c // BLOCK) for c in context_lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.full((len(query_lens), max(need + [1])), -1, dtype=torch.int32)
    prefix, slots = [], []
    for i, (n, c) in enumerate(zip(query_lens, context_lens)):
        own = [perm.pop() for _ in range(need[i])]
        tables[i, :len(own)] = torch.tensor(own, dtype=torch.int32)
        flat = [own[p // BLOCK] * BLOCK + p % BLOCK for p in range(c)]
        prefix += flat[:c - n]
        slots += flat[c - n:]
    pools = [torch.zeros(num_blocks, BLOCK, Hkv, D, dtype=FP8_DTYPE) for _ in range(2)]
    pools += [torch.zeros(num_blocks, BLOCK, Hkv) for _ in range(2)]
    kp, vp = (rows_of_mixed_magnitude(len(prefix), Hkv, D, seed + j) for j in (1, 2))
    prefix = torch.tensor(prefix, dtype=torch.int64)
    reference.write_kv(pools[0], pools[1], kp.to(dtype), vp.to(dtype), prefix, pools[2], pools[3])
    poisoned = [p.clone() for p in pools]
    held = torch.zeros(num_blocks * BLOCK, dtype=torch.bool)
    held[prefix] = True
    free = (~held).nonzero()[:, 0]
    for p in poisoned:  # index_put: float8 has no masked_fill on a CPU
        rows = p.view(-1, *p.shape[2:])
        rows[free] = torch.full((len(free), *rows.shape[1:]), float("nan")).to(p.dtype)
    T = sum(query_lens)
    q = torch.randn(T, Hq, D, generator=gen).to(dtype)
    k, v = (rows_of_mixed_magnitude(T, Hkv, D, seed + j).to(dtype) for j in (3, 4))
    to = (lambda t: t.to(DEVICE))
    return (to(q), to(k), to(v), [to(p) for p in pools], [to(p) for p in poisoned],
            to(torch.tensor(slots, dtype=torch.int64)), to(tables))


@pytest.mark.parametrize("dtype,Hq,Hkv,D,query_lens,context_lens,num_splits", [
    (torch.float32, 4, 2, 40, [1, 63, 1, 5, 0, 17], [37, 63, 129, 20, 4, 40], 1),  # D = 40: a masked head-dim tile
    (torch.float32, 4, 2, 40, [1, 1, 4], [300, 17, 40], 3),  # split keys
    (torch.bfloat16, 16, 2, 256, [1, 4, 1], [65, 20, 3], 1),  # Qwen3-Next's heads: decodes and a verify chunk
])
def test_triton_fp8_cache_matches_reference(dtype, Hq, Hkv, D, query_lens, context_lens, num_splits, report):
    require_triton(DEVICE)
    from qnext.kernels.attention.triton_attention import paged_attention_fwd, write_kv_fwd
    q, k, v, want_pools, pools, slots, tables = fp8_batch(query_lens, context_lens, Hq, Hkv, D, dtype, seed=5)
    scale = D ** -0.5
    want = reference.paged_attention_varlen(q, k, v, want_pools[0], want_pools[1], slots, tables, query_lens,
                                            context_lens, scale, want_pools[2], want_pools[3])
    write_kv_fwd(k, v, pools[0], pools[1], slots, pools[2], pools[3])
    got = paged_attention_fwd(q, pools[0], pools[1], tables, query_lens, context_lens, scale,
                              num_splits=num_splits, k_scale=pools[2], v_scale=pools[3])
    assert torch.isfinite(got).all()  # no poisoned row (value or scale) was read
    held = ~pools[2].isnan()  # every row the sequences hold: the prefixes and this step's writes
    for g, w in zip(pools, want_pools):  # the kernel quantises as the reference does, bit for bit
        assert torch.equal(bits(g[held]), bits(w[held]))
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    report(f"paged attention, FP8 cache, {dtype} {Hq}q/{Hkv}kv x {D}, splits {num_splits}: rel err vs reference",
           f"{err:.1e}")
    # fp32: the same dequantised values and sums in another order; bf16: probabilities cast to bf16 as with a
    # bf16 cache (test_triton_attention.py's bounds)
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err


# ---- the cache: sizing, copies ----------------------------------------------------------------------------------

def test_same_budget_holds_about_twice_the_tokens(tmp_path, default_ckpt, report):
    """head_dim 256 (the real model's): a row is 512 B in bf16, 256 + 4 B in FP8 with its scale. The tiny default
    (head_dim 32: 64 vs 36 B) gets the same arithmetic, 1.78x."""
    ckpt = make_checkpoint(tmp_path / "d256", tiny_config(head_dim=256, vocab_size=512), tokenizer=False)
    for model, head_dim in ((ckpt, 256), (default_ckpt, 32)):
        infos = {}
        for kv in ("auto", "fp8"):
            e = Engine(EngineConfig(model=str(model), dtype="bfloat16", kv_cache_dtype=kv, cache_memory=32 << 20,
                                    max_num_seqs=4))
            infos[kv] = e.cache_info
            assert e.describe().kv_cache_dtype == ("bfloat16" if kv == "auto" else "float8_e4m3fn")
            assert e.runner.cache.ckpt_hidden.dtype == torch.bfloat16  # hidden states are not KV
        ratio = infos["fp8"].num_kv_tokens / infos["auto"].num_kv_tokens
        report(f"KV tokens in 32 MiB, head_dim {head_dim}: bf16 / fp8 (ratio)",
               f"{infos['auto'].num_kv_tokens} / {infos['fp8'].num_kv_tokens} ({ratio:.3f}x)")
        assert infos["fp8"].bytes_per_block * 2 * head_dim == infos["auto"].bytes_per_block * (head_dim + 4)
        # the budget's rest divided by the bytes of a block, in whole blocks (a few hundred here)
        assert ratio == pytest.approx(2 * head_dim / (head_dim + 4), rel=1e-2)
        if head_dim == 256:
            assert 1.8 <= ratio <= 2.0


def test_copy_blocks_copies_the_scales(default_ckpt):
    cfg = load_config(default_ckpt)
    shape = CacheShape(6, 4, 1, FP8_DTYPE, torch.float32, torch.float32, torch.float32)
    cache = CacheTensors(cfg, shape, "cpu")
    assert cache.k_scale is not None and len(cache.k_scale) == len(cache.k_cache)
    pools = (*cache.k_cache, *cache.v_cache, *cache.k_scale, *cache.v_scale)
    for i, p in enumerate(pools):
        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(p.dtype))
    before = [p.clone() for p in pools]
    cache.copy_blocks([1, 4], [4, 2])  # 4 is read before it is written
    for p, b in zip(pools, before):
        assert torch.equal(bits(p[4]), bits(b[1])) and torch.equal(bits(p[2]), bits(b[4]))
    assert kv_bytes_per_block(cfg, 4, FP8_DTYPE) == sum(p[0].numel() * p.element_size() for p in pools)


# ---- the engine ------------------------------------------------------------------------------------------------

def prompts(seed: int, lens: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 150_000, (n,), generator=gen).tolist() for n in lens]


def test_fp8_vs_auto_distributions(default_ckpt, report):
    """Teacher-forced over auto's greedy continuations (16 tokens after prompts of 7..90 tokens), in float32.

    Measured (CPU, 3 prompt seeds): mean KL 2.6e-4 .. 1.2e-3 nats, max 0.007 .. 0.06; top-1 0.94 .. 1.0 (and
    qnext-validate's 8 text prompts: 7.2e-4, top-1 0.94). The tiny random model is nearly uniform (entropy ~11.4
    nats of ln(151936) = 11.9, its top two tokens a median 0.05-0.3 nats apart), so a top-1 flip needs only a
    small perturbation: every flip seen fell on a near tie (< 0.14 nats), and one flip changes everything greedy
    generates after it. Bounds: 4x the worst mean KL, top-1 0.8, flips only at ties < 0.25 nats; greedy 0.3."""
    ps = prompts(0, (7, 23, 40, 64, 90))
    n = 16
    runs = {}
    for kv in ("auto", "fp8"):
        e = Engine(EngineConfig(model=str(default_ckpt), dtype="float32", kv_cache_dtype=kv, seed=0,
                                cache_memory=64 << 20, enable_prefix_caching=False))
        runs[kv] = e, [c.token_ids for c in e.generate(ps, GREEDY, StoppingParams(max_new_tokens=n, ignore_eos=True))]
    (auto, conts), (fp8, fp8_conts) = runs["auto"], runs["fp8"]
    kls, agree, gaps = [], [], []
    for p, c in zip(ps, conts):
        ref = validate_cli.teacher_forced_logprobs(auto, p, c)
        kl, same = validate_cli.compare(ref, validate_cli.teacher_forced_logprobs(fp8, p, c))
        top2 = ref.topk(2, -1).values
        kls.append(kl)
        agree.append(same)
        gaps.append((top2[:, 0] - top2[:, 1])[~same])
    kl, agree, gaps = torch.cat(kls), torch.cat(agree).float(), torch.cat(gaps)
    greedy = sum(a == b for x, y in zip(conts, fp8_conts) for a, b in zip(x, y)) / (n * len(ps))
    figures = (f"mean KL {kl.mean():.2e} nats, max {kl.max():.2e}; teacher-forced top-1 {agree.mean():.3f} (flips at "
               f"top-2 gaps {[round(g, 3) for g in gaps.tolist()]}); greedy tokens equal {greedy:.3f}")
    report("engine fp8 KV vs auto, tiny default in float32", figures)
    assert kl.mean() < 5e-3 and agree.mean() >= 0.8, figures
    assert (gaps < 0.25).all(), figures
    assert greedy >= 0.3, figures


def run_turn(e: Engine, rid: str, prompt: list[int], checkpoints: tuple[int, ...] = ()):
    """(tokens, log-probs, prompt tokens served from the prefix cache) of one greedy request run alone."""
    e.add_request(GenerationRequest(rid, prompt, GREEDY, StoppingParams(max_new_tokens=6, ignore_eos=True),
                                    cache_checkpoints=checkpoints))
    tokens, logprobs, cached = [], [], 0
    while e.has_unfinished():
        for o in e.step():
            tokens += o.new_token_ids
            logprobs += o.logprobs
            cached = max(cached, o.num_cached_tokens)
    return tokens, logprobs, cached


def test_prefix_cache_is_exact_with_fp8_blocks(default_ckpt):
    """Hits mid-block (the tail block copied with its scales) and at the end of a generation, against the same FP8
    engine without the prefix cache. float64 activations: the chunk boundaries cannot flip an fp8 rounding (the
    rows are quantised from fp32), so a hit's cached rows are the ones a cold run writes."""
    def engine(prefix: bool) -> Engine:
        return Engine(EngineConfig(model=str(default_ckpt), dtype="float64", state_dtype="float64",
                                   kv_cache_dtype="fp8", seed=0, cache_memory=64 << 20, block_size=BLOCK,
                                   enable_prefix_caching=prefix))
    system, a, b, more = prompts(3, (40, 9, 12, 5))  # 40: not a multiple of the block size
    cached, cold = engine(True), engine(False)
    first, _, _ = run_turn(cached, "a", system + a, checkpoints=(40,))
    # c continues a's conversation: a hit up to a's last generated token, which a never computed
    turns = [("b", system + b, 40), ("c", system + a + first + more, len(system + a + first) - 1)]
    for rid, prompt, hit in turns:
        got = run_turn(cached, rid, prompt)
        want = run_turn(cold, rid, prompt)
        assert got[2] == hit and want[2] == 0
        assert got[0] == want[0]
        assert got[1] == pytest.approx(want[1], abs=1e-9)  # a scale left behind would move these by far more


def test_validate_reports_the_fp8_kv_cache(default_ckpt, tmp_path, capsys, report):
    """--model = --reference with --kv-cache-dtype fp8: the reference keeps its KV unquantised, so what is left
    is the FP8 KV cache's own KL (with auto both sides are the same engine: KL 0, test_validate_cli.py)."""
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("The capital of France is\ndef fibonacci(n):\\n    \n")
    out = tmp_path / "validate.json"
    rc = validate_cli.main(["--model", str(default_ckpt), "--reference", str(default_ckpt), "--prompts",
                            str(prompts_file), "--max-new-tokens", "8", "--cache-memory", str(64 << 20),
                            "--kv-cache-dtype", "fp8", "--out", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    s = json.loads(out.read_text())["summary"]
    report("qnext-validate tiny default vs itself, --kv-cache-dtype fp8 (2 prompts, N=8): KL mean / max, top-1",
           f"{s['kl_mean']:.3g} / {s['kl_max']:.3g}, {s['top1_agreement']:.2f}")
    assert 0 < s["kl_mean"] < 5e-3 and "top-1" in table, table


def test_tensor_parallel_fp8_matches_one_rank(default_ckpt):
    """Two ranks (gloo on CPU) build their FP8 pools and scales over their own KV heads from the shape rank 0
    sends, and copy scales on a prefix-cache hit on every rank: the same tokens as one rank, MTP drafts included
    (float64, as test_tensor_parallel.py: the ranks' summation order stays below any logit gap)."""
    prompt = prompts(4, (40,))[0]
    runs = []
    for tp in (1, 2):
        e = Engine(EngineConfig(model=str(default_ckpt), dtype="float64", kv_cache_dtype="fp8", seed=0,
                                tensor_parallel_size=tp, num_speculative_tokens=2, cache_memory=64 << 20))
        try:
            first, _, _ = run_turn(e, "a", prompt)
            runs.append((first, run_turn(e, "b", prompt + first + [7, 8, 9])))
        finally:
            e.close()
    (first1, (second1, lp1, hit1)), (first2, (second2, lp2, hit2)) = runs
    assert hit1 == hit2 > len(prompt)
    assert first1 == first2 and second1 == second2
    assert lp1 == pytest.approx(lp2, abs=1e-9)
