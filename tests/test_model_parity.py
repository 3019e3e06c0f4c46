"""Our model, loaded by our loader from a `save_pretrained` checkpoint, against transformers' forward.

Against transformers the comparison is in fp32 (max abs logit diff <= 1e-4). Where a DeltaNet head's output is
tiny, the gated RMSNorm after it amplifies fp32 rounding (transformers computes the delta rule in fp32 too), so
differences of ~1e-4 appear on some rows for some random weights even between two exact implementations.
Our own invariants (packed == alone, chunked == one-shot) are therefore checked in float64, where any
algorithmic slip shows up and rounding does not (<= 1e-9).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from hf_reference import make_hf_checkpoint
from paged_runner import PagedRunner
from qnext.worker.loader import load_model

TOL = 1e-4
EXACT = 1e-9

CONFIGS = {
    # interval 2, one kv head, half the head rotated, a dense (mlp_only) layer
    "interval2_kv1": dict(full_attention_interval=2, num_key_value_heads=1, num_hidden_layers=4, mlp_only_layers=[1],
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                           "partial_rotary_factor": 0.5}),
    # interval 4 (the real pattern), two kv heads, a quarter rotated (the real factor), 8 layers
    "interval4_kv2": dict(full_attention_interval=4, num_key_value_heads=2, num_hidden_layers=8,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = make_hf_checkpoint(d, seed=1, **CONFIGS[request.param])
    return hf, load_model(d), load_model(d, dtype=torch.float64)


def prompt(n: int, seed: int, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_full_prompt_logits(pair):
    hf, ours, _ = pair
    ids = prompt(40, 0)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    runner = PagedRunner(ours)
    got = runner.step([(runner.new_seq(), ids)])[0]
    assert (got - ref).abs().max().item() <= TOL


def test_prefill_then_decode_matches_hf_cache(pair):
    hf, ours, _ = pair
    ids = prompt(21, 1)
    runner = PagedRunner(ours)
    sid = runner.new_seq()
    # transformers 5.x renamed past_key_values to cache (5.25 warns; the old name goes in 5.40)
    cache_arg = "cache" if "cache" in inspect.signature(type(hf).forward).parameters else "past_key_values"
    with torch.no_grad():
        out = hf(torch.tensor([ids]), use_cache=True)
    ref, past = out.logits[0, -1], getattr(out, cache_arg)
    got = runner.step([(sid, ids)])[0][-1]
    assert (got - ref).abs().max().item() <= TOL
    for _ in range(16):
        nxt = int(ref.argmax())
        with torch.no_grad():
            out = hf(torch.tensor([[nxt]]), use_cache=True, **{cache_arg: past})
        ref, past = out.logits[0, -1], getattr(out, cache_arg)
        got = runner.step([(sid, [nxt])])[0][-1]
        assert (got - ref).abs().max().item() <= TOL


def test_packed_batch_equals_each_alone(pair):
    _, _, ours = pair
    prompts = [prompt(n, 10 + n) for n in (1, 7, 33)]
    alone = []
    for p in prompts:
        r = PagedRunner(ours)
        alone.append(r.step([(r.new_seq(), p)])[0])
    r = PagedRunner(ours, seed=3)
    packed = r.step([(r.new_seq(), p) for p in prompts])
    for a, b in zip(alone, packed):
        assert (a - b).abs().max().item() <= EXACT
    # and a mixed step: two decodes beside a prefill chunk, against decoding alone
    sids = list(range(3))
    mixed = r.step([(sids[0], [5]), (sids[1], [6]), (sids[2], prompt(9, 99))])
    for sid, toks, got in zip(sids, ([5], [6], prompt(9, 99)), mixed):
        single = PagedRunner(ours)
        s = single.new_seq()
        single.step([(s, prompts[sid])])
        want = single.step([(s, toks)])[0]
        assert (got - want).abs().max().item() <= EXACT


@pytest.mark.parametrize("chunk", [5, 16])
def test_chunked_prefill_equals_one_shot(pair, chunk):
    _, _, ours = pair
    ids = prompt(70, 2)  # crosses the DeltaNet chunk size (64) too
    r = PagedRunner(ours)
    one_shot = r.step([(r.new_seq(), ids)])[0]
    r2 = PagedRunner(ours)
    sid = r2.new_seq()
    pieces = [r2.step([(sid, ids[i:i + chunk])])[0] for i in range(0, len(ids), chunk)]
    assert (torch.cat(pieces) - one_shot).abs().max().item() <= EXACT


def test_yarn_beyond_original_context(tmp_path):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5}
    hf = make_hf_checkpoint(tmp_path, seed=4, rope_parameters=rope, max_position_embeddings=64,
                            full_attention_interval=2)
    ours = load_model(tmp_path)
    assert ours.config.rope.yarn_factor == 4.0 and ours.rotary.scale > 1.0
    ids = prompt(60, 5)  # positions up to 59, well past 16
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    r = PagedRunner(ours)
    got = r.step([(r.new_seq(), ids)])[0]
    assert (got - ref).abs().max().item() <= TOL


def test_bf16_is_as_close_to_float32_as_transformers_own_bf16(tmp_path):
    """bf16 on a CPU runs a different path (worker/cpu_linear.py: packed and fused linears, the dense experts as
    two GEMMs); its error against the fp32 reference must be of the size transformers' bf16 forward has."""
    import copy

    hf = make_hf_checkpoint(tmp_path, seed=2, **CONFIGS["interval4_kv2"])
    ids = prompt(40, 6)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)(torch.tensor([ids])).logits[0].float()
    r = PagedRunner(load_model(tmp_path, dtype=torch.bfloat16))
    got = r.step([(r.new_seq(), ids)])[0].float()
    err = lambda x: ((x - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(got) <= 1.5 * err(hf_bf16) + 1e-3, (err(got), err(hf_bf16))
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    agree_hf = (hf_bf16.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= agree_hf - 0.1, (agree, agree_hf)
