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

A request with its own seed is verified by coupled draws instead (`verification`): every verify row draws the
target's token as plain decoding would at that position (the sampler, the same noise), drafts were drawn with
that noise too, and a draft is accepted while it equals the target's draw. Its tokens are then exactly plain
decoding's whatever the draft length, which the rule above cannot give (which draw makes which token there
depends on k): the same seed gives the same tokens with or without speculation, and the draft-length policy
may vary k for it. Where q differs from p, coupled draws agree less often than the rule accepts.

`SpecDecoder` runs the whole cycle for the engine: after a step's forward it verifies the verify chunks
(acceptance, then the Gated DeltaNet state rollback: verify chunks record the state after each position in the
kernels, and `CacheTensors.rollback` picks the last accepted one), runs the MTP head over every row the step
made real (so its KV stays complete), and after the scheduler's update drafts the next tokens of each running
request, handing them to the scheduler with one call. Its per-request state (counters, the draft distributions
q, a restored prefix's hidden state) lives here and is dropped in one place, `finish`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from qnext.worker.draft_head import draft_head
from qnext.worker.model_runner import ModelRunner, StepForward
from qnext.worker.sampler import (STREAM_SAMPLE, greedy_tokens, inverse_cdf_draw, processed_probs, row_argmax,
                                  SamplingBatch, sample, token_logprobs, uniform_noise)
from qnext.worker.scheduler import Request, RequestStatus, ScheduledChunk, SchedulePlan, Scheduler
from qnext.worker.spec_policy import DraftLengthPolicy

STREAM_DRAFT = 1  # drawing draft tokens from q
STREAM_ACCEPT = 2  # the accept test's uniform
STREAM_RESIDUAL = 3  # drawing from the residual after a rejection
KV_ONLY_MIN_ROWS = 8  # catch-up rows whose MTP output nobody reads: from this many on, they take the KV-only pass
# A catch-up chunk of up to this many rows (a step's accepted tokens, a deferred block) takes the CPU's C token
# steps in the MTP layer (ForwardBatch.token_step_max_len); a prompt's longer chunks the torch paths
CATCH_UP_TOKEN_STEPS = 16


def draw(probs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, stream: int,
         argmax: list[bool] | None = None, racing: list[bool] | None = None) -> torch.Tensor:
    """One token per row drawn exactly from probs [n, V] (rows need not be normalised). `argmax` rows (greedy:
    one-hot distributions, or rows whose draw the caller discards) take the argmax without paying for noise;
    `racing` rows run the exponential race over the vocabulary, the others invert their CDF
    (sampler.inverse_cdf_draw, one uniform per row). On the sampler's stream a request draws the way the sampler
    draws it (a race when it has a filter), so a bonus token equals the token plain decoding draws at that step;
    the draft and residual streams need no such match. The row choices are host lists: no device sync."""
    n = probs.shape[0]
    argmax, racing = argmax or [False] * n, racing or [False] * n
    tokens = row_argmax(probs)
    by_cdf = [i for i in range(n) if not argmax[i] and not racing[i]]
    by_race = [i for i in range(n) if not argmax[i] and racing[i]]
    if by_cdf:
        rows = torch.tensor(by_cdf, device=probs.device)
        tokens[rows] = inverse_cdf_draw(probs[rows], seeds[rows], steps[rows], stream)
    if by_race:
        rows = torch.tensor(by_race, device=probs.device)
        exp_noise = uniform_noise(seeds[rows], steps[rows], stream, probs.shape[1]).log_().neg_()
        # fp32 like the sampler's own race
        tokens[rows] = row_argmax(probs[rows].float() / exp_noise.to(torch.float32))
    return tokens


GREEDY_MATCH, COUPLED_MATCH, ACCEPTANCE_RULE = "greedy", "coupled", "rule"


def verification(r: Request) -> str:
    """How a request's drafts are verified: greedy ones by the argmax, sampled ones with their own seed by
    coupled draws (their tokens must not depend on speculation), other sampled ones by the acceptance rule."""
    if r.sampling.is_greedy:
        return GREEDY_MATCH
    return COUPLED_MATCH if r.sampling.seed is not None else ACCEPTANCE_RULE


def by_verification(requests: list[Request]) -> list[tuple[str, list[int]]]:
    """The requests' indices grouped by `verification`, the non-empty groups only."""
    kind = [verification(r) for r in requests]
    groups = [(how, [i for i, v in enumerate(kind) if v == how]) for how in (GREEDY_MATCH, COUPLED_MATCH,
                                                                             ACCEPTANCE_RULE)]
    return [(how, rows) for how, rows in groups if rows]


def plain_draws(logits: torch.Tensor, batch: SamplingBatch) -> list[int]:
    """The tokens `sample` draws for these rows, as plain decoding does, without its log-probs (the verify step
    computes those for the emitted tokens only)."""
    return sample(logits, dataclasses.replace(batch, max_top_logprobs=0)).token_ids.tolist()


def _accept_while_equal(drafts: list[list[int]], target: list[int]) -> VerifyResult:
    """Accept each request's drafts while they equal the target's tokens (its rows in order, one per draft and
    the bonus row), then emit the target's token at the first difference or the bonus position."""
    tokens, accepted, row = [], [], 0
    for d in drafts:
        a = 0
        while a < len(d) and d[a] == target[row + a]:
            a += 1
        tokens.append(list(d[:a]) + [target[row + a]])
        accepted.append(a)
        row += len(d) + 1
    return VerifyResult(tokens, accepted)


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
    filtered: list[bool] | None = None,  # requests with a top-k / top-p / min-p (their bonus token races)
) -> VerifyResult:
    """The acceptance rule above, for a batch of verify chunks of sampling requests (greedy ones take
    `SpecDecoder._accept_greedy`, the same rule read off the argmax)."""
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
    # each row draws once: the bonus rows from p on the sampler's stream, the others from the residual
    final = draw(rows, seeds_t, steps_t, STREAM_SAMPLE, [not b for b in is_bonus], racing=filtered).tolist()
    residual = draw(rows, seeds_t, steps_t, STREAM_RESIDUAL, is_bonus).tolist()
    final = [f if b else r for f, r, b in zip(final, residual, is_bonus)]
    for i in range(len(tokens)):
        tokens[i].append(int(final[i]))
    return VerifyResult(tokens, accepted)


@dataclass
class SpecCounters:
    """Drafted / accepted tokens, for one request or the whole engine."""

    num_drafted: int = 0
    num_accepted: int = 0
    num_verify_steps: int = 0
    num_draft_steps: int = 0  # decode steps in which the policy chose a draft length (0 included)
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


@dataclass
class _RequestSpec:
    counters: SpecCounters = field(default_factory=SpecCounters)
    draft_probs: torch.Tensor | None = None  # q of the pending drafts [k, V] (None for a greedy request)
    restored: tuple[int, torch.Tensor] | None = None  # (hit position P, the checkpoint's hidden state at P-1)
    deferred: _Deferred | None = None  # MTP rows not run yet (the request is at draft length 0)


@dataclass
class _Deferred:
    """A k = 0 request's MTP rows that wait for its next pass: from position `first`, the target's hidden states
    as (tensor, lo, hi) row ranges of the steps' gathered copies (a step copies every deferring row in one
    gather; a request's own rows are cut out only when they run). Row p pairs with token p + 1, which the
    request holds by the time the rows run, so the tokens are read then (`Request.token_slice`)."""

    first: int
    pieces: list[tuple[torch.Tensor, int, int]]
    num_rows: int

    def hidden(self) -> torch.Tensor:
        parts = [t[lo:hi] for t, lo, hi in self.pieces]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


Logprobs = dict[str, tuple[list[float], list[list[tuple[int, float]]]]]


class SpecDecoder:
    """MTP drafting, verification and rollback for the requests that speculate (num_speculative_tokens > 0)."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler) -> None:
        self.runner, self.scheduler = runner, scheduler
        self.counters = SpecCounters()  # all requests
        self._requests: dict[str, _RequestSpec] = {}
        self._next_lengths: dict[str, int] = {}  # request id -> drafts it gets next step (from `_choose`)
        self._step_drafting_s = 0.0  # this step's drafting time, taken out of the step's timing
        self._step_mtp_pass = False  # whether this step's catch-up ran the MTP head (see record_step)
        # how many drafts each request gets per step (worker/spec_policy.py)
        self.policy = DraftLengthPolicy(adaptive=runner.config.speculative_draft_length == "adaptive")
        # the int8 LM head small draft passes use (`takes`), or None (worker/draft_head.py); not for a sharded head
        screen = runner.greedy_screen  # its int8 weights, where it has them, are the draft head's too
        self.draft_head = (draft_head(runner.config.speculative_draft_head, runner.model.lm_head.weight,
                                      screen.int8 if screen is not None else None)
                           if runner.max_spec_tokens and runner.followers is None else None)

    @property
    def num_tracked(self) -> int:
        """Requests with speculative state (0 once every request has finished: nothing leaks)."""
        return len(self._requests)

    def add(self, request_id: str) -> None:
        self._requests[request_id] = _RequestSpec()

    def counters_of(self, request_id: str) -> SpecCounters | None:
        spec = self._requests.get(request_id)
        return spec.counters if spec else None

    def finish(self, request_id: str) -> SpecCounters | None:
        """Drop a finished or aborted request's state; returns its counters."""
        spec = self._requests.pop(request_id, None)
        self.policy.finish(request_id)
        return spec.counters if spec else None

    def on_restores(self, plan: SchedulePlan) -> None:
        """Prefix-cache hits of speculating requests: keep the checkpoint's hidden state for the MTP row at P-1."""
        by_id = {c.request.request_id: c.request for c in plan.chunks}
        for r in plan.restores:
            spec = self._requests.get(r.request_id)
            if spec is not None and by_id[r.request_id].num_speculative_tokens:
                spec.restored = (r.position, self.runner.cache.ckpt_hidden[r.ckpt_id].clone())

    def on_fork(self, request_ids: list[str], position: int, hidden: torch.Tensor) -> None:
        """Parallel samples forked from a computed prompt of `position` tokens (Engine._fork): the MTP row at
        position - 1 pairs the prompt's last hidden state `hidden` with each sample's own first token (the
        parent's pass paired its own), so it is written with each sample's first MTP pass, as for a prefix hit."""
        h = hidden.clone()
        for request_id in request_ids:
            self._requests[request_id].restored = (position, h)

    def verify(self, chunks: list[ScheduledChunk], logits: torch.Tensor, sampled: dict[str, list[int]],
               logprobs: Logprobs) -> None:
        """Accept or reject each verify chunk's drafts (greedy requests by the argmax alone, seeded sampled ones by
        coupled draws, the others by the acceptance rule); roll DeltaNet states back to the last accepted token."""
        requests = [c.request for c in chunks]
        drafts = [c.draft_token_ids for c in chunks]
        rows = list(accumulate([0] + [len(d) + 1 for d in drafts]))
        tokens: list[list[int]] = [[] for _ in requests]
        accepted = [0] * len(requests)
        accepts = {GREEDY_MATCH: self._accept_greedy, COUPLED_MATCH: self._accept_coupled,
                   ACCEPTANCE_RULE: self._accept_sampled}
        for how, group in by_verification(requests):
            accept = accepts[how]
            group_logits = logits if len(group) == len(requests) else logits[torch.cat(
                [torch.arange(rows[i], rows[i + 1]) for i in group]).to(logits.device)]
            result = accept([requests[i] for i in group], [drafts[i] for i in group], group_logits)
            for i, t, a in zip(group, result.tokens, result.num_accepted):
                tokens[i], accepted[i] = t, a
        rollback_slots, rollback_pos = [], []
        for i, (r, d) in enumerate(zip(requests, drafts)):
            a = accepted[i]
            sampled[r.request_id] = tokens[i]
            # raw log-probs of the emitted tokens, as the sampler reports them; nothing when none were asked for
            n = r.sampling.top_logprobs
            logprobs[r.request_id] = token_logprobs(logits[rows[i]:rows[i] + len(tokens[i])], tokens[i], n) \
                if n else ([], [])
            self._requests[r.request_id].draft_probs = None
            self._requests[r.request_id].counters.add(len(d), a)
            self.counters.add(len(d), a)
            self.policy.observe(r.request_id, len(d), a)
            if a < len(d):
                rollback_slots.append(r.state_slot)
                rollback_pos.append(a)
        if rollback_slots:
            dev = self.runner.device
            self.runner.cache.rollback(torch.tensor(rollback_slots, device=dev),
                                       torch.tensor(rollback_pos, device=dev))

    def _accept_greedy(self, requests: list[Request], drafts: list[list[int]], logits: torch.Tensor) -> VerifyResult:
        """Greedy requests: p and q are one-hot, so `accept_drafts`' rule accepts a draft while it is the target's
        argmax and then emits the target's argmax at the first disagreement (or the bonus position). That, from
        the argmax alone: no [k + 1, V] distributions to build (a 3 x 151,936 one-hot cost ~1.5 ms on a CPU)."""
        target = greedy_tokens(logits, self.runner.sampling_batch(requests, drafts)).tolist()
        return _accept_while_equal(drafts, target)

    def _accept_coupled(self, requests: list[Request], drafts: list[list[int]], logits: torch.Tensor) -> VerifyResult:
        """Seeded sampling requests: each verify row draws the target's token exactly as plain decoding draws at
        that position (the sampler, noise keyed by (seed, step)), and a draft is accepted while it is that token;
        the first differing row's draw (or the bonus row's) is emitted. The tokens are those of plain decoding
        whatever the draft length, so a seeded request's output does not depend on speculation or on the policy.
        Drafts were drawn with the same noise (`_draft_one`), so where q is close to p they mostly agree; the
        acceptance rule would accept more where q and p differ, at the price of that independence."""
        return _accept_while_equal(drafts, plain_draws(logits, self.runner.sampling_batch(requests, drafts)))

    def _accept_sampled(self, requests: list[Request], drafts: list[list[int]], logits: torch.Tensor) -> VerifyResult:
        """Sampling requests: the acceptance rule on the processed distributions p (target) and q (drafts)."""
        p = processed_probs(logits, self.runner.sampling_batch(requests, drafts))
        p_rows = list(p.split([len(d) + 1 for d in drafts]))
        q_rows = [self._requests[r.request_id].draft_probs[:len(d)] for r, d in zip(requests, drafts)]
        return accept_drafts(p_rows, q_rows, drafts, [r.seed for r in requests],
                             [len(r.output_token_ids) for r in requests], [r.sampling.has_filter for r in requests])

    def catch_up(self, plan: SchedulePlan, step: StepForward, sampled: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """MTP pass 1 (docs/model.md §7): the MTP over the rows this step made real, pairing the target's hidden
        state h_p with token t_{p+1} (this keeps the MTP's own KV cache complete, prompt included). Returns,
        per request that drafts next, the MTP hidden state of its last row: what proposes draft 1. Only those
        rows run the whole MTP layer; the others need just their K/V (`mtp_write_kv`).
        A request restored from the prefix cache at P also gets the row at P-1, from the checkpoint's hidden
        state and its own token P (the cached row paired the prefix's owner's token P).
        The policy chooses the next draft lengths here. A decoding request at length 0 defers its rows (`_defer`):
        they run with its next pass, at the latest in the step that completes its KV block or may finish it, so
        every block the prefix cache names, and every block a finished request leaves, holds complete MTP rows."""
        self._choose(plan, sampled)
        mtp_pieces, h_parts, sampling = [], [], []
        deferring: list[tuple[_RequestSpec, int, int, int, _Deferred | None]] = []
        for c, (r, start, toks) in zip(plan.chunks, step.pieces):
            if r.num_speculative_tokens == 0 or r.status != RequestStatus.RUNNING:
                continue
            n_valid = len(sampled[r.request_id]) if c.draft_token_ids else c.num_tokens
            first = step.ends[r.request_id] - len(toks)
            spec = self._requests[r.request_id]
            restored, spec.restored = spec.restored, None
            deferred, spec.deferred = spec.deferred, None
            if deferred is not None and deferred.first + deferred.num_rows != start:
                deferred = None  # recomputed since (preempted): the rows come again with the recompute
            if deferred is None and restored is not None and restored[0] == start:
                # the row at start - 1 goes first, deferred with the others or not (it was lost when deferred)
                deferred = _Deferred(start - 1, [(restored[1][None].to(step.hidden.dtype), 0, 1)], 1)
            if self._defer(c, r, start, n_valid, sampled):
                deferring.append((spec, start, first, n_valid, deferred))
                continue
            # the next token of each row: later tokens of the request, then what this step sampled
            known = r.token_slice(start + 1, min(start + 1 + n_valid, r.num_tokens))
            nxt = known + sampled.get(r.request_id, [])[:n_valid - len(known)]
            if deferred is not None:
                mtp_pieces.append((r, deferred.first, r.token_slice(deferred.first + 1, start + 1) + nxt))
                h_parts.append(deferred.hidden())
            else:
                mtp_pieces.append((r, start, nxt))
            h_parts.append(step.hidden[first:first + n_valid])
            if c.sample and self._next_lengths.get(r.request_id, 0):
                sampling.append(len(mtp_pieces) - 1)
        if deferring:
            self._keep_deferred(step.hidden, deferring)
        if not mtp_pieces:
            return {}
        h_in = h_parts[0] if len(h_parts) == 1 else torch.cat(h_parts)
        # The MTP layer's output is read at one row per drafting request, its last (draft 1 comes from it); the
        # other rows are there for their K/V, which later rows attend to. Many such rows take the KV-only pass
        # first (a full pass over every row cost ~8 ms at each KV-block boundary of 16 requests at k = 0, 16 rows
        # each); a few ride along in the full pass, which costs less than a second pass
        drafting = set(sampling)
        split = sum(len(toks) for _, _, toks in mtp_pieces) - len(drafting) >= KV_ONLY_MIN_ROWS
        kv_pieces, kv_rows, full_pieces, full_rows, full_index, row = [], [], [], [], {}, 0
        for i, (r, start, toks) in enumerate(mtp_pieces):
            n = len(toks)
            kv_only = n - (i in drafting) if split else 0
            if kv_only:
                kv_pieces.append((r, start, toks[:kv_only]))
                kv_rows += range(row, row + kv_only)
            if kv_only < n:
                full_index[i] = len(full_pieces)
                full_pieces.append((r, start + kv_only, toks[kv_only:]))
                full_rows += range(row + kv_only, row + n)
            row += n

        def rows_of(picked: list[int]) -> torch.Tensor:
            return h_in if len(picked) == row else h_in[torch.tensor(picked, device=h_in.device)]
        model, cache = self.runner.model, self.runner.cache
        self._step_mtp_pass = True
        if kv_pieces:
            batch = self.runner.forward_batch(kv_pieces)
            model.mtp_write_kv(batch.input_ids, rows_of(kv_rows), batch, cache)
        if not full_pieces:
            return {}
        batch = self.runner.forward_batch(full_pieces, token_step_max_len=CATCH_UP_TOKEN_STEPS)
        h = model.mtp_forward(batch.input_ids, rows_of(full_rows), batch, cache)
        if not sampling:  # no request drafts next: the MTP KV is written, nothing more
            return {}
        last = batch.last_token_indices.tolist()
        return {mtp_pieces[i][0].request_id: h[last[full_index[i]]] for i in sampling}

    def record_step(self, plan: SchedulePlan, start: float) -> None:
        """Time a decode step for the policy: the whole step since `start` (scheduling, forward, verify, MTP pass,
        the scheduler's update, the outputs, drafting), less its drafting, which `propose` timed on its own.
        Steps with prefill chunks are not what it chooses between. (Scheduling and the update, untimed before,
        are small: 0.3 ms of a 50 ms k = 2 step at batch 16 on the 2-core box, 0.3 of 17 at k = 0.)"""
        drafting, self._step_drafting_s = self._step_drafting_s, 0.0
        mtp_pass, self._step_mtp_pass = self._step_mtp_pass, False
        if not self.policy.adaptive:
            return  # fixed lengths need no timings: no extra device sync per step
        rows = [c for c in plan.chunks if c.request.num_speculative_tokens]
        if mtp_pass and not any(c.draft_token_ids for c in rows):
            # a step that verified nothing but ran the MTP pass is a transition (drafting resumes next step, so
            # the rows a k = 0 regime defers run now): no timing of k = 0, whose steps defer them. Timed as k = 0,
            # such steps (each refresh of a stale k = 0 is one) rated k = 0 at 10.0 ms against 8.2 for a steady
            # one (batch 16 on the 2-core box), and the policy drafted where drafting lost (0.94x of k = 0)
            return
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)  # the MTP pass may still be running: count it here
        seconds = time.perf_counter() - start
        if rows and not plan.restores and all(c.num_tokens == 1 + len(c.draft_token_ids) for c in plan.chunks):
            self.policy.record_forward(len(rows), max(len(c.draft_token_ids) for c in rows), seconds - drafting)

    @staticmethod
    def _keep_deferred(hidden: torch.Tensor,
                       deferring: list[tuple[_RequestSpec, int, int, int, _Deferred | None]]) -> None:
        """This step's rows of the requests that defer: copied out of `hidden` in one gather (at 16 rows, a clone
        and a cat per request had cost more than the rest of a never-drafting step's bookkeeping), each
        request's range of the copy appended to its deferred rows."""
        index = [i for _, _, first, n, _ in deferring for i in range(first, first + n)]
        if index[-1] - index[0] + 1 == len(index):  # one request's rows, or every row of a decode step: a slice
            rows = hidden[index[0]:index[-1] + 1].clone()
        else:
            rows = hidden[torch.tensor(index, device=hidden.device)]
        offsets = list(accumulate([n for _, _, _, n, _ in deferring], initial=0))
        for (spec, start, _, n, deferred), lo in zip(deferring, offsets):
            if deferred is None:
                spec.deferred = _Deferred(start, [(rows, lo, lo + n)], n)
            else:
                deferred.pieces.append((rows, lo, lo + n))
                deferred.num_rows += n
                spec.deferred = deferred

    def _choose(self, plan: SchedulePlan, sampled: dict[str, list[int]]) -> None:
        """The policy's draft lengths for the next step of every speculating request that sampled now."""
        rows = [c.request for c in plan.chunks if c.sample and c.request.num_speculative_tokens
                and c.request.status == RequestStatus.RUNNING and c.request.request_id in sampled]
        if not rows:  # prefill chunks only: nothing to choose, and no step for the policy to count
            self._next_lengths = {}
            return
        lengths = self.policy.choose([r.request_id for r in rows], [r.num_speculative_tokens for r in rows])
        self._next_lengths = {r.request_id: k for r, k in zip(rows, lengths)}
        for r in rows:
            self._requests[r.request_id].counters.num_draft_steps += 1
        self.counters.num_draft_steps += len(rows)

    def _defer(self, c: ScheduledChunk, r: Request, start: int, n_valid: int, sampled: dict[str, list[int]]) -> bool:
        """Whether this decode chunk's MTP rows can wait: the request drafts nothing next, the rows do not
        complete a KV block (the prefix index names full blocks), and the step cannot finish the request (a
        finished request's blocks and checkpoint are cached as they are)."""
        if self._next_lengths.get(r.request_id, 0) or not c.sample or c.num_tokens != 1 + len(c.draft_token_ids):
            return False
        bs = self.runner.config.block_size
        if (start + n_valid) // bs != start // bs:
            return False
        tokens = sampled[r.request_id]
        eos = () if r.stopping.ignore_eos else r.eos_token_ids
        return (len(r.output_token_ids) + len(tokens) < r.stopping.max_new_tokens
                and r.num_tokens + len(tokens) < self.runner.max_model_len
                and not any(t in r.stopping.stop_ids or t in eos for t in tokens))

    def propose(self, drafting: list[tuple[Request, torch.Tensor]]) -> None:
        """MTP drafting (docs/model.md §7): draft 1 from pass 1's last row; passes 2..k feed each draft back with
        the MTP's own output hidden state, one position further each time. The drafts go to the scheduler.
        How many drafts each request gets is the policy's choice, made in `catch_up` (0: not drafting)."""
        start = time.perf_counter()
        lengths = [self._next_lengths.get(r.request_id, 0) for r, _ in drafting]
        self._draft([d for d, k in zip(drafting, lengths) if k], [k for k in lengths if k])
        # the bucket of the rows the lengths were chosen for (`_choose`), as the step's forward is timed
        seconds = time.perf_counter() - start
        self._step_drafting_s += seconds
        self.policy.record_drafting(len(self._next_lengths), max(lengths, default=0), seconds)

    def drop_drafts(self, requests: list[Request]) -> None:
        """After a failed `propose`: no drafts for these requests' next step (room it reserved stays theirs)."""
        for r in requests:
            self.scheduler.set_drafts(r, [])
            if r.request_id in self._requests:
                self._requests[r.request_id].draft_probs = None

    def _draft(self, drafting: list[tuple[Request, torch.Tensor]], lengths: list[int]) -> None:
        if not drafting:
            return
        requests = [r for r, _ in drafting]
        h = torch.stack([h for _, h in drafting])
        drafts: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        active = list(range(len(requests)))
        for j in range(max(lengths)):
            rows_left = self._draft_one(h, [requests[i] for i in active], [drafts[i] for i in active],
                                        [probs[i] for i in active], [lengths[i] for i in active], j)
            # the next pass writes MTP KV one position further: the scheduler grows the blocks, or it stops there
            nxt = [(row, active[row]) for row in rows_left
                   if self.scheduler.reserve_draft_room(requests[active[row]], len(drafts[active[row]]))]
            if not nxt:
                break
            active = [i for _, i in nxt]
            pieces = [(requests[i], requests[i].num_tokens + len(drafts[i]) - 2, [drafts[i][-1]]) for i in active]
            batch = self.runner.forward_batch(pieces)
            h_in = h[[row for row, _ in nxt]]
            if self.runner.mtp_graphs is not None:
                h = self.runner.mtp_graphs.forward(batch, h_in)
            else:
                h = self.runner.model.mtp_forward(batch.input_ids, h_in, batch, self.runner.cache)
        for r, d, pr in zip(requests, drafts, probs):
            self.scheduler.set_drafts(r, d)
            self._requests[r.request_id].draft_probs = torch.stack(pr) if pr else None

    def _draft_one(self, h: torch.Tensor, requests: list[Request], drafts: list[list[int]],
                   probs: list[list[torch.Tensor]], lengths: list[int], j: int) -> list[int]:
        """Draw draft j of each request from the MTP head's logits (appended to drafts; its q to probs for a
        request verified by the acceptance rule: greedy and coupled verification need the token alone); returns
        the rows whose request wants another draft."""
        if self.draft_head is not None and self.draft_head.takes(h.shape[0]):
            logits = self.draft_head(h)
        else:
            logits = self.runner.model.compute_logits(h)
        tok: list[int] = [0] * len(requests)
        q: dict[int, torch.Tensor] = {}  # row -> its q, rows verified by the acceptance rule only
        for how, rows in by_verification(requests):
            sub = logits if len(rows) == len(requests) else logits[torch.tensor(rows, device=logits.device)]
            batch = self.runner.sampling_batch([requests[i] for i in rows], [drafts[i] for i in rows],
                                               last_only=True)
            if how == GREEDY_MATCH:
                picked = greedy_tokens(sub, batch).tolist()
            elif how == COUPLED_MATCH:  # drawn as the target's token at this position will be: the same noise
                picked = plain_draws(sub, batch)
            else:
                q_rows = processed_probs(sub, batch)
                dev = self.runner.device
                picked = draw(q_rows, torch.tensor([requests[i].seed for i in rows], dtype=torch.int64, device=dev),
                              torch.tensor([len(requests[i].output_token_ids) + j for i in rows], device=dev),
                              STREAM_DRAFT).tolist()
                q.update(zip(rows, q_rows))
            for i, t in zip(rows, picked):
                tok[i] = t
        more = []
        for row, r in enumerate(requests):
            drafts[row].append(tok[row])
            if row in q:
                probs[row].append(q[row])
            if len(drafts[row]) < lengths[row]:
                more.append(row)
        return more
