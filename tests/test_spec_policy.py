"""The adaptive draft length (worker/spec_policy.py): pure policy logic on synthetic step costs and acceptance."""

import random

import pytest

from qnext.worker.spec_policy import (MAX_PROBE_EVERY, PROBE_EVERY, STALE_AFTER_K0, TIMINGS_NEEDED, DraftLengthPolicy,
                                      bucket, expected_tokens)


def drive(policy: DraftLengthPolicy, alpha: float, steps: int, rows: int = 1, k_max: int = 2,
          cost=lambda k: 1.0 + 0.4 * k, seed: int = 0) -> list[list[int]]:
    """Run the policy as the engine would: choose, time the drafting, verify (drafts accepted with probability
    alpha each), time the forward. Returns the lengths chosen at each step."""
    rng = random.Random(seed)
    ids = [f"r{i}" for i in range(rows)]
    history, pending = [], [0] * rows
    for _ in range(steps):
        policy.record_forward(rows, max(pending), cost(max(pending)) * 0.6)
        for rid, k in zip(ids, pending):
            if k:
                a = 0
                while a < k and rng.random() < alpha:
                    a += 1
                policy.observe(rid, k, a)
        pending = policy.choose(ids, [k_max] * rows)
        policy.record_drafting(rows, max(pending), cost(max(pending)) * 0.4 - 0.4)
        history.append(pending)
    return history


def test_expected_tokens_and_buckets():
    assert expected_tokens(0.0, 3) == 1 and expected_tokens(1.0, 2) == 3
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 16, 17)] == [1, 2, 4, 4, 8, 16, 32]


def test_the_per_request_choice_is_the_formula():
    """`_best_lengths` (inline arithmetic) against the docstring's formula written plainly: k* = argmax_k
    E(alpha_r, k) / T(k), ties to the smaller k, 0 unless it beats k = 0 by DRAFT_MARGIN; random acceptance
    histories, maxima and costs, including exact ties."""
    from qnext.worker.spec_policy import DRAFT_MARGIN
    rng = random.Random(3)
    for trial in range(300):
        policy = DraftLengthPolicy()
        ids = [f"r{i}" for i in range(rng.randint(1, 12))]
        for _ in range(rng.randint(0, 20)):
            drafted = rng.randint(1, 4)
            policy.observe(rng.choice(ids + ["gone"]), drafted, rng.randint(0, drafted))
        maxima = [rng.randint(0, 4) for _ in ids]
        costs = [1.0] * 5 if trial % 10 == 0 else [rng.uniform(0.5, 4.0) for _ in range(5)]
        expected = []
        for rid, m in zip(ids, maxima):
            alpha = policy.alpha(rid)
            k = max(range(m + 1), key=lambda k: (expected_tokens(alpha, k) / costs[k], -k))
            expected.append(k if expected_tokens(alpha, k) / costs[k] > (1 + DRAFT_MARGIN) / costs[0] else 0)
        assert policy._best_lengths(ids, maxima, [1.0 / c for c in costs]) == expected


def test_each_length_is_timed_before_the_policy_chooses():
    h = drive(DraftLengthPolicy(), alpha=1.0, steps=3 * (TIMINGS_NEEDED + 1))
    tried = [row[0] for row in h]
    assert set(tried[:3 * TIMINGS_NEEDED + 1]) == {0, 1, 2}


def test_drafts_stop_when_nothing_is_accepted_and_probes_back_off():
    h = drive(DraftLengthPolicy(), alpha=0.0, steps=2000, rows=4)
    late = h[200:]
    drafting = [i for i, row in enumerate(late) if any(row)]
    # a stale-timing refresh or a probe now and then; the probes grow apart up to MAX_PROBE_EVERY
    assert len(drafting) / len(late) < 0.02
    gaps = [b - a for a, b in zip(drafting, drafting[1:])]
    assert max(gaps) >= MAX_PROBE_EVERY // 2 > PROBE_EVERY


def test_noise_that_makes_verify_steps_look_cheaper_does_not_start_drafting():
    """Verify steps timed 3% cheaper than plain ones (noise: they cannot be) with nothing accepted: drafting
    gains nothing and must not win on the timings alone (DRAFT_MARGIN)."""
    # drive() times a step as 0.6 cost(k) + drafting 0.4 cost(k) - 0.4: T(0) = 0.6, T(2) = 0.582, 3% under it
    h = drive(DraftLengthPolicy(), alpha=0.0, steps=1000, rows=3, cost=lambda k: 1.0 - 0.009 * k)
    late = h[100:]
    assert sum(any(row) for row in late) / len(late) < 0.05


def test_full_acceptance_drafts_the_maximum():
    h = drive(DraftLengthPolicy(), alpha=1.0, steps=300)
    assert sum(row[0] == 2 for row in h[50:]) / len(h[50:]) > 0.97


def test_the_choice_follows_the_cost_of_drafting():
    # alpha 0.6: 2 drafts give 1.96 tokens. Cheap drafts (step 1 + 0.1k): k = 2 wins; dear ones (1 + 1.5k): k = 0
    cheap = drive(DraftLengthPolicy(), alpha=0.6, steps=400, cost=lambda k: 1 + 0.1 * k)
    dear = drive(DraftLengthPolicy(), alpha=0.6, steps=400, cost=lambda k: 1 + 1.5 * k)
    assert sum(r[0] == 2 for r in cheap[100:]) > 0.9 * 300
    assert sum(r[0] == 0 for r in dear[100:]) > 0.9 * 300


def test_cold_first_timings_do_not_decide():
    """The engine's first decode steps after a prefill run cold; here the first two cost 1.6x, and only k = 0 is
    timed then. At these costs even full acceptance loses (3 tokens for 3.3x a k = 0 step), so k = 0 is right.
    One cold timing among the first three does not count (a median); after two, the refreshed k = 0 timings
    (every STALE_AFTER_K0 steps) outvote them."""
    for cold, settled_by in ((1, 50), (2, 50 + 2 * STALE_AFTER_K0 + 10)):
        calls = []

        def cost(k: float) -> float:
            calls.append(k)
            return (1 + 0.69 * k) * (1.6 if len(calls) <= 2 * cold - 1 and len(calls) % 2 else 1.0)

        h = drive(DraftLengthPolicy(), alpha=1.0, steps=settled_by + 100, cost=cost)
        assert sum(row[0] == 0 for row in h[settled_by:]) / 100 > 0.97, cold


def test_recovers_when_acceptance_returns():
    policy = DraftLengthPolicy()
    drive(policy, alpha=0.0, steps=300)
    h = drive(policy, alpha=1.0, steps=800, seed=1)  # the next probe is up to MAX_PROBE_EVERY steps away
    assert sum(r[0] == 2 for r in h[-100:]) > 90


def test_a_requests_maximum_and_fixed_mode():
    policy = DraftLengthPolicy()
    assert all(k <= m for _ in range(50) for k, m in zip(policy.choose(["a", "b"], [1, 3]), [1, 3]))
    assert DraftLengthPolicy(adaptive=False).choose(["a", "b"], [1, 3]) == [1, 3]


def test_finished_requests_leave_nothing_behind():
    policy = DraftLengthPolicy()
    drive(policy, alpha=0.5, steps=50, rows=3)
    for rid in ("r0", "r1", "r2"):
        policy.finish(rid)
    assert not policy._requests and not policy._probed


def test_no_probes_where_even_full_acceptance_cannot_pay():
    # a verify step of k drafts costs 1 + 2k plain steps: 3 tokens for 5x the time never pays
    h = drive(DraftLengthPolicy(), alpha=1.0, steps=600, cost=lambda k: 1 + 2.0 * k)
    assert sum(any(row) for row in h[50:]) <= 6  # the stale-timing refresh of each k, nothing else
