"""Continuous batching over the hybrid cache: `schedule() -> SchedulePlan`, then `update(plan, sampled)`.

Policy (FCFS, chunked prefill, preemption by recompute):
- Every step first serves the RUNNING requests in arrival order: a decoding request gets 1 token, one in the
  middle of its prefill gets its next chunk. Then WAITING requests are admitted in order while
  `max_num_seqs` and the token budget `max_num_batched_tokens` allow. Prefill chunks and decodes share a step.
- Chunked prefill: a request gets min(tokens it has left, budget left), so a long prompt spans several steps
  (it is RUNNING from its first chunk on). Only the chunk that reaches the end of `all_token_ids` samples.
- Before a chunk is planned, the cache must cover `start + num_tokens` tokens and give the request a slot
  (all-or-nothing). If that fails for a RUNNING request, the most recently arrived running request (maybe the
  request itself) is preempted by recompute: it drops its blocks and slot, num_computed_tokens = 0, and it
  goes to the FRONT of the waiting queue keeping its output tokens, which are recomputed with the prompt.
  Then the request tries again. The earliest running request therefore always progresses (`add` rejects a
  request that could not fit the cache alone), so nothing livelocks.
- A WAITING request that does not fit waits, and later ones wait behind it (strict FCFS; newcomers never
  preempt). No request is admitted in a step that preempted: the cache is under pressure, and a request
  preempted while building the plan must not be in it.
Invariants: running requests arrived before all waiting ones (admission is in order, victims are the latest
running and go to the front), so both queues stay in arrival order. Waiting requests own no blocks or slot.

Priority (a request's `priority`, lower = sooner, as vLLM's; 0 by default): both queues are ordered by
(priority, arrival), so with equal priorities everything above is plain FCFS. Running requests are served, and
waiting ones admitted, in that order; the victim of a preemption is the last running one in it (the lowest
priority, latest arrival). Before anything else in a step, a waiting request of strictly higher priority than
the last running one preempts it when it could not be admitted otherwise (no sequence room, or its first chunk's
blocks or a slot short; a prefix-cache hit that would have fitted is not counted); admission in that step still
stops at a request preempted in it.

Prefix caching (when the cache manager has a prefix cache, see `worker/prefix_cache.py`):
- Admission looks the request's tokens up; a hit shares the cached full blocks, gives the request a fresh block
  for the tail and a slot, and starts it at the hit position. The plan lists the `Restore` copies the engine
  makes before the forward (checkpoint state -> slot, tail block -> the fresh block).
- A prefill chunk never runs past the next position where the request wants a state checkpoint (its
  `checkpoint_positions`: chat-turn boundaries, client offsets, the end of the prompt), so the state at that
  exact token exists after some step.
- `update()` names every newly completed full block in the index and, when a chunk ended at a checkpoint
  position (or the request finished normally), takes a checkpoint: the plan lists the `CheckpointCopy` the engine
  makes right after update, before anything else touches the device (finished requests are released inside
  update, and their blocks and slot keep their contents until the next device write).
Only positions whose next token is known are indexed (min(computed, tokens - 1)): the MTP KV row of a position
pairs it with the next token, and a speculative stop can leave computed drafts that are not tokens.

Plain Python, no torch: the engine turns a plan into device tensors.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from functools import cached_property
from enum import Enum
from typing import TYPE_CHECKING

from qnext.worker.cache import CheckpointCopy, HybridCacheManager, Restore
from qnext.worker.types import FinishReason, LogprobEntries, SamplingParams, StoppingParams, require

if TYPE_CHECKING:
    from qnext.worker.grammar import GrammarState
    from qnext.worker.token_history import TokenHistory


class RequestStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    stopping: StoppingParams
    eos_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0  # effective sampling seed; opaque here
    num_speculative_tokens: int = 0  # MTP draft length this request asked for (0 = no speculation)
    use_prefix_cache: bool = True  # False: neither reads nor fills the prefix cache
    checkpoint_positions: tuple[int, ...] = ()  # prompt positions to take a state checkpoint at (sorted)
    grammar: GrammarState | None = None  # constrained decoding: what the output may be (worker/grammar.py)
    priority: int = 0  # lower = sooner (scheduled, admitted, and preempted last)
    prompt_logprobs: int | None = None  # alternatives per prompt token (GenerationRequest.prompt_logprobs)
    # parallel samples (GenerationRequest.n): sample `index` of request `sample_of` (None: the request itself)
    index: int = 0
    sample_of: str | None = None
    # State owned by the scheduler.
    arrival: int = field(default=0, init=False)  # the scheduler's arrival counter: FCFS within a priority
    output_token_ids: list[int] = field(default_factory=list, init=False)
    num_computed_tokens: int = field(default=0, init=False)  # tokens of all_token_ids whose KV/state exist
    block_ids: list[int] = field(default_factory=list, init=False)  # the block table
    state_slot: int | None = field(default=None, init=False)
    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    finish_reason: FinishReason | None = field(default=None, init=False)
    num_preemptions: int = field(default=0, init=False)
    # MTP drafts for the tokens after all_token_ids, proposed by the engine after the last step; the next
    # decode chunk verifies them. Never part of all_token_ids until accepted.
    draft_token_ids: list[int] = field(default_factory=list, init=False)
    num_cached_tokens: int = field(default=0, init=False)  # prompt tokens served by the prefix cache
    prefix_nodes: list[int] = field(default_factory=list, init=False)  # index node of each full block so far
    # in a step that failed with others (`quarantine`): runs alone until one step of its succeeds
    suspect: bool = field(default=False, init=False)
    # Prompt log-probs computed so far (the engine's: entry i is prompt token i + 1), until handed out with the
    # first output; a recomputation after preemption does not repeat them.
    prompt_logprob_values: LogprobEntries | None = field(default=None, init=False)
    prompt_logprobs_sent: bool = field(default=False, init=False)
    # the penalties' view of prompt + outputs (worker/token_history.py), made at the first step that needs it
    token_history: TokenHistory | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def prefix_root(self) -> int:
        """Requests that run the MTP head write its KV for every position; the others do not (ROOTS)."""
        return 1 if self.num_speculative_tokens else 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def suppressed_token_ids(self, ahead: int = 0) -> list[int]:
        """Token ids the sampler must not produce for the next token (the min_new_tokens rule); `ahead`: for
        the token that many positions later (speculative verify of drafts)."""
        if len(self.output_token_ids) + ahead >= self.stopping.min_new_tokens:
            return []
        return self._suppressible_ids

    @cached_property
    def _suppressible_ids(self) -> list[int]:
        """EOS (unless ignored) and stop ids, sorted: what min_new_tokens suppresses; fixed for the request."""
        eos = () if self.stopping.ignore_eos else self.eos_token_ids
        return sorted(set(eos) | self.stopping.stop_ids)

    def forced_token_id(self, drafts: list[int]) -> int | None:
        """The token the sampler must produce after output + drafts, if any: `</think>` once the reasoning budget
        (stopping.max_reasoning_tokens) is spent and the output has not closed the think block itself. Only the
        token at exactly that index can be forced, so the scan runs once per request (per verify row)."""
        budget, end = self.stopping.max_reasoning_tokens, self.stopping.reasoning_end_id
        if budget is None or len(self.output_token_ids) + len(drafts) != budget:
            return None
        return None if end in self.output_token_ids or end in drafts else end

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building all_token_ids (a step must not cost O(context))."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # request.num_computed_tokens when scheduled: position of the chunk's first token
    num_tokens: int  # computes request.all_token_ids[start:start + num_tokens]
    sample: bool  # the chunk reaches the end of all_token_ids, so a new token is sampled after it
    # Speculative verify: the chunk is [last token, *draft_token_ids] (num_tokens = 1 + len(drafts)).
    draft_token_ids: list[int] = field(default_factory=list)


@dataclass
class SchedulePlan:
    chunks: list[ScheduledChunk]  # running requests first, then newly admitted ones; each request at most once
    preempted: list[str]  # request ids preempted while building this plan (none of them is in chunks)
    admitted: list[str] = field(default_factory=list)  # waiting requests that start (or restart) in this plan
    restores: list[Restore] = field(default_factory=list)  # prefix-cache hits admitted in this plan
    checkpoints: list[CheckpointCopy] = field(default_factory=list)  # filled by update()

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 262144

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            require(value >= 1, name, f"must be >= 1, got {value}")


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: HybridCacheManager) -> None:
        self.config = config
        self.cache = cache
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._waiting: list[Request] = []  # by (priority, arrival)
        self._running: list[Request] = []  # by (priority, arrival)
        self._arrivals = itertools.count()
        self.num_prompt_tokens_computed = 0  # prefill work done: prompt tokens the applied chunks computed

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def add(self, request: Request) -> None:
        """Queue a new request; ValueError (naming the field) if it could never run to completion."""
        max_len, max_new = self.config.max_model_len, request.stopping.max_new_tokens
        num_prompt = len(request.prompt_token_ids)
        require(request.request_id not in self._requests, "request_id", f"{request.request_id!r} already exists")
        require(num_prompt >= 1, "prompt_token_ids", "must not be empty")
        require(num_prompt + max_new <= max_len, "max_new_tokens",
                 f"prompt ({num_prompt} tokens) + max_new_tokens ({max_new}) exceeds max_model_len ({max_len})")
        # The last sampled token is never computed, so a request's KV peaks at prompt + max_new - 1 tokens.
        need = self.cache.blocks_for(num_prompt + max_new - 1)
        require(need <= self.cache.kv_blocks_total, "max_new_tokens",
                 f"prompt ({num_prompt} tokens) + max_new_tokens ({max_new}) needs {need} KV blocks, "
                 f"but the cache has only {self.cache.kv_blocks_total}")
        assert request.status == RequestStatus.WAITING and request.num_computed_tokens == 0, "request reused"
        self._requests[request.request_id] = request
        request.arrival = next(self._arrivals)
        bisect.insort(self._waiting, request, key=_order)

    def fork(self, parent: Request, samples: list[Request], plan: SchedulePlan) -> list[Request]:
        """Parallel samples of `parent`, whose chunk in `plan` (executed, not yet applied) completes its prompt:
        each sample starts from the computed prompt, running, with a chunk appended to `plan` that computes
        nothing and samples its first token (the engine draws it from the parent's logits row). The prompt's
        full KV blocks are shared (one more reference each), its last partial block and the DeltaNet state slot
        are the sample's own: the engine copies them (`Engine._fork`) before anything writes there. A sample
        the cache or max_num_seqs has no room for now is queued instead, to compute the prompt itself (the
        same tokens, at the cost of that prefill). Returns the forked ones."""
        num_prompt = len(parent.prompt_token_ids)
        full = num_prompt // self.cache.block_size
        num_tail = self.cache.blocks_for(num_prompt) - full  # 1 when the prompt ends inside a block
        forked = []
        for sample in samples:
            if (len(self._running) >= self.config.max_num_seqs or self.cache.slots.num_free == 0
                    or self.cache.num_available_blocks < num_tail):
                self.add(sample)
                continue
            self.cache.share_blocks(parent.block_ids[:full])
            tail = self.cache.allocate_blocks(num_tail)
            sample.block_ids, sample.state_slot = parent.block_ids[:full] + tail, self.cache.slots.allocate()
            sample.num_computed_tokens, sample.status = num_prompt, RequestStatus.RUNNING
            sample.num_cached_tokens = parent.num_cached_tokens
            sample.arrival = parent.arrival  # ordered (and preempted) with its parent
            self._requests[sample.request_id] = sample
            bisect.insort(self._running, sample, key=_order)
            plan.chunks.append(ScheduledChunk(sample, num_prompt, 0, sample=True))
            forked.append(sample)
        return forked

    def abort(self, request_id: str) -> bool:
        """Finish a request now, wherever it is, and free its blocks and slot. False for an unknown id."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        if request.status == RequestStatus.WAITING:
            self._waiting.remove(request)
        self._finish(request, FinishReason.ABORTED)
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (running requests keep their blocks as private ones)."""
        self.cache.reset_prefix_cache(self._running)

    def set_drafts(self, request: Request, drafts: list[int]) -> None:
        """The MTP drafts for the tokens after the request's last one: its next decode chunk verifies them."""
        request.draft_token_ids = list(drafts)

    def reserve_draft_room(self, request: Request, num_drafts: int) -> bool:
        """Grow the request's blocks so that drafting can write the MTP head's KV `num_drafts` positions past its
        tokens; False (nothing taken) when the cache has no room: drafting stops there."""
        grown = self.cache.ensure(request.block_ids, request.state_slot, request.num_tokens + num_drafts)
        if grown is None:
            return False
        request.block_ids, request.state_slot = grown
        return True

    def schedule(self) -> SchedulePlan:
        plan = SchedulePlan(chunks=[], preempted=[])
        if self._schedule_suspect(plan):
            return plan
        self._preempt_for_priority(plan)
        for_priority = len(plan.preempted)
        budget = self._schedule_running(plan, self.config.max_num_batched_tokens)
        if len(plan.preempted) == for_priority:  # no cache pressure among the running ones
            self._schedule_waiting(plan, budget)
        return plan

    def update(self, plan: SchedulePlan, sampled: dict[str, int | list[int]]) -> list[StepOutput]:
        """Apply one executed plan; sampled maps request id -> its new token(s) for every chunk with sample.

        A verify chunk yields 1 + (accepted drafts) tokens; the verified positions before the last new token
        are now computed (KV beyond them is stale and simply overwritten later: rollback by length)."""
        outputs = []
        for chunk in plan.chunks:
            request = chunk.request
            if request.status != RequestStatus.RUNNING:
                continue  # aborted between schedule() and update()
            assert request.num_computed_tokens == chunk.start, "plans must be applied once and in order"
            request.draft_token_ids = []
            request.suspect = False  # a step of its own worked
            self.num_prompt_tokens_computed += max(0, min(chunk.start + chunk.num_tokens,
                                                          len(request.prompt_token_ids)) - chunk.start)
            if not chunk.sample:
                request.num_computed_tokens += chunk.num_tokens
                self._index(request, plan, finished=False)
                continue
            assert request.request_id in sampled, f"no sampled token for {request.request_id!r}"
            tokens = sampled[request.request_id]
            tokens = [tokens] if isinstance(tokens, int) else list(tokens)
            assert 1 <= len(tokens) <= 1 + len(chunk.draft_token_ids)
            request.num_computed_tokens += len(tokens) if chunk.draft_token_ids else chunk.num_tokens
            emitted, reason = [], None
            for token in tokens:
                request.output_token_ids.append(token)
                emitted.append(token)
                reason = self._stop_reason(request, token)
                if reason is not None:
                    break
            self._index(request, plan, finished=reason is not None)
            if reason is not None:
                self._finish(request, reason)
            outputs.append(StepOutput(request.request_id, emitted, reason is not None, reason))
        if plan.checkpoints:  # a checkpoint taken and evicted again within this update must not be copied
            plan.checkpoints = self.cache.live(plan.checkpoints)
        return outputs

    def _schedule_running(self, plan: SchedulePlan, budget: int) -> int:
        """Give each running request its next chunk, preempting the latest arrivals when the cache is short."""
        i = 0
        while i < len(self._running) and budget > 0:
            request = self._running[i]
            chunk = self._try_chunk(request, budget)
            while chunk is None:
                victim = self._running[-1]  # not yet in the plan: the loop reaches it after request
                self._preempt(victim)
                plan.preempted.append(victim.request_id)
                if victim is request:
                    return budget  # it was the last running request
                chunk = self._try_chunk(request, budget)
            plan.chunks.append(chunk)
            budget -= chunk.num_tokens
            i += 1
        return budget

    def quarantine(self, requests: list[Request]) -> None:
        """A step holding these (running) requests raised, and which of them caused it is unknown: each is
        preempted by recompute (nothing of the failed step was applied) and later runs alone in its step until
        one step of its succeeds, so a failure that comes back names its request (worker/step_failure.py)."""
        for request in requests:
            self._preempt(request)
            request.suspect = True

    def _schedule_suspect(self, plan: SchedulePlan) -> bool:
        """A quarantined request's next chunk, alone in the plan; False when there is none (or it does not fit
        now: it then runs with the others, as any request)."""
        request = next((r for r in self._running if r.suspect), None)
        if request is not None:
            chunk = self._try_chunk(request, self.config.max_num_batched_tokens)
            if chunk is not None:
                plan.chunks.append(chunk)
            return chunk is not None
        waiting = next((r for r in self._waiting if r.suspect), None)  # not always first: priorities
        if waiting is not None:
            self._schedule_waiting(plan, self.config.max_num_batched_tokens, limit=1, first=waiting)
        return bool(plan.chunks)

    def _preempt_for_priority(self, plan: SchedulePlan) -> None:
        """Preempt the last running request (in (priority, arrival) order) while the first waiting one has a
        strictly higher priority and could not be admitted otherwise."""
        while self._waiting and self._running:
            head, tail = self._waiting[0], self._running[-1]
            if head.priority >= tail.priority or self._could_admit(head):
                return
            self._preempt(tail)
            plan.preempted.append(tail.request_id)

    def _could_admit(self, request: Request) -> bool:
        """Room for one more sequence, a slot, and the blocks of the request's first chunk (without a prefix hit)."""
        first = min(request.num_tokens, self.config.max_num_batched_tokens)
        return (len(self._running) < self.config.max_num_seqs and self.cache.slots.num_free > 0
                and self.cache.blocks_for(first) <= self.cache.num_available_blocks)

    def _schedule_waiting(self, plan: SchedulePlan, budget: int, limit: int | None = None,
                          first: Request | None = None) -> None:
        """Admit waiting requests in order until one does not fit (it and everyone behind it wait), at most
        `limit` of them; a request preempted in this plan (for a higher priority) stops admission too. `first`:
        a waiting request to try before the queue's head (a quarantined one, with limit 1)."""
        admitted = 0
        while (self._waiting and len(self._running) < self.config.max_num_seqs and budget > 0
               and (limit is None or admitted < limit)):
            request = first if first is not None and admitted == 0 else self._waiting[0]
            if request.request_id in plan.preempted:
                return
            hit, restore = self.cache.restore_prefix(request)
            chunk = self._try_chunk(request, budget)
            if chunk is None:
                if restore is not None:  # undo the hit: the request waits with nothing, as before
                    self._release(request)
                    request.num_computed_tokens = 0
                return
            self.cache.record_admission(request, hit, restore is not None)
            if restore is not None:
                plan.restores.append(restore)
            self._waiting.remove(request)
            request.status = RequestStatus.RUNNING
            bisect.insort(self._running, request, key=_order)
            plan.chunks.append(chunk)
            plan.admitted.append(request.request_id)
            budget -= chunk.num_tokens
            admitted += 1

    def _index(self, request: Request, plan: SchedulePlan, finished: bool) -> None:
        copy = self.cache.index(request, finished)
        if copy is not None:
            plan.checkpoints.append(copy)

    def _try_chunk(self, request: Request, budget: int) -> ScheduledChunk | None:
        """The request's next chunk (at most budget tokens) with the cache grown to hold it, or None."""
        start = request.num_computed_tokens
        num_tokens = min(request.num_tokens - start, budget)
        if self.cache.prefix is not None and request.use_prefix_cache:
            # stop at the next checkpoint position so the state after exactly that token exists (the end of the
            # prompt too: a preempted request recomputing past it takes that checkpoint again)
            ends = (*request.checkpoint_positions, len(request.prompt_token_ids))
            num_tokens = min([num_tokens] + [p - start for p in ends if p > start])
        assert num_tokens >= 1, f"{request.request_id!r} has nothing to compute"
        drafts = self._drafts_to_verify(request, budget) if start + 1 == request.num_tokens else []
        if drafts:
            grown = self.cache.ensure(request.block_ids, request.state_slot, start + 1 + len(drafts))
            if grown is not None:
                request.block_ids, request.state_slot = grown
                return ScheduledChunk(request, start, 1 + len(drafts), sample=True, draft_token_ids=drafts)
        grown = self.cache.ensure(request.block_ids, request.state_slot, start + num_tokens)
        if grown is None:
            return None
        request.block_ids, request.state_slot = grown
        return ScheduledChunk(request, start, num_tokens, sample=start + num_tokens == request.num_tokens)

    def _drafts_to_verify(self, request: Request, budget: int) -> list[int]:
        """The drafts worth verifying: no more than the budget, the tokens still allowed, or the context."""
        room = min(budget - 1, request.stopping.max_new_tokens - len(request.output_token_ids) - 1,
                   self.config.max_model_len - request.num_tokens - 1)
        return request.draft_token_ids[:max(room, 0)]

    def _preempt(self, request: Request) -> None:
        """Recompute later: drop its cache, keep its outputs, and queue it ahead of every waiting request."""
        self._running.remove(request)
        self._release(request)
        request.num_computed_tokens = 0
        request.draft_token_ids = []
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        bisect.insort(self._waiting, request, key=_order)  # ahead of every later arrival of its priority

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        stopping, num_outputs = request.stopping, len(request.output_token_ids)
        # Same rule as suppressed_token_ids: the first min_new_tokens tokens can neither be nor stop on eos/stop ids.
        if num_outputs > stopping.min_new_tokens:
            if token in stopping.stop_ids:
                return FinishReason.STOP_TOKEN
            if token in request.eos_token_ids and not stopping.ignore_eos:
                return FinishReason.EOS
        if num_outputs == stopping.max_new_tokens or request.num_tokens == self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request.status == RequestStatus.RUNNING:
            self._running.remove(request)
        self._release(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self._requests[request.request_id]

    def _release(self, request: Request) -> None:
        self.cache.release(request.block_ids, request.state_slot)
        request.block_ids, request.state_slot, request.prefix_nodes = [], None, []


def _order(request: Request) -> tuple[int, int]:
    """Both queues' order: priority (lower first), then arrival."""
    return request.priority, request.arrival
