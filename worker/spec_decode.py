"""MTP speculative decoding: drafting from the MTP head and the acceptance rule (docs/model.md §7,
docs/architecture.md §9).

Acceptance (speculative sampling, Leviathan et al. / Chen et al.): with target distribution p and draft
distribution q at draft position j, accept draft d with probability min(1, p(d) / q(d)); at the first
rejection emit a token drawn from the residual max(p - q, 0) / Z and stop; if all k drafts are accepted,
emit a bonus token drawn from p at position k. The emitted tokens are distributed exactly as sampling from
p token by token. Greedy requests have one-hot p and q, so the rule reduces to "accept while the target
argmax agrees, then emit the target's argmax".

p and q are the sampler's processed distributions (penalties, suppression, temperature, top-k/p, min-p), the
same the non-speculative path draws from, with each position's history extended by the drafts before it.
All randomness is counter based on (seed, step, stream): the bonus token uses the sampler's own stream and
step, so a fully accepted step draws the very token plain decoding would have drawn at that step.

The Gated DeltaNet state rollback lives in the kernels (verify chunks record the state after each position)
and `CacheTensors.rollback`; the engine wires the steps together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qnext.worker.sampler import STREAM_SAMPLE, uniform_noise

STREAM_DRAFT = 1  # drawing draft tokens from q
STREAM_ACCEPT = 2  # the accept test's uniform
STREAM_RESIDUAL = 3  # drawing from the residual after a rejection


def race(probs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, stream: int,
         greedy: torch.Tensor | None = None) -> torch.Tensor:
    """Exponential race: one token per row drawn exactly from probs [n, V] (rows need not be normalised).
    Greedy rows (one-hot distributions) take the argmax without paying for noise over the vocabulary."""
    tokens = probs.argmax(dim=-1)
    draw = torch.ones_like(tokens, dtype=torch.bool) if greedy is None else ~greedy
    if draw.any():
        rows = draw.nonzero()[:, 0]
        exp_noise = uniform_noise(seeds[rows], steps[rows], stream, probs.shape[1]).log_().neg_()
        # fp32 like the sampler's own race, so a bonus token equals the token plain decoding draws at that step
        tokens[rows] = (probs[rows].float() / exp_noise.to(torch.float32)).argmax(dim=-1)
    return tokens


@dataclass
class VerifyResult:
    tokens: list[list[int]]  # per request: accepted drafts + one residual or bonus token
    num_accepted: list[int]


def accept_drafts(
    target_probs: list[torch.Tensor],  # per request [k_r + 1, V]: p at the last token and after each draft
    draft_probs: list[torch.Tensor],  # per request [k_r, V]: q each draft was drawn from
    drafts: list[list[int]],  # per request k_r draft tokens
    seeds: list[int],
    first_steps: list[int],  # per request: the output index of the first token this step emits
    greedy: list[bool] | None = None,  # requests whose p and q are one-hot (only skips work)
) -> VerifyResult:
    """The acceptance rule above, for a batch of verify chunks."""
    dev = target_probs[0].device
    tokens, accepted = [], []
    final_rows, final_seeds, final_steps, is_bonus = [], [], [], []
    for p, q, d, seed, step in zip(target_probs, draft_probs, drafts, seeds, first_steps):
        k = len(d)
        a = 0
        if k:
            idx = torch.arange(k, device=dev)
            dt = torch.tensor(d, device=dev)
            pd, qd = p[idx, dt].double(), q[idx, dt].double()
            u = uniform_noise(torch.full((k,), seed, dtype=torch.int64, device=dev),
                              torch.arange(step, step + k, device=dev), STREAM_ACCEPT, 1)[:, 0]
            ok = (u * qd < pd).tolist()  # u < p/q without dividing; q(d) > 0 since d was drawn from q
            while a < k and ok[a]:
                a += 1
        accepted.append(a)
        tokens.append(list(d[:a]))
        final_rows.append(p[a] if a == k else (p[a] - q[a]).clamp(min=0))
        final_seeds.append(seed)
        final_steps.append(step + a)
        is_bonus.append(a == k)
    rows = torch.stack(final_rows)
    seeds_t = torch.tensor(final_seeds, dtype=torch.int64, device=dev)
    steps_t = torch.tensor(final_steps, device=dev)
    greedy_t = torch.tensor(greedy or [False] * len(rows), device=dev)
    bonus_t = torch.tensor(is_bonus, device=dev)
    # each row draws once: the bonus rows from p on the sampler's stream, the others from the residual
    final = race(rows, seeds_t, steps_t, STREAM_SAMPLE, greedy_t | ~bonus_t)
    residual = race(rows, seeds_t, steps_t, STREAM_RESIDUAL, greedy_t | bonus_t)
    final = torch.where(bonus_t | greedy_t, final, residual).tolist()
    for i in range(len(tokens)):
        tokens[i].append(int(final[i]))
    return VerifyResult(tokens, accepted)


@dataclass
class SpecCounters:
    """Drafted / accepted tokens, for one request or the whole engine."""

    num_drafted: int = 0
    num_accepted: int = 0
    num_verify_steps: int = 0
    accepted_by_position: list[int] = field(default_factory=lambda: [0] * 4)  # drafts accepted at j = 0..

    def add(self, num_drafted: int, num_accepted: int) -> None:
        self.num_drafted += num_drafted
        self.num_accepted += num_accepted
        self.num_verify_steps += 1
        for j in range(num_accepted):
            if j >= len(self.accepted_by_position):
                self.accepted_by_position.append(0)
            self.accepted_by_position[j] += 1

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verify step (accepted drafts + the target's own token)."""
        return (self.num_accepted + self.num_verify_steps) / self.num_verify_steps if self.num_verify_steps else 0.0
