import math

import pytest
import torch

from qnext.worker.sampler import (CDF_BLOCK, FIRST_NUCLEUS_CANDIDATES, NUCLEUS_CANDIDATES, STREAM_SAMPLE,
                                  PenaltyTokens, SamplingBatch, inverse_cdf_draw, processed_probs, sample,
                                  uniform_noise)
from qnext.worker.token_history import TokenHistory
from qnext.worker.types import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def make_batch(params: list[SamplingParams], device: torch.device, vocab: int, *,
               seeds: list[int] | None = None, steps: list[int] | None = None,
               prompt: list[list[int]] | None = None, output: list[list[int]] | None = None,
               suppressed: list[list[int]] | None = None) -> SamplingBatch:
    b = len(params)
    empty = [[] for _ in range(b)]
    histories = [PenaltyTokens(TokenHistory.of(p, o, vocab)) for p, o in zip(prompt or empty, output or empty)]
    return SamplingBatch.build(params, seeds if seeds is not None else list(range(b)),
                               steps if steps is not None else [0] * b, histories, suppressed or empty, vocab, device)


def draw(row: list[float], params: SamplingParams, device: torch.device, n: int = 4000,
         **lists: list[int]) -> torch.Tensor:
    """Sample one logits row n times, one batch row per seed 0..n-1; returns [n] token ids on CPU.

    lists: optional prompt / output / suppressed ids, shared by every row."""
    logits = torch.tensor([row] * n, device=device)
    per_row = {k: [v] * n for k, v in lists.items()}
    batch = make_batch([params] * n, device, len(row), **per_row)
    return sample(logits, batch).token_ids.cpu()


def probs_of(row: list[float], params: SamplingParams, device: torch.device, **lists: list[int]) -> torch.Tensor:
    """processed_probs of a single row: [V] on CPU."""
    batch = make_batch([params], device, len(row), **{k: [v] for k, v in lists.items()})
    return processed_probs(torch.tensor([row], device=device), batch)[0].cpu()


# ---- noise ----------------------------------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def _ref_mix(z: int) -> int:  # reference splitmix64 finaliser on Python ints
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _ref_uniform(seed: int, step: int, stream: int, col: int) -> float:
    key = _ref_mix(_ref_mix(_ref_mix((seed & _M64) ^ 0x9E3779B97F4A7C15) ^ step) ^ stream)
    z = _ref_mix((key + (col + 1) * 0x9E3779B97F4A7C15) & _M64)
    return ((z >> 12) + 0.5) * 2.0**-52


def test_noise_matches_unsigned_reference(device: torch.device) -> None:
    # Pins the hash down exactly (int64 wrap-around and emulated logical shifts), on every device.
    seeds, steps = [0, 1, -1, 2**62 + 12345, -(2**63)], [0, 3, 1000, 7, 2**40]
    u = uniform_noise(torch.tensor(seeds, device=device), torch.tensor(steps, device=device), 5, 17).cpu()
    expected = torch.tensor([[_ref_uniform(s, t, 5, c) for c in range(17)] for s, t in zip(seeds, steps)],
                            dtype=torch.float64)
    assert torch.equal(u, expected)


def test_noise_is_uniform_and_open_interval(device: torch.device) -> None:
    u = uniform_noise(torch.arange(512, device=device), torch.zeros(512, dtype=torch.int64, device=device),
                      STREAM_SAMPLE, 1024)
    assert u.dtype == torch.float64 and u.shape == (512, 1024)
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert abs(u.mean().item() - 0.5) < 0.003  # sd of the mean: 0.29 / sqrt(524288) = 4e-4
    assert abs(u.var().item() - 1 / 12) < 0.002
    hist = torch.histc(u.float().cpu(), bins=10, min=0, max=1) / u.numel()
    assert bool(((hist - 0.1).abs() < 0.005).all())
    # Streams and steps give unrelated numbers.
    other = uniform_noise(torch.arange(512, device=device), torch.zeros(512, dtype=torch.int64, device=device),
                          1, 1024)
    assert abs(torch.corrcoef(torch.stack([u.flatten(), other.flatten()]))[0, 1].item()) < 0.01


# ---- greedy, logprobs ---------------------------------------------------------------------------------------


def test_greedy_equals_argmax_regardless_of_seed(device: torch.device) -> None:
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    argmax = logits.float().argmax(-1)
    one_hot = torch.nn.functional.one_hot(argmax, 300).float()
    batch = make_batch([SamplingParams(temperature=0.0, top_k=5, top_p=0.5)] * 16, device, 300,
                       seeds=list(range(100, 116)))
    assert torch.equal(sample(logits, batch).token_ids, argmax)
    assert torch.equal(processed_probs(logits, batch), one_hot)
    # Greedy rows mixed with sampling rows (even rows greedy, odd rows sample at a high temperature).
    params = [SamplingParams(temperature=0.0 if r % 2 == 0 else 2.0, top_p=0.99) for r in range(16)]
    mixed = make_batch(params, device, 300, seeds=list(range(100, 116)))
    tokens = sample(logits, mixed).token_ids
    assert torch.equal(tokens[0::2], argmax[0::2]) and not torch.equal(tokens[1::2], argmax[1::2])
    assert torch.equal(processed_probs(logits, mixed)[0::2], one_hot[0::2])
    # the real vocabulary in bf16 (the blocked row argmax on the logits as they are, no float32 copy), with a tie
    # across blocks: the first maximum, as on the float32 conversion
    big = torch.randn(4, 151936, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
    big[1, 7] = big[1, 150000] = big[1].max() + 1
    greedy = make_batch([SamplingParams(temperature=0.0)] * 4, device, 151936)
    assert torch.equal(sample(big, greedy).token_ids, big.float().argmax(-1)) and sample(big, greedy).token_ids[1] == 7


def test_logprobs_and_top_logprobs_are_raw_log_softmax(device: torch.device) -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)).to(device)
    params = [SamplingParams(top_logprobs=3), SamplingParams(temperature=0.5, top_k=3, top_logprobs=5),
              SamplingParams(temperature=0.0, repetition_penalty=2.0), SamplingParams(top_p=0.3)]
    out = sample(logits, make_batch(params, device, 50, prompt=[[1, 2]] * 4))
    ref = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1))
    values, ids = ref.topk(5, dim=-1)  # n = max top_logprobs in the batch
    assert torch.equal(out.top_ids, ids)
    torch.testing.assert_close(out.top_logprobs, values)
    assert out.logprobs.dtype == torch.float32 and out.token_ids.dtype == torch.int64

    plain = sample(logits, make_batch([SamplingParams()] * 4, device, 50))
    assert plain.top_ids is None and plain.top_logprobs is None


# ---- temperature and filters --------------------------------------------------------------------------------

ROW = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]  # probs 0.5 / 0.3 / 0.15 / 0.05


def test_temperature(device: torch.device) -> None:
    row = [1.0, 0.5, 0.0, -0.5, -1.0, -1.5]
    for t in (0.5, 2.0):
        torch.testing.assert_close(probs_of(row, SamplingParams(temperature=t), device),
                                   torch.softmax(torch.tensor(row) / t, -1))
    # Lower temperature concentrates mass on the top token: measurably, not just in theory.
    share = {t: (draw(row, SamplingParams(temperature=t), device) == 0).float().mean().item() for t in (0.5, 1, 2)}
    assert share[0.5] > share[1] + 0.15 and share[1] > share[2] + 0.07, share


def test_top_k(device: torch.device) -> None:
    row = [0.3, 0.2, 0.1, 0.0, -0.1, -0.2]
    assert set(draw(row, SamplingParams(top_k=2), device).tolist()) == {0, 1}
    assert len(set(draw(row, SamplingParams(), device).tolist())) == 6
    probs = probs_of(row, SamplingParams(top_k=2), device)
    torch.testing.assert_close(probs[:2], torch.softmax(torch.tensor(row[:2]), -1))
    assert bool((probs[2:] == 0).all())


def test_top_p(device: torch.device) -> None:
    # Mass before token 2 is 0.8 >= 0.7, so only tokens 0 and 1 survive, renormalised.
    torch.testing.assert_close(probs_of(ROW, SamplingParams(top_p=0.7), device),
                               torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert set(draw(ROW, SamplingParams(top_p=0.7), device).tolist()) == {0, 1}
    assert set(draw(ROW, SamplingParams(), device).tolist()) == {0, 1, 2, 3}


def test_top_p_applies_after_top_k(device: torch.device) -> None:
    # After top_k=3 the mass is 0.5/0.95, 0.3/0.95, ...: the mass before token 2 is 0.842 >= 0.82, so it goes.
    # Without top-k first it would stay (0.8 < 0.82).
    assert probs_of(ROW, SamplingParams(top_p=0.82), device)[2] > 0
    torch.testing.assert_close(probs_of(ROW, SamplingParams(top_k=3, top_p=0.82), device),
                               torch.tensor([0.625, 0.375, 0.0, 0.0]))


def test_min_p(device: torch.device) -> None:
    # Threshold 0.2 * 0.5 = 0.1 removes token 3 (0.05) only.
    torch.testing.assert_close(probs_of(ROW, SamplingParams(min_p=0.2), device),
                               torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    assert set(draw(ROW, SamplingParams(min_p=0.2), device).tolist()) == {0, 1, 2}


def test_filters_leave_default_rows_untouched(device: torch.device) -> None:
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(2)).to(device)
    # Row 2's tail is so small that its float32 cumulative mass reaches exactly 1.0 after token 0: a top-p
    # step run with top_p = 1 would drop the tail because "mass before >= 1.0".
    logits[2] = -30.0
    logits[2, 0] = 0.0
    params = [SamplingParams(), SamplingParams(top_k=3, top_p=0.5, min_p=0.3, temperature=0.7),
              SamplingParams(), SamplingParams(top_p=0.9)]
    probs = processed_probs(logits, make_batch(params, device, 1000))
    for r in (0, 2):
        torch.testing.assert_close(probs[r], torch.softmax(logits[r].float(), -1))
        assert bool((probs[r] > 0).all())
    assert int((probs[1] > 0).sum()) <= 3 and int((probs[3] > 0).sum()) < 1000


# ---- penalties and suppression ------------------------------------------------------------------------------


def test_repetition_penalty(device: torch.device) -> None:
    row = [2.0, 1.5, -1.0, 0.5, 0.0]
    ids = dict(prompt=[0], output=[2, 2])
    # Prompt token 0 (positive) is divided, output token 2 (negative) multiplied, once despite two occurrences.
    expected = torch.tensor([1.0, 1.5, -2.0, 0.5, 0.0])
    torch.testing.assert_close(probs_of(row, SamplingParams(repetition_penalty=2.0), device, **ids),
                               torch.softmax(expected, -1))
    assert int(draw(row, SamplingParams(temperature=0.0), device, n=1, **ids)[0]) == 0
    assert int(draw(row, SamplingParams(temperature=0.0, repetition_penalty=2.0), device, n=1, **ids)[0]) == 1


def test_presence_penalty(device: torch.device) -> None:
    row = [2.0, 1.5, 1.0, 0.0]
    ids = dict(prompt=[1], output=[0, 0, 0, 2])
    # Output tokens 0 and 2 lose 1.0 each however often they occur; prompt-only token 1 is not penalised.
    expected = torch.tensor([1.0, 1.5, 0.0, 0.0])
    torch.testing.assert_close(probs_of(row, SamplingParams(presence_penalty=1.0), device, **ids),
                               torch.softmax(expected, -1))
    assert int(draw(row, SamplingParams(temperature=0.0), device, n=1, **ids)[0]) == 0
    assert int(draw(row, SamplingParams(temperature=0.0, presence_penalty=1.0), device, n=1, **ids)[0]) == 1


def test_frequency_penalty(device: torch.device) -> None:
    row = [2.0, 1.5, 1.0, 0.0]
    # logit -= 0.4 * count: token 0 (3 times) -> 0.8, token 2 (once) -> 0.6; prompt token 1 untouched.
    ids = dict(prompt=[1], output=[0, 2, 0, 0])
    torch.testing.assert_close(probs_of(row, SamplingParams(frequency_penalty=0.4), device, **ids),
                               torch.softmax(torch.tensor([0.8, 1.5, 0.6, 0.0]), -1))
    greedy = SamplingParams(temperature=0.0, frequency_penalty=0.4)
    assert int(draw(row, greedy, device, n=1, prompt=[1], output=[0])[0]) == 0  # 1.6 > 1.5
    assert int(draw(row, greedy, device, n=1, prompt=[1], output=[0, 0])[0]) == 1  # 1.2 < 1.5
    # Negative values encourage repetition.
    torch.testing.assert_close(probs_of(row, SamplingParams(frequency_penalty=-1.0), device, output=[3, 3]),
                               torch.softmax(torch.tensor([2.0, 1.5, 1.0, 2.0]), -1))


def test_suppression(device: torch.device) -> None:
    row = [3.0, 1.0, 0.5, 0.0]
    assert int(draw(row, SamplingParams(temperature=0.0), device, n=1, suppressed=[0])[0]) == 1
    probs = probs_of(row, SamplingParams(), device, suppressed=[0, 2])
    assert probs[0] == 0 and probs[2] == 0
    torch.testing.assert_close(probs[[1, 3]], torch.softmax(torch.tensor([1.0, 0.0]), -1))
    assert set(draw(row, SamplingParams(), device, suppressed=[0]).tolist()) == {1, 2, 3}
    assert 0 in set(draw(row, SamplingParams(), device).tolist())


def test_logit_bias_against_plain_torch(device: torch.device) -> None:
    """processed_probs with a bias = softmax((logits + bias) / T) computed here in float64; the penalties come
    first, suppression after; rows without a bias are untouched by a neighbour's."""
    g = torch.Generator().manual_seed(8)
    vocab = 50
    logits = torch.randn(3, vocab, generator=g, dtype=torch.float64)
    bias = {3: 2.5, 17: -1.0, 40: 0.75}
    params = [SamplingParams(temperature=0.7, logit_bias=tuple(bias.items()), frequency_penalty=0.5),
              SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, logit_bias=((9, 100.0),))]
    batch = make_batch(params, device, vocab, output=[[3, 3], [], []], suppressed=[[40], [], []])
    got = processed_probs(logits.float().to(device), batch).cpu().double()
    want0 = logits[0].clone()
    want0[3] -= 0.5 * 2  # frequency penalty on the twice-emitted token, then its bias
    for t, b in bias.items():
        want0[t] += b
    want0[40] = -math.inf  # suppressed after the bias
    torch.testing.assert_close(got[0], torch.softmax(want0 / 0.7, -1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], torch.softmax(logits[1] / 0.7, -1), atol=1e-6, rtol=1e-5)
    assert got[2][9] > 1 - 1e-6  # +100 all but forces the token


def test_penalties_equal_the_dense_formulas_bit_for_bit(device: torch.device) -> None:
    """The sampler applies penalties, bias and suppression to the listed (row, id) entries only; a plain-torch
    computation over whole [B, V] rows (masks and bincounts, the formulas of the module docstring) must give the
    same float32 logits exactly, for rows mixing every feature, ids repeated within and across prompt and output,
    and rows with none; the caller's logits stay untouched."""
    from qnext.worker.sampler import _penalize_and_suppress
    g = torch.Generator().manual_seed(11)
    vocab, b = 1000, 6
    logits = torch.randn(b, vocab, generator=g) * 4
    params = [SamplingParams(temperature=0.7, repetition_penalty=1.3),
              SamplingParams(temperature=0.7, frequency_penalty=0.5, presence_penalty=0.3),
              SamplingParams(temperature=0.0, repetition_penalty=0.8, presence_penalty=1.0, logit_bias=((7, 2.5),)),
              SamplingParams(temperature=0.7),
              SamplingParams(temperature=0.7, frequency_penalty=-0.7),
              SamplingParams(temperature=0.7, repetition_penalty=1.1, frequency_penalty=1.5, presence_penalty=-0.5)]
    ids = lambda n: torch.randint(0, 40, (n,), generator=g).tolist()  # noqa: E731 (a small range: repeats)
    prompt, output = [ids(30) for _ in range(b)], [ids(12) for _ in range(b)]
    suppressed = [[], [3, 5], [], [7], [], [0, 1, 2]]
    batch = make_batch(params, device, vocab, prompt=prompt, output=output, suppressed=suppressed)
    original = logits.clone()
    got = _penalize_and_suppress(logits.to(device), batch).cpu()
    want = logits.clone()
    for i, p in enumerate(params):
        x = want[i]
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[prompt[i] + output[i]] = True
        x = torch.where(seen & (p.repetition_penalty != 1.0),
                        torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)
        counts = torch.bincount(torch.tensor(output[i]), minlength=vocab).float()
        x = x - (p.frequency_penalty * counts + p.presence_penalty * (counts > 0))
        for t, bias in p.logit_bias:
            x[t] = x[t] + bias
        x[suppressed[i]] = -math.inf
        want[i] = x
    assert torch.equal(got, want)
    assert torch.equal(logits, original)


def test_logit_bias_forces_and_bans_greedy_and_sampled_tokens(device: torch.device) -> None:
    row = [3.0, 2.0, 1.0, 0.0, -1.0]
    for temperature in (0.0, 1.0):
        forced = SamplingParams(temperature=temperature, logit_bias=((4, 100.0),))
        assert set(draw(row, forced, device, n=200).tolist()) == {4}
        banned = SamplingParams(temperature=temperature, logit_bias=((0, -100.0), (1, -100.0)))
        assert set(draw(row, banned, device, n=400).tolist()) <= {2, 3, 4}
    # and greedy logprobs stay those of the raw model distribution (as vLLM reports them by default)
    logits = torch.tensor([row], device=device)
    out = sample(logits, make_batch([SamplingParams(temperature=0.0, top_logprobs=1, logit_bias=((4, 100.0),))],
                                    device, 5))
    assert int(out.token_ids[0]) == 4
    assert logits.tolist() == [row]  # the bias went onto a copy: the caller's float32 logits are untouched
    torch.testing.assert_close(out.logprobs.cpu(), torch.log_softmax(logits.cpu(), -1)[:, 4])


# ---- distribution and seeds ---------------------------------------------------------------------------------

# Chi-square critical values at alpha = 1e-3 by degrees of freedom (standard table; scipy is not installed).
# The draws are a fixed function of the seeds, so the test is deterministic; the bound only has to be sane.
CHI2_CRIT_0_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def test_empirical_frequencies_match_processed_probs(device: torch.device) -> None:
    row = [2.0, 1.5, 1.2, 1.0, 0.3, 0.0, -0.5, -3.0]
    params = SamplingParams(temperature=0.8, top_k=7, top_p=0.97, min_p=0.03, repetition_penalty=1.2,
                            frequency_penalty=0.3)
    ids = dict(prompt=[0], output=[1, 1])
    n = 20000
    probs = probs_of(row, params, device, **ids).double()
    support = probs > 0
    assert 4 <= int(support.sum()) < 8  # the filters really cut something and leave something to test
    tokens = draw(row, params, device, n=n, **ids)
    counts = torch.bincount(tokens, minlength=8).double()
    assert counts[~support].sum() == 0
    expected = n * probs[support]
    assert bool((expected >= 5).all())
    chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
    assert chi2 < CHI2_CRIT_0_001[int(support.sum()) - 1], (chi2, counts, expected)


def test_same_seed_same_token_alone_or_in_batch(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(3)
    vocab = 1000
    target = SamplingParams(temperature=0.9, top_p=0.95, frequency_penalty=0.5, seed=0)
    tokens_seen = set()
    for trial in range(12):
        row = torch.randn(vocab, generator=gen)
        seed, step = 1000 + trial, trial * 3
        alone = make_batch([target], device, vocab, seeds=[seed], steps=[step], output=[[1, 2]])
        alone_token = int(sample(row[None].to(device), alone).token_ids[0])
        # Same row at index 5 of 8, surrounded by rows with other random params, seeds and steps.
        others = [SamplingParams(temperature=float(torch.rand(1, generator=gen)) * 1.5,
                                 top_k=int(torch.randint(0, 50, (1,), generator=gen)),
                                 min_p=float(torch.rand(1, generator=gen)) * 0.2,
                                 repetition_penalty=1.3, top_logprobs=2) for _ in range(7)]
        params = others[:5] + [target] + others[5:]
        logits = torch.randn(8, vocab, generator=gen)
        logits[5] = row
        batch = make_batch(params, device, vocab, seeds=[seed + 1 + i for i in range(7)][:5] + [seed] + [7, 8],
                           steps=[0, 1, 2, 3, 4, step, 5, 6], prompt=[[3, 4]] * 8, output=[[1, 2]] * 8,
                           suppressed=[[9]] * 5 + [[]] * 3)
        assert int(sample(logits.to(device), batch).token_ids[5]) == alone_token
        torch.testing.assert_close(processed_probs(logits.to(device), batch)[5],
                                   processed_probs(row[None].to(device), alone)[0])
        tokens_seen.add(alone_token)
    assert len(tokens_seen) > 6  # the draws really are random, so agreement is not luck


def test_inverse_cdf_draw_equals_a_float64_search_over_the_whole_row(device: torch.device) -> None:
    """The two-level search against the plain definition: the first column whose float64 cumulative mass exceeds
    u x the row's mass, u = uniform_noise column 0. Rows of several shapes: zeros within and across whole
    blocks, a last partial block, one-hot, unnormalised."""
    g = torch.Generator().manual_seed(11)
    vocab, n = 5 * CDF_BLOCK + 37, 400
    probs = torch.softmax(torch.randn(n, vocab, generator=g) * 3, -1)
    probs[::3, 2 * CDF_BLOCK:4 * CDF_BLOCK] = 0  # two empty blocks
    probs[1::4, ::5] = 0
    probs[::7] *= 13.0  # not normalised
    probs[5] = 0
    probs[5, vocab - 1] = 1  # all the mass in the partial block's last column
    probs[6] = 0
    probs[6, 0] = 0.5
    seeds, steps = torch.arange(n), torch.arange(n) % 4
    u = uniform_noise(seeds, steps, STREAM_SAMPLE, 1)
    cum = probs.double().cumsum(-1)
    expected = torch.searchsorted(cum, u * cum[:, -1:], right=True)[:, 0]
    got = inverse_cdf_draw(probs.to(device), seeds.to(device), steps.to(device), STREAM_SAMPLE).cpu()
    assert got[5] == vocab - 1 and got[6] == 0
    assert bool((probs.gather(1, got[:, None]) > 0).all())  # never a column without mass
    # the float32 block sums may move a boundary by ~1e-7 of a block's mass: allow a stray disagreement or two
    assert int((got != expected).sum()) <= 2, (got != expected).nonzero()


def test_unfiltered_rows_follow_the_softmax(device: torch.device) -> None:
    """Temperature-only rows (no top-k / top-p / min-p) draw by the inverse CDF: chi-square of 20,000 draws
    against processed_probs, with a suppressed id and penalties on a row wider than one block."""
    g = torch.Generator().manual_seed(4)
    vocab = CDF_BLOCK + 9
    row = (torch.randn(vocab, generator=g) * 0.3).tolist()
    row[:6] = [2.5, 2.0, 1.8, 1.5, 1.0, 0.5]
    row[CDF_BLOCK + 3] = 2.2  # mass in the partial last block too
    params = SamplingParams(temperature=0.6, repetition_penalty=1.3, presence_penalty=0.4)
    ids = dict(prompt=[0], output=[1, 1], suppressed=[2])
    batch = make_batch([params], device, vocab, prompt=[[0]], output=[[1, 1]], suppressed=[[2]])
    assert batch.unfiltered is not None and not batch.any_racing
    probs = probs_of(row, params, device, **ids).double()
    n = 20000
    counts = torch.bincount(draw(row, params, device, n=n, **ids), minlength=vocab).double()
    assert counts[2] == 0 and probs[2] == 0
    big = probs * n >= 5
    assert int(big.sum()) == vocab - 1  # every column but the suppressed one is a chi-square cell
    cells_expected, cells_seen = probs[big] * n, counts[big]
    chi2 = ((cells_seen - cells_expected) ** 2 / cells_expected).sum().item()
    dof = len(cells_expected) - 1
    crit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3  # Wilson-Hilferty, alpha = 1e-3
    assert chi2 < crit, (chi2, crit)


@pytest.mark.parametrize("target_filtered", [False, True])
def test_draw_method_is_the_rows_own(device: torch.device, target_filtered: bool) -> None:
    """An unfiltered row amid top-k / top-p rows (and a top-p row amid unfiltered ones) draws the same token as
    alone: which draw a row uses depends only on its own parameters."""
    gen = torch.Generator().manual_seed(9)
    vocab = 3000
    target = SamplingParams(temperature=0.9, top_p=0.8) if target_filtered else SamplingParams(temperature=1.2)
    others = ([SamplingParams(temperature=0.7 + 0.1 * i) for i in range(5)] if target_filtered else
              [SamplingParams(temperature=0.8, top_k=5 + i) for i in range(3)] + [SamplingParams(top_p=0.5)] * 2)
    seen = set()
    for trial in range(10):
        logits = torch.randn(6, vocab, generator=gen) * 2
        alone = make_batch([target], device, vocab, seeds=[trial], steps=[trial])
        alone_token = int(sample(logits[3:4].to(device), alone).token_ids[0])
        mixed = make_batch(others[:3] + [target] + others[3:], device, vocab, seeds=[50, 51, 52, trial, 53, 54],
                           steps=[0, 0, 0, trial, 0, 0])
        assert int(sample(logits.to(device), mixed).token_ids[3]) == alone_token
        seen.add(alone_token)
    assert len(seen) > 5


def test_different_seeds_and_steps_give_different_draws(device: torch.device) -> None:
    vocab, n = 1000, 1000
    uniform = torch.zeros(n, vocab, device=device)
    by_seed = sample(uniform, make_batch([SamplingParams()] * n, device, vocab, seeds=list(range(n)))).token_ids
    by_step = sample(uniform, make_batch([SamplingParams()] * n, device, vocab, seeds=[7] * n,
                                         steps=list(range(n)))).token_ids
    # n draws from n equally likely tokens hit about n * (1 - 1/e) = 632 distinct ones; a broken hash far fewer.
    assert len(set(by_seed.tolist())) > 580 and len(set(by_step.tolist())) > 580
    # Seeds are taken mod 2**64: 2**64 - 1 and -1 are the same seed.
    a = make_batch([SamplingParams()] * 2, device, vocab, seeds=[2**64 - 1, -1])
    tokens = sample(uniform[:2], a).token_ids
    assert tokens[0] == tokens[1]


# ---- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", math.nan), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
    ("top_k", 2.5), ("min_p", -0.01), ("min_p", 1.01), ("repetition_penalty", 0.0),
    ("presence_penalty", 2.5), ("frequency_penalty", -2.1), ("seed", 1.5), ("seed", 2**64),
    ("top_logprobs", -1), ("top_logprobs", MAX_TOP_LOGPROBS + 1), ("temperature", "hot"), ("top_k", True),
])
def test_bad_params_raise_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field}: must be"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("bias, message", [
    (((1, 100.5),), r"^logit_bias\[1\]: must be in \[-100, 100\]"),
    (((1, math.inf),), r"^logit_bias\[1\]: must be a finite"),
    (((-1, 1.0),), r"^logit_bias: must be >= 0"), (((1, 1.0), (1, 2.0)), r"^logit_bias: token ids must be unique"),
    (tuple((i, 1.0) for i in range(MAX_LOGIT_BIAS + 1)), r"^logit_bias: .* over the limit"),
    (((1.5, 1.0),), r"^logit_bias: must be an int"), ((1, 2), r"^logit_bias: entries are"),
])
def test_bad_logit_bias_raises_naming_the_field(bias: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(logit_bias=bias)


def test_build_and_sample_validate_inputs() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="^logit_bias: ids must be < vocab_size 10"):
        make_batch([SamplingParams(logit_bias=((10, 1.0),))], cpu, 10)
    with pytest.raises(ValueError, match="suppressed_ids"):
        make_batch([SamplingParams()], cpu, 10, suppressed=[[10]])
    with pytest.raises(ValueError, match="prompt_ids"):
        make_batch([SamplingParams(repetition_penalty=1.1)], cpu, 10, prompt=[[-1]])
    with pytest.raises(ValueError, match="seeds"):
        SamplingBatch.build([SamplingParams()], [], [0], [None], [[]], 10, cpu)
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(1, 11), make_batch([SamplingParams()], cpu, 10))


def test_no_logprobs_unless_asked(device: torch.device) -> None:
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(2)).to(device)
    out = sample(logits, make_batch([SamplingParams(), SamplingParams(temperature=0.0)], device, 50))
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None


def _race_over_the_vocabulary(logits: torch.Tensor, params: list[SamplingParams], batch: SamplingBatch) -> list[int]:
    """The exponential race written out over every column (independent of the sampler's top-k shortcut): among
    the tokens processed_probs keeps, argmax of (scaled logit - log E) with E = -log u(seed, step, column)."""
    probs = processed_probs(logits, batch)
    temps = torch.tensor([[p.temperature] for p in params], dtype=torch.float32, device=logits.device)
    e = uniform_noise(batch.seeds, batch.steps, STREAM_SAMPLE, logits.shape[-1]).log_().neg_()
    score = (logits.float() / temps - e.float().log()).masked_fill(probs == 0, -math.inf)
    return score.argmax(dim=-1).tolist()


@pytest.mark.parametrize("ties", [False, True])
def test_top_k_shortcut_draws_the_same_tokens_as_the_full_race(device: torch.device, ties: bool) -> None:
    """With a top-k on every sampling row only the max_k largest columns get noise; the tokens must equal the
    race over the whole vocabulary, also when ties at the k-th logit run past max_k (the shortcut backs off)."""
    g = torch.Generator().manual_seed(3)
    vocab, n = 3000, 24
    logits = torch.randn(n, vocab, generator=g) * 2
    if ties:
        logits[:, :40] = 5.0  # 40 columns tie for the top: top_k <= 12 keeps all 40 (ties are kept)
    params = [SamplingParams(temperature=[0.5, 1.0, 1.7][i % 3], top_k=[3, 12, 7][i % 3],
                             top_p=[1.0, 0.9, 0.6][i % 3], min_p=[0.0, 0.0, 0.05][i % 3]) for i in range(n)]
    logits = logits.to(device)
    batch = make_batch(params, device, vocab, seeds=[100 + i for i in range(n)], steps=[i % 5 for i in range(n)])
    assert sample(logits, batch).token_ids.tolist() == _race_over_the_vocabulary(logits, params, batch)


@pytest.mark.parametrize("flat_row", [False, True])
def test_nucleus_shortcut_draws_the_same_tokens_as_the_full_race(device: torch.device, flat_row: bool) -> None:
    """Rows filtered by top-p or min-p alone (no top-k) first try the NUCLEUS_CANDIDATES largest columns; the
    tokens must equal the race over the whole vocabulary, also when one row is so flat that its nucleus runs past
    the candidates (the shortcut backs off for the batch), and with top-k rows and greedy rows mixed in."""
    g = torch.Generator().manual_seed(5)
    vocab, n = 4000, 24
    logits = torch.randn(n, vocab, generator=g) * 4  # peaked: top-p 0.9 closes within a few hundred columns
    if flat_row:  # rows whose top-p 0.5 keeps ~2000 columns: each would draw from the wrong set half the time
        for i in (1, 5, 9, 13, 21):
            logits[i] = torch.randn(vocab, generator=g) * 0.01
    params = [SamplingParams(temperature=[0.7, 1.0, 1.3, 0.9][i % 4], top_p=[0.9, 0.5, 1.0, 0.95][i % 4],
                             min_p=[0.0, 0.0, 0.1, 0.0][i % 4], top_k=20 if i % 7 == 3 else 0) for i in range(n)]
    params[10] = SamplingParams(temperature=0.0)
    assert NUCLEUS_CANDIDATES < vocab
    logits = logits.to(device)
    batch = make_batch(params, device, vocab, seeds=[7 + i for i in range(n)], steps=[i % 3 for i in range(n)])
    assert batch.any_racing and batch.unfiltered is None and not batch.top_k_covers_sampling
    assert sample(logits, batch).token_ids.tolist() == _race_over_the_vocabulary(logits, params, batch)


@pytest.fixture
def race_widths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of columns each call of the sampler's race gets, in order."""
    from qnext.worker import sampler
    widths: list[int] = []
    race = sampler._race

    def spy(values: torch.Tensor, columns: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        widths.append(columns.shape[-1])
        return race(values, columns, batch)
    monkeypatch.setattr(sampler, "_race", spy)
    return widths


@pytest.mark.parametrize("case", ["bf16 ties", "ties past the candidates", "flat min-p row"])
def test_top_k_min_p_batches_race_only_the_kept_columns(race_widths: list[int], case: str) -> None:
    """A batch without top-p rows races over the columns its top-k / min-p rows keep, found through the blocks
    whose maximum reaches the row's threshold: the tokens must equal the race over the whole vocabulary with
    bf16 logits (which tie often), with 40 columns tied at the top (past every top-k), and with a flat min-p row
    that keeps most of the vocabulary (then the race runs over all of it); greedy and unfiltered rows mixed in.
    The race gets only the kept columns otherwise."""
    g = torch.Generator().manual_seed(9)
    vocab, n = 20000, 12
    logits = torch.randn(n, vocab, generator=g) * 3
    if case == "ties past the candidates":
        logits[:, 500:540] = 20.0
    if case == "flat min-p row":
        logits[4] = torch.randn(vocab, generator=g) * 1e-3
    logits = logits.bfloat16().float() if case == "bf16 ties" else logits
    params = [SamplingParams(temperature=[0.7, 1.0, 1.3][i % 3], top_k=[50, 0, 7][i % 3],
                             min_p=[0.0, 0.05, 0.2][i % 3]) for i in range(n)]
    params[3], params[8] = SamplingParams(temperature=0.0), SamplingParams(temperature=0.9)  # greedy, unfiltered
    batch = make_batch(params, torch.device("cpu"), vocab, seeds=[50 + i for i in range(n)], steps=[2] * n)
    assert batch.top_p is None and batch.any_racing and batch.unfiltered is not None
    got, want = sample(logits, batch).token_ids.tolist(), _race_over_the_vocabulary(logits, params, batch)
    del got[8], want[8]  # the unfiltered row draws by its CDF, not by a race
    assert got == want
    kept = 40 if case == "ties past the candidates" else 50
    assert race_widths[-1] == vocab if case == "flat min-p row" else kept <= race_widths[-1] < 200, race_widths


def test_a_batch_marked_without_unfiltered_rows_races_them_over_the_vocabulary() -> None:
    """bench/sampler.py's baseline: temperature-only rows marked as racing (no inverse-CDF draw) have no
    threshold; they race over the whole vocabulary, as the race written out does."""
    import dataclasses
    params = [SamplingParams(temperature=0.8)] * 3
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(4)) * 4
    batch = dataclasses.replace(make_batch(params, torch.device("cpu"), 5000), unfiltered=None, any_racing=True)
    assert sample(logits, batch).token_ids.tolist() == _race_over_the_vocabulary(logits, params, batch)


def test_nucleus_shortcut_races_only_the_candidates(race_widths: list[int]) -> None:
    """Peaked top-p rows race FIRST_NUCLEUS_CANDIDATES columns, rows whose nucleus is a few hundred columns
    NUCLEUS_CANDIDATES, flat rows the vocabulary (bench/sampler.py times it)."""
    logits = torch.randn(4, 20000, generator=torch.Generator().manual_seed(1)) * 4
    sample(logits, make_batch([SamplingParams(temperature=0.8, top_p=0.9)] * 4, torch.device("cpu"), 20000))
    head = torch.zeros(4, 20000)
    head[:, 1000:1200] = 12 + torch.randn(4, 200, generator=torch.Generator().manual_seed(2)) * 0.1  # ~180 kept
    params = [SamplingParams(top_p=0.9)] * 4
    batch = make_batch(params, torch.device("cpu"), 20000)
    assert sample(head, batch).token_ids.tolist() == _race_over_the_vocabulary(head, params, batch)
    sample(logits * 0.001, make_batch([SamplingParams(top_p=0.9)] * 4, torch.device("cpu"), 20000))  # flat
    assert race_widths == [FIRST_NUCLEUS_CANDIDATES, NUCLEUS_CANDIDATES, 20000]
