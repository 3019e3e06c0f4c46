"""Load-adaptive speculation: how many MTP drafts each request gets in the next step (docs/speculation.md).

A request's `num_speculative_tokens` is a maximum. Each step, for each speculating request, the policy picks the
draft length k in 0..max that maximises expected tokens per second:

    E(alpha, k) = 1 + alpha + ... + alpha^k      tokens a verify step of k drafts emits (per-position acceptance alpha)
    T(k, B)     = measured seconds of a step that verifies k drafts and drafts k more, at B decode rows
    k*          = argmax_k E(alpha_r, k) / T(k, B)

alpha_r is the request's own acceptance (recent verify steps weigh more) shrunk towards the engine-wide figure,
which is what a new request starts from. T is learned online, per batch-size bucket (1, 2, 4, ... rows), as the
median of recent timings: the whole step less its drafting keyed by the longest draft it verified, the drafting
part by the passes it ran.
Until every k of a bucket has been timed a few times, the bucket's steps try the untimed k (a few steps per
bucket, and again when a timing has gone stale), so the choice rests on this device's figures, not on guesses.

A request at k = 0 stops drafting (no MTP logits, no draft sampling) and defers the MTP head's pass over its rows
to its next drafting step or KV-block boundary (worker/spec_decode.py), so drafting can resume at any step with
complete MTP KV. So that its estimate can recover, such requests
draft their maximum in a probe step, all in the same step so only that step pays: every `PROBE_EVERY` steps at first,
twice as far apart after each probe that nothing was accepted in (up to `MAX_PROBE_EVERY`), back to
`PROBE_EVERY` when a probe's draft is accepted; and only where drafting could pay at all (with every draft
accepted some k would beat k = 0 at the measured costs: not so for a large batch on a small CPU model).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

PROBE_EVERY = 16  # steps between one-draft probes of requests at k = 0 ...
MAX_PROBE_EVERY = 512  # ... growing to this while probes fail
PRIOR_WEIGHT = 2.0  # pseudo-observations of the engine-wide acceptance in each request's estimate
REQUEST_DECAY = 0.9  # per verify step: a request's acceptance follows its recent text
ENGINE_DECAY = 0.99
TIMINGS_NEEDED = 3  # timings of a (bucket, k) before the policy trusts it
STALE_AFTER = 512  # steps of a bucket after which an unchosen k is timed again ...
STALE_AFTER_K0 = 128  # ... k = 0 sooner: a step without drafts costs no time, only the speculative gain of the
# two steps a refresh takes (the transition step back to drafting is not timed: worker/spec_decode.py)
RECENT_TIMINGS = 5  # a (bucket, k)'s cost is the median of its last timings
# Drafting must beat k = 0's tokens per second by this much: step timings carry noise, and where acceptance is
# ~0 (E ~ 1 for every k) a verify step timed a little cheaper than a plain one would otherwise win on noise
# alone (seen on a loaded 2-core machine: drafting in 58% of the steps of a checkpoint that accepted nothing)
DRAFT_MARGIN = 0.05


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a verify step of k drafts emits, drafts accepted independently with probability alpha each."""
    return sum(alpha ** i for i in range(k + 1))


def bucket(rows: int) -> int:
    """Batch-size bucket: the power of two at or above rows."""
    return 1 << max(rows - 1, 0).bit_length()


@dataclass
class Acceptance:
    """Decayed counts of accepted drafts and of rejections (verify steps that stopped before their last draft):
    alpha = accepted / (accepted + rejections) is the maximum-likelihood per-position acceptance."""

    accepted: float = 0.0
    rejections: float = 0.0

    def add(self, num_drafted: int, num_accepted: int, decay: float) -> None:
        self.accepted = self.accepted * decay + num_accepted
        self.rejections = self.rejections * decay + (num_accepted < num_drafted)

    def alpha(self, prior: float, weight: float) -> float:
        return (self.accepted + weight * prior) / (self.accepted + self.rejections + weight)


@dataclass
class _Timing:
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_TIMINGS))
    at_step: int = 0  # the bucket's step count when last timed
    # The median of the recent timings: a cold or disturbed step does not move it (the first decode steps after a
    # prefill ran 21-24 ms where the next took 14.5 on the 2-core box; a moving average started from them
    # overrated k = 0 at batch 16 enough to keep drafting where drafts lost, 0.89x of k = 0). Kept as each timing
    # comes (`add`): the policy reads every k's cost every step
    seconds: float = 0.0

    @property
    def count(self) -> int:
        return len(self.recent)

    def add(self, seconds: float, at_step: int) -> None:
        self.recent.append(seconds)
        self.at_step = at_step
        self.seconds = statistics.median(self.recent)


@dataclass
class _Bucket:
    steps: int = 0
    forward: dict[int, _Timing] = field(default_factory=dict)  # k verified -> forward + verify seconds
    drafting: dict[int, _Timing] = field(default_factory=dict)  # k drafted -> drafting seconds

    def record(self, table: dict[int, _Timing], k: int, seconds: float) -> None:
        table.setdefault(k, _Timing()).add(seconds, self.steps)

    def untimed(self, k_max: int) -> int | None:
        """A k whose timing is missing or stale, smallest first; None when all are fresh."""
        for k in range(k_max + 1):
            for table in (self.forward, self.drafting):
                t = table.get(k)
                if k == 0 and table is self.drafting:
                    continue  # drafting nothing costs nothing
                if t is None or t.count < TIMINGS_NEEDED or self.steps - t.at_step > (STALE_AFTER_K0 if k == 0
                                                                                      else STALE_AFTER):
                    return k
        return None

    def seconds(self, k: int) -> float:
        return self.forward[k].seconds + (self.drafting[k].seconds if k else 0.0)


class DraftLengthPolicy:
    def __init__(self, adaptive: bool = True) -> None:
        """adaptive=False: every request drafts its maximum every step (the fixed-k behaviour)."""
        self.adaptive = adaptive
        self.engine = Acceptance()
        self._requests: dict[str, Acceptance] = {}
        self._buckets: dict[int, _Bucket] = {}
        self._step = 0
        self._probe_every, self._next_probe = PROBE_EVERY, PROBE_EVERY
        self._probed: set[str] = set()  # requests whose pending draft is a probe
        self.last_lengths: list[int] = []  # the draft lengths chosen at the last proposal (for metrics)

    @property
    def mean_last_length(self) -> float:
        return sum(self.last_lengths) / len(self.last_lengths) if self.last_lengths else 0.0

    def finish(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._probed.discard(request_id)

    def observe(self, request_id: str, num_drafted: int, num_accepted: int) -> None:
        """One verify step's outcome for one request."""
        if request_id in self._probed:
            self._probed.discard(request_id)
            if num_accepted:  # probe again soon: acceptance may be back
                self._probe_every = PROBE_EVERY
                self._next_probe = min(self._next_probe, self._step + PROBE_EVERY)
        self._requests.setdefault(request_id, Acceptance()).add(num_drafted, num_accepted, REQUEST_DECAY)
        self.engine.add(num_drafted, num_accepted, ENGINE_DECAY)

    def alpha(self, request_id: str, prior: float | None = None) -> float:
        """The request's acceptance estimate; `prior`: the engine-wide one, if the caller has it already."""
        prior = self.engine.alpha(0.5, PRIOR_WEIGHT) if prior is None else prior
        own = self._requests.get(request_id)
        return prior if own is None else own.alpha(prior, PRIOR_WEIGHT)

    def record_forward(self, rows: int, k_verified: int, seconds: float) -> None:
        """A decode step's forward + verify + MTP pass took `seconds`; its longest verified draft was k."""
        b = self._buckets.setdefault(bucket(rows), _Bucket())
        b.steps += 1
        b.record(b.forward, k_verified, seconds)

    def record_drafting(self, rows: int, k_drafted: int, seconds: float) -> None:
        if k_drafted:
            b = self._buckets.setdefault(bucket(rows), _Bucket())
            b.record(b.drafting, k_drafted, seconds)

    def _best_lengths(self, request_ids: list[str], maxima: list[int], rates: list[float]) -> list[int]:
        """Each request's k* = argmax_k E(alpha_r, k) * rates[k] (rates: steps per second at each k; ties to the
        smaller k), or 0 where it does not beat k = 0 by DRAFT_MARGIN. Once per step for every decode row, so
        inline arithmetic: E(alpha, k) summed term by term, the engine-wide prior computed once (at 16 rows this
        loop had cost ~0.14 ms a step through `expected_tokens` and a `max` per request, ~2% of a small model's
        step)."""
        prior = self.engine.alpha(0.5, PRIOR_WEIGHT)
        bar = (1 + DRAFT_MARGIN) * rates[0]
        chosen = []
        for rid, m in zip(request_ids, maxima):
            alpha = self.alpha(rid, prior)
            best_k, best_rate, tokens, term = 0, rates[0], 1.0, 1.0
            for k in range(1, m + 1):
                term *= alpha
                tokens += term
                if tokens * rates[k] > best_rate:
                    best_k, best_rate = k, tokens * rates[k]
            chosen.append(best_k if best_rate > bar else 0)
        return chosen

    def choose(self, request_ids: list[str], maxima: list[int]) -> list[int]:
        """Draft lengths for the next step of these decode rows (each <= its maximum). Any length gives a request
        the tokens it would get without speculation (greedy, and seeded sampling by coupled verification,
        worker/spec_decode.py), so the lengths are free to follow the step timings."""
        self._step += 1
        if not self.adaptive:
            self.last_lengths = list(maxima)
            return self.last_lengths
        b = self._buckets.setdefault(bucket(len(request_ids)), _Bucket())
        k_max = max(maxima, default=0)
        trial = b.untimed(k_max)
        if trial is not None:  # time this k on this bucket first
            self.last_lengths = [min(trial, m) for m in maxima]
            return self.last_lengths
        costs = [b.seconds(k) for k in range(k_max + 1)]
        chosen = self._best_lengths(request_ids, maxima, [1.0 / c for c in costs])
        idle = [i for i, (k, m) in enumerate(zip(chosen, maxima)) if k == 0 and m]
        # probe only where drafting could pay at all: with every draft accepted, some k beats k = 0
        could_pay = any(expected_tokens(1.0, k) / costs[k] > 1.0 / costs[0] for k in range(1, k_max + 1))
        if idle and could_pay and self._step >= self._next_probe:
            for i in idle:
                chosen[i] = maxima[i]  # the most evidence per probe step
                self._probed.add(request_ids[i])
            self._next_probe = self._step + self._probe_every
            self._probe_every = min(2 * self._probe_every, MAX_PROBE_EVERY)  # reset by an accepted probe
        self.last_lengths = chosen
        return chosen
