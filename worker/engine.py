"""The engine: token ids in, token ids out. `add_request / step / abort`, plus offline `generate()`.

One step = scheduler plan -> one packed forward (prefill chunks and decodes together) -> logits of the
sequences that sample -> sampler -> scheduler update. The scheduler and cache allocator are plain Python;
this module is where their plan becomes device tensors.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from worker.cache import HybridCacheManager
from worker.cache_tensors import CacheShape, CacheTensors, kv_bytes_per_block, state_bytes_per_slot
from worker.loader import load_model
from worker.model import ForwardBatch
from worker.sampler import SamplingBatch, SamplingParams, sample
from worker.scheduler import (FinishReason, Request, SchedulePlan, Scheduler, SchedulerConfig, StepOutput,
                              StoppingParams)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # checkpoint directory; None = the embedded tiny default
    device: str = "cpu"
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    block_size: int = 16
    # Cache budget: a fraction of device memory on CUDA (<= 1), bytes on CPU (> 1).
    cache_memory: float = 0.0  # 0 = default: 0.85 of free memory on CUDA, 512 MiB on CPU
    state_dtype: str = "float32"  # DeltaNet recurrent state; bfloat16 halves it
    seed: int | None = None  # seeds the per-request seeds drawn for requests that give none

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype: must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.state_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"state_dtype: must be float32 or bfloat16, got {self.state_dtype!r}")
        if self.cache_memory < 0:
            raise ValueError(f"cache_memory: must be >= 0, got {self.cache_memory}")


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=StoppingParams)


@dataclass
class RequestOutput:
    """What one step produced for one request (crosses the process boundary later)."""

    request_id: str
    new_token_ids: list[int]
    logprobs: list[float]  # of each new token
    top_logprobs: list[list[tuple[int, float]]]  # per new token, the request's top-n (id, logprob)
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_preemptions: int


@dataclass
class StepTimings:
    """Cumulative wall time of step(): inside the model (forward + logits) and in total."""

    num_steps: int = 0
    forward_s: float = 0.0
    total_s: float = 0.0

    @property
    def overhead_s(self) -> float:
        """Scheduler, batch building, sampling and bookkeeping: everything outside the model."""
        return self.total_s - self.forward_s


@dataclass(frozen=True)
class CacheInfo:
    num_blocks: int
    block_size: int
    num_slots: int
    bytes_per_block: int
    bytes_per_slot: int

    @property
    def num_kv_tokens(self) -> int:
        return self.num_blocks * self.block_size


def eos_token_ids(model_dir: Path, config_eos: tuple[int, ...]) -> tuple[int, ...]:
    """EOS ids: generation_config.json's list when present (Qwen lists <|im_end|> and <|endoftext|>)."""
    path = model_dir / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (eos,)
    return config_eos


def size_cache(config: EngineConfig, bytes_per_block: int, bytes_per_slot: int, device: torch.device) -> tuple[int, int]:
    """Split the budget: state slots for max_num_seqs sequences (at most half the budget), the rest KV blocks."""
    budget = config.cache_memory
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * (budget or 0.85))
    else:
        budget = int(budget or 512 << 20)
    num_slots = max(1, min(config.max_num_seqs, budget // 2 // bytes_per_slot))
    num_blocks = (budget - num_slots * bytes_per_slot) // bytes_per_block
    if num_blocks < 1:
        raise ValueError(f"cache_memory: {budget} bytes hold no KV block after {num_slots} state slots")
    return int(num_blocks), int(num_slots)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if config.model is None:
            from worker.tiny import default_checkpoint
            self.model_dir = default_checkpoint()
        else:
            self.model_dir = Path(config.model)
        dtype = None if config.dtype == "auto" else _DTYPES[config.dtype]
        self.model = load_model(self.model_dir, self.device, dtype)
        mcfg = self.model.config
        self.dtype = self.model.model.embed_tokens.weight.dtype  # activations / KV dtype
        self.eos_token_ids = eos_token_ids(self.model_dir, mcfg.eos_token_ids)
        self.max_model_len = min(config.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
        state_dtype = _DTYPES[config.state_dtype]
        per_block = kv_bytes_per_block(mcfg, config.block_size, self.dtype)
        per_slot = state_bytes_per_slot(mcfg, state_dtype, self.dtype)
        num_blocks, num_slots = size_cache(config, per_block, per_slot, self.device)
        self.cache_info = CacheInfo(num_blocks, config.block_size, num_slots, per_block, per_slot)
        self.cache = CacheTensors(mcfg, CacheShape(num_blocks, config.block_size, num_slots, self.dtype, state_dtype,
                                                   self.dtype), self.device)
        self.cache_manager = HybridCacheManager(num_blocks, config.block_size, num_slots)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=config.max_num_seqs,
                                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                                   max_model_len=self.max_model_len), self.cache_manager)
        self._seed_rng = random.Random(config.seed)
        self._aborted: list[Request] = []
        self.timings = StepTimings()

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def add_request(self, req: GenerationRequest) -> None:
        """Queue a request. ValueError (naming the field) if it can never run."""
        if not req.prompt_token_ids:
            raise ValueError("prompt_token_ids: must not be empty")
        bad = [t for t in req.prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids: ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        seed = req.sampling.seed if req.sampling.seed is not None else self._seed_rng.getrandbits(63)
        self.scheduler.add(Request(request_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids),
                                   stopping=req.stopping, eos_token_ids=self.eos_token_ids, sampling=req.sampling,
                                   seed=seed))

    def abort(self, request_id: str) -> bool:
        """Stop a request now; its blocks and slot are free at once. Its final output comes with the next step."""
        request = self.scheduler.get(request_id)
        if request is None or not self.scheduler.abort(request_id):
            return False
        self._aborted.append(request)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        outputs = self._step()
        self.timings.total_s += time.perf_counter() - start
        return outputs

    def _step(self) -> list[RequestOutput]:
        outputs = [self._output(r, StepOutput(r.request_id, [], True, FinishReason.ABORTED), None, None)
                   for r in self._aborted]
        self._aborted.clear()
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return outputs
        batch = self._forward_batch(plan)
        sampling = [i for i, c in enumerate(plan.chunks) if c.sample]
        sampled: dict[str, int] = {}
        per_request: dict[str, tuple[float, list[tuple[int, float]]]] = {}
        logits = self._run_model(batch, sampling)
        self.timings.num_steps += 1
        if sampling:
            requests = [plan.chunks[i].request for i in sampling]
            result = sample(logits, self._sampling_batch(requests))
            tokens = result.token_ids.tolist()
            logprobs = result.logprobs.tolist()
            top_ids = result.top_ids.tolist() if result.top_ids is not None else None
            top_lps = result.top_logprobs.tolist() if result.top_logprobs is not None else None
            for j, r in enumerate(requests):
                sampled[r.request_id] = tokens[j]
                n = r.sampling.top_logprobs
                top = list(zip(top_ids[j][:n], top_lps[j][:n])) if n and top_ids is not None else []
                per_request[r.request_id] = (logprobs[j], top)
        by_id = {c.request.request_id: c.request for c in plan.chunks}
        for so in self.scheduler.update(plan, sampled):
            lp = per_request.get(so.request_id)
            outputs.append(self._output(by_id[so.request_id], so, *(lp if lp else (None, None))))
        return outputs

    def _run_model(self, batch: ForwardBatch, sampling: list[int]) -> torch.Tensor | None:
        """The forward and the logits of the sampling rows; timed (synchronised on CUDA) for StepTimings."""
        start = time.perf_counter()
        hidden = self.model(batch, self.cache)
        logits = self.model.compute_logits(hidden[batch.last_token_indices[sampling]]) if sampling else None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings.forward_s += time.perf_counter() - start
        return logits

    def _output(self, r: Request, so: StepOutput, logprob: float | None,
                top: list[tuple[int, float]] | None) -> RequestOutput:
        return RequestOutput(
            request_id=r.request_id, new_token_ids=list(so.new_token_ids),
            logprobs=[logprob] if logprob is not None and so.new_token_ids else [],
            top_logprobs=[top] if top and so.new_token_ids else [],
            finished=so.finished, finish_reason=so.finish_reason, num_prompt_tokens=len(r.prompt_token_ids),
            num_output_tokens=len(r.output_token_ids), num_preemptions=r.num_preemptions)

    def _forward_batch(self, plan: SchedulePlan) -> ForwardBatch:
        bs = self.config.block_size
        ids: list[int] = []
        slots: list[int] = []
        positions: list[int] = []
        for c in plan.chunks:
            r = c.request
            ids += r.all_token_ids[c.start:c.start + c.num_tokens]
            positions += range(c.start, c.start + c.num_tokens)
            slots += [r.block_ids[p // bs] * bs + p % bs for p in range(c.start, c.start + c.num_tokens)]
        width = max(len(c.request.block_ids) for c in plan.chunks)
        tables = [c.request.block_ids + [0] * (width - len(c.request.block_ids)) for c in plan.chunks]
        dev = self.device
        return ForwardBatch(
            input_ids=torch.tensor(ids, device=dev), positions=torch.tensor(positions, device=dev),
            query_lens=[c.num_tokens for c in plan.chunks],
            context_lens=[c.start + c.num_tokens for c in plan.chunks],
            slot_mapping=torch.tensor(slots, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            state_slots=torch.tensor([c.request.state_slot for c in plan.chunks], device=dev))

    def _sampling_batch(self, requests: list[Request]) -> SamplingBatch:
        return SamplingBatch.build(
            params=[r.sampling for r in requests], seeds=[r.seed for r in requests],
            steps=[len(r.output_token_ids) for r in requests],
            prompt_ids=[r.prompt_token_ids for r in requests], output_ids=[r.output_token_ids for r in requests],
            suppressed_ids=[self.scheduler.suppressed_token_ids(r) for r in requests],
            vocab_size=self.vocab_size, device=self.device)

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


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
