"""The engine: token ids in, token ids out. `add_request / step / abort`, plus offline `generate()`.

A step is schedule -> run -> update:
- `Scheduler.schedule()` (worker/scheduler.py, plain Python) picks this step's chunks: prefill chunks and
  decodes, MTP verify chunks, prefix-cache restores;
- `ModelRunner.forward()` (worker/model_runner.py) turns them into one packed forward and the logits of the rows
  that sample, and samples the plain ones; `SpecDecoder.verify()` (worker/spec_decode.py) accepts or rejects
  the drafts of the verify chunks, and its `catch_up()` runs the MTP head over the step's rows;
- `Scheduler.update()` appends the tokens, stops and frees finished requests and takes prefix-cache checkpoints
  (which the runner then copies), and the `SpecDecoder` drafts the next tokens of the requests still running.
If run or update raises, the step's requests end with FinishReason.ERROR and the others carry on
(worker/step_failure.py).
"""

from __future__ import annotations

import random
import time

import torch

from qnext.worker.cache import HybridCacheManager
from qnext.worker.grammar import GrammarCompiler, GrammarState
from qnext.worker.model import Qwen3NextForCausalLM
from qnext.worker.model_runner import ModelRunner, StepForward
from qnext.worker.scheduler import Request, RequestStatus, SchedulePlan, Scheduler, SchedulerConfig, StepOutput
from qnext.worker.spec_decode import SpecCounters, SpecDecoder
from qnext.worker.step_failure import StepFailures
from qnext.worker.summary import engine_stats, model_summary
from qnext.worker.types import (MAX_SAMPLES, MAX_TOP_LOGPROBS, SAMPLE_SEP, CacheInfo, Completion, EngineConfig,
                                EngineStats, FinishReason, GenerationRequest, ModelSummary, LogprobEntries, RequestOutput,
                                SamplingParams, StepError, StoppingParams, require, require_number)


class Engine:
    def __init__(self, config: EngineConfig, model: Qwen3NextForCausalLM | None = None) -> None:
        """`model`: an already built model (see ModelRunner); None loads `config.model`."""
        self.config = config
        self.runner = ModelRunner(config, model)
        info = self.runner.cache_info
        self.cache_manager = HybridCacheManager(info.num_blocks, info.block_size, info.num_slots, info.num_checkpoints)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=config.max_num_seqs,
                                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                                   max_model_len=self.runner.max_model_len), self.cache_manager)
        self.spec = SpecDecoder(self.runner, self.scheduler)
        self._seed_rng = random.Random(config.seed)
        self._aborted: list[tuple[Request, SpecCounters | None]] = []  # final outputs due, with their MTP counters
        self.admitted: list[str] = []  # requests the last step started (or restarted after a preemption)
        self.failures = StepFailures(attributable=config.tensor_parallel_size == 1)
        self._grammars: GrammarCompiler | None = None  # built by the first constrained request
        # parallel samples (GenerationRequest.n): samples 1..n-1 until their parent's prompt is computed, and the
        # number of each request's samples not finished yet
        self._unforked: dict[str, list[Request]] = {}
        self._open_samples: dict[str, int] = {}
        self._orphans: list[tuple[Request, FinishReason | None, StepError | None]] = []  # final outputs due

    @property
    def cache_info(self) -> CacheInfo:
        return self.runner.cache_info

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    def describe(self) -> ModelSummary:
        """What is served, for the start-up line and the server's GetModelInfo."""
        return model_summary(self)

    def stats(self) -> EngineStats:
        """Load, pool usage and counters now (sent with every step's outputs)."""
        return engine_stats(self)

    def add_request(self, req: GenerationRequest) -> None:
        """Queue a request. ValueError (naming the field) if it can never run."""
        require(SAMPLE_SEP not in req.request_id, "request_id", "must not contain the character U+001F")
        require(req.request_id not in self._open_samples, "request_id", f"{req.request_id!r} already exists")
        require_number("n", req.n, True, lambda x: 1 <= x <= MAX_SAMPLES, f"in [1, {MAX_SAMPLES}]")
        require(bool(req.prompt_token_ids), "prompt_token_ids", "must not be empty")
        bad = [t for t in req.prompt_token_ids if not 0 <= t < self.vocab_size]
        require(not bad, "prompt_token_ids", f"ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        max_k = self.runner.max_spec_tokens
        k = max_k if req.num_speculative_tokens is None else req.num_speculative_tokens
        require(0 <= k <= max_k, "num_speculative_tokens",
                f"must be in [0, {max_k}] (the server's maximum), got {k}")
        require_number("priority", req.priority, True, lambda x: -(2**31) <= x < 2**31, "a 32-bit int")
        bad = [t for t, _ in req.sampling.logit_bias if t >= self.vocab_size]
        require(not bad, "logit_bias", f"ids must be < vocab_size {self.vocab_size}, got {bad[:5]}")
        require(req.prompt_logprobs is None or 0 <= req.prompt_logprobs <= MAX_TOP_LOGPROBS, "prompt_logprobs",
                f"must be in [0, {MAX_TOP_LOGPROBS}], got {req.prompt_logprobs}")
        bad = [p for p in req.cache_checkpoints if not 1 <= p <= len(req.prompt_token_ids)]
        require(not bad, "cache_checkpoints",
                f"positions must be in [1, {len(req.prompt_token_ids)}] (the prompt length), got {bad[:5]}")
        seed = req.sampling.seed if req.sampling.seed is not None else self._seed_rng.getrandbits(63)
        prompt = list(req.prompt_token_ids)

        def sample(i: int) -> Request:
            return Request(request_id=req.request_id + (f"{SAMPLE_SEP}{i}" if i else ""), prompt_token_ids=prompt,
                           stopping=req.stopping, eos_token_ids=self.runner.eos_token_ids, sampling=req.sampling,
                           seed=(seed + i) % 2**64, num_speculative_tokens=k,
                           # prompt log-probs need every position's logits: none may come from the cache (and a
                           # forked sample's prompt is its parent's)
                           use_prefix_cache=req.use_prefix_cache and req.prompt_logprobs is None and not i,
                           checkpoint_positions=tuple(sorted(set(req.cache_checkpoints))) if not i else (),
                           grammar=self._grammar(req), priority=req.priority,
                           prompt_logprobs=req.prompt_logprobs if not i else None, index=i,
                           sample_of=req.request_id if i else None)
        samples = [sample(i) for i in range(req.n)]
        self.scheduler.add(samples[0])
        self._open_samples[req.request_id] = req.n
        if req.n > 1:
            self._unforked[req.request_id] = samples[1:]
        if k:  # every sample speculates (a forked one from its first decode step: SpecDecoder.on_fork)
            for s in samples:
                self.spec.add(s.request_id)

    def _grammar(self, req: GenerationRequest) -> GrammarState | None:
        """The request's grammar matcher (worker/grammar.py), None when unconstrained."""
        if req.grammar is None:
            return None
        require(not req.stopping.ignore_eos and req.stopping.min_new_tokens == 0, "grammar",
                "cannot be combined with ignore_eos or min_new_tokens: a complete output ends with EOS")
        if self._grammars is None:
            tokenizer = self.runner.model_dir / "tokenizer.json" if self.runner.model_dir is not None else None
            require(tokenizer is not None and tokenizer.is_file(), "grammar",
                    "the checkpoint has no tokenizer.json to build token masks from")
            self._grammars = GrammarCompiler(tokenizer, self.vocab_size, self.runner.eos_token_ids)
        return self._grammars.start(req.grammar, req.grammar_starts_after)

    def abort(self, request_id: str, index: int | None = None) -> bool:
        """Stop a request now, every sample of it (or just sample `index`); its blocks and slots are free at
        once. The final outputs come with the next step."""
        ids = [request_id] + [f"{request_id}{SAMPLE_SEP}{i}" for i in range(1, MAX_SAMPLES)]
        if index is not None:
            ids = ids[index:index + 1]
        ended = [r for r in map(self.scheduler.get, ids) if r is not None]
        for r in ended:
            self.scheduler.abort(r.request_id)
        unforked = self._unforked.pop(request_id, [])  # never started: they end here too
        ended += [r for r in unforked if r.request_id in ids]
        if any(r.request_id not in ids for r in unforked):
            self._unforked[request_id] = [r for r in unforked if r.request_id not in ids]
        self._aborted += [(r, self.spec.finish(r.request_id)) for r in ended]
        return bool(ended)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (running requests keep their blocks as private ones)."""
        self.scheduler.reset_prefix_cache()

    def close(self) -> None:
        self.runner.close()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted) or bool(self._orphans)

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        with torch.inference_mode():  # the tensors a step makes (CUDA-graph tables refilled later) are inference
            outputs = [self._output(r, StepOutput(r.request_id, [], True, FinishReason.ABORTED), counters=c)
                       for r, c in self._aborted]
            outputs += [self._output(r, StepOutput(r.request_id, [], True, reason), error=error)
                        for r, reason, error in self._orphans]
            self._aborted.clear()
            self._orphans.clear()
            plan = self.scheduler.schedule()
            self.admitted = plan.admitted
            if plan.chunks:
                outputs += self._run_and_update(plan, start)
        self.runner.timings.total_s += time.perf_counter() - start
        return outputs

    def _run_and_update(self, plan: SchedulePlan, start: float) -> list[RequestOutput]:
        """run -> update; a failure is the step's requests' alone (worker/step_failure.py), or re-raised. A step
        that succeeds is timed for the draft-length policy, from `start` (before scheduling) on."""
        try:
            run = self._run(plan)
        except Exception as e:  # noqa: BLE001 - quarantined / failed there, or re-raised
            return self._fail(plan, e, applied=False)
        try:
            outputs = self._update(plan, run)
        except Exception as e:  # noqa: BLE001
            return self._fail(plan, e, applied=True)
        self.failures.succeeded()
        if self.runner.max_spec_tokens:
            self.spec.record_step(plan, start)
        return outputs

    def _run(self, plan: SchedulePlan) -> tuple[StepForward, dict[str, list[int]], dict, dict[str, torch.Tensor]]:
        """The forward, the sampled tokens (verified ones for verify chunks) and the MTP head's pass over the
        step's rows."""
        self.spec.on_restores(plan)
        step = self.runner.forward(plan)
        sampled: dict[str, list[int]] = {}
        logprobs: dict[str, tuple[list[float], list[list[tuple[int, float]]]]] = {}
        # parallel samples whose parent's prompt this step completes draw their first token from its logits row
        forks = [(i, self._unforked[c.request.request_id]) for i, c in enumerate(step.plain)
                 if c.request.request_id in self._unforked]
        # a greedy row may get its token without the full logits (worker/greedy_screen.py)
        screened = None if forks else self.runner.screened_tokens(step)
        if screened is not None:
            for c, token in zip(step.plain, screened):
                sampled[c.request.request_id], logprobs[c.request.request_id] = [token], ([], [])
        elif step.plain:
            requests, logits = [c.request for c in step.plain], step.logits[:len(step.plain)]
            if forks:
                requests += [s for _, samples in forks for s in samples]
                logits = torch.cat([logits, logits[[i for i, samples in forks for _ in samples]]])
            self.runner.sample(requests, logits, sampled, logprobs)
        if step.verify:
            self.spec.verify(step.verify, step.logits[len(step.plain):], sampled, logprobs)
        self.runner.prompt_logprobs(plan, step)
        # MTP over this step's rows before update: a request finishing now still gets its MTP KV written, so
        # the blocks and checkpoint update() caches hold complete MTP rows
        mtp_last = {}
        if self.runner.max_spec_tokens:
            mtp_last = self.spec.catch_up(plan, step, sampled)
        # each parent with its prompt's last hidden state: its samples' MTP row there pairs it with their own token
        return step, sampled, logprobs, mtp_last, [
            (step.plain[i].request, samples, step.hidden[step.ends[step.plain[i].request.request_id] - 1])
            for i, samples in forks]

    def _update(self, plan: SchedulePlan, run: tuple) -> list[RequestOutput]:
        step, sampled, logprobs, mtp_last, forks = run
        for parent, samples, hidden in forks:  # before the update: a parent finishing now frees its blocks and slot
            self._fork(parent, samples, plan, sampled, hidden)
        by_id = {c.request.request_id: c.request for c in plan.chunks}
        step_outputs = self.scheduler.update(plan, sampled)
        errors: dict[str, StepError] = {}
        for i, so in enumerate(step_outputs):  # constrained requests: their grammar moves past the tokens appended
            grammar = by_id[so.request_id].grammar
            if grammar is not None and so.new_token_ids and not so.finished:
                try:
                    grammar.accept(so.new_token_ids)
                except Exception as e:  # noqa: BLE001 - that request's grammar alone: it ends, the others go on
                    step_outputs[i] = self._end_with_error(so, e, errors)
        outputs = [self._output(by_id[so.request_id], so, *logprobs.get(so.request_id, ([], [])),
                                error=errors.get(so.request_id)) for so in step_outputs]
        if plan.checkpoints:  # first device work after update: finished requests' blocks are free from here on
            self.runner.save_checkpoints(plan, step)
        drafting = [(by_id[rid], h) for rid, h in mtp_last.items() if by_id[rid].status == RequestStatus.RUNNING]
        if drafting:
            try:
                self.spec.propose(drafting)
            except Exception as e:  # noqa: BLE001 - drafts are only proposals: without them the requests decode
                self.spec.drop_drafts([r for r, _ in drafting])
                self.failures.drafting_failed([r.request_id for r, _ in drafting], e)
        return outputs

    def _end_with_error(self, so: StepOutput, e: Exception, errors: dict[str, StepError]) -> StepOutput:
        """End one request of an applied step after its own failure (its grammar refused its tokens): its blocks
        and slot are freed now, its output carries this step's tokens and the error."""
        self.scheduler.abort(so.request_id)
        errors[so.request_id] = self.failures.ended_alone(so.request_id, e)
        return StepOutput(so.request_id, so.new_token_ids, True, FinishReason.ERROR)

    def _fork(self, parent: Request, samples: list[Request], plan: SchedulePlan, sampled: dict,
              hidden: torch.Tensor) -> None:
        """Start a request's parallel samples from its computed prompt (Scheduler.fork): each gets a copy of the
        parent's DeltaNet state and of the block its prompt ends in (the full ones are shared). A sample that
        had to queue instead computes the prompt itself: the first token drawn for it here is dropped.
        `hidden`: the target's hidden state at the prompt's last position, which a speculating sample's MTP row
        there pairs with its own first token (SpecDecoder.on_fork)."""
        del self._unforked[parent.request_id]
        forked = self.scheduler.fork(parent, samples, plan)
        started = {s.request_id for s in forked}
        for s in samples:
            if s.request_id not in started:
                sampled.pop(s.request_id)
        full = len(parent.prompt_token_ids) // self.cache_manager.block_size
        tails = [s for s in forked if len(s.block_ids) > full]
        self.runner.cache.copy_slots([parent.state_slot] * len(forked), [s.state_slot for s in forked])
        if tails:  # none when the prompt fills its last block: the parent has no block past it yet
            self.runner.cache.copy_blocks([parent.block_ids[full]] * len(tails), [s.block_ids[full] for s in tails])
        # that MTP row lies in the copied block unless the prompt fills its last block: then it is in a shared one,
        # which keeps the parent's row (the sample's first drafts see the parent's first token there; drafts
        # only, the tokens are verified as always)
        speculating = [s.request_id for s in tails if s.num_speculative_tokens]
        if speculating:
            self.spec.on_fork(speculating, len(parent.prompt_token_ids), hidden)

    def _fail(self, plan: SchedulePlan, e: Exception, applied: bool) -> list[RequestOutput]:
        ended = self.failures.fail(plan, self.scheduler, e, applied)
        error = self.failures.failed[-1].error
        return [self._output(r, StepOutput(r.request_id, [], True, FinishReason.ERROR), counters=None, error=error)
                for r in ended]

    def _output(self, r: Request, so: StepOutput, logprobs: list[float] | None = None,
                tops: list[list[tuple[int, float]]] | None = None, counters: SpecCounters | None = None,
                error: StepError | None = None) -> RequestOutput:
        n = len(so.new_token_ids)  # a stop inside accepted drafts truncates them
        spec = counters or (self.spec.finish(r.request_id) if so.finished else self.spec.counters_of(r.request_id))
        group = r.sample_of or r.request_id
        if so.finished:
            self._open_samples[group] -= 1
            if not self._open_samples[group]:
                del self._open_samples[group]
            # a parent that ended before its prompt was computed (an error; aborts take every sample) takes its
            # samples with it: their final outputs come with the next step
            self._orphans += [(o, so.finish_reason, error) for o in self._unforked.pop(group, [])]
        return RequestOutput(
            request_id=group, index=r.index, new_token_ids=list(so.new_token_ids), logprobs=(logprobs or [])[:n],
            top_logprobs=(tops or [])[:n], finished=so.finished, finish_reason=so.finish_reason,
            num_prompt_tokens=len(r.prompt_token_ids), num_output_tokens=len(r.output_token_ids),
            num_preemptions=r.num_preemptions, num_drafted_tokens=spec.num_drafted if spec else 0,
            num_accepted_tokens=spec.num_accepted if spec else 0,
            num_draft_steps=spec.num_draft_steps if spec else 0, num_cached_tokens=r.num_cached_tokens, error=error,
            prompt_logprobs=self._take_prompt_logprobs(r) if so.new_token_ids or so.finished else None)

    @staticmethod
    def _take_prompt_logprobs(r: Request) -> LogprobEntries | None:
        """A request's prompt log-probs, once: with its first output (then dropped here)."""
        if r.prompt_logprobs is None or r.prompt_logprobs_sent:
            return None
        r.prompt_logprobs_sent = True
        values, r.prompt_logprob_values = r.prompt_logprob_values, None
        return values if values is not None else LogprobEntries(r.prompt_logprobs)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams] | None = None,
                 stopping: StoppingParams | list[StoppingParams] | None = None) -> list[Completion]:
        """Offline: run every prompt to completion; results in prompt order."""
        n = len(prompts)
        samplings = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * n
        stoppings = stopping if isinstance(stopping, list) else [stopping or StoppingParams()] * n
        ids = [f"generate-{id(prompts)}-{i}" for i in range(n)]
        results = {rid: Completion([], [], None, len(p)) for rid, p in zip(ids, prompts)}
        for rid, p, sp, st in zip(ids, prompts, samplings, stoppings):
            self.add_request(GenerationRequest(rid, p, sp, st))
        while self.has_unfinished():
            for out in self.step():
                c = results.get(out.request_id)
                if c is None:
                    continue
                c.token_ids += out.new_token_ids
                c.logprobs += out.logprobs
                if out.finished:
                    c.finish_reason = out.finish_reason
        return [results[rid] for rid in ids]
