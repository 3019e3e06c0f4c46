"""The engine: token ids in, token ids out. `add_request / step / abort`, plus offline `generate()`.

One step = scheduler plan -> one packed forward (prefill chunks and decodes together) -> logits of the
sequences that sample -> sampler -> scheduler update. The scheduler and cache allocator are plain Python;
this module is where their plan becomes device tensors.
"""

from __future__ import annotations

import json
import random
import time
from itertools import accumulate
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qnext.kernels.dispatch import kernels_mode
from qnext.worker.cache import HybridCacheManager
from qnext.worker.cache_tensors import (CacheShape, CacheTensors, checkpoint_bytes, kv_bytes_per_block,
                                  state_bytes_per_slot)
from qnext.worker.graph_runner import MODES as GRAPH_MODES, DecodeGraphRunner, mtp_draft_runner, target_runner
from qnext.worker.loader import load_model
from qnext.worker.model import ForwardBatch, Qwen3NextForCausalLM
from qnext.worker.sampler import GREEDY_TEMPERATURE, SamplingBatch, SamplingParams, processed_probs, sample
from qnext.worker.spec_decode import STREAM_DRAFT, SpecCounters, accept_drafts, race
from qnext.worker.scheduler import (FinishReason, Request, RequestStatus, SchedulePlan, Scheduler, SchedulerConfig,
                              StepOutput, StoppingParams)
from qnext.worker.tp_worker import Followers

# float64 exists for exactness tests (rounding out of the way), not for serving.
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


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
    # MTP speculative decoding: the server's maximum (and default) draft length; 0 = off. Needs mtp.* weights.
    num_speculative_tokens: int = 0
    # Prefix caching (worker/prefix_cache.py): KV blocks + DeltaNet state checkpoints of earlier prompts.
    enable_prefix_caching: bool = True
    num_checkpoints: int = 0  # state checkpoints kept; 0 = as many as 10% of the cache budget holds
    # Tensor parallelism: ranks (processes, one device each) the model is split across (worker/parallel.py).
    tensor_parallel_size: int = 1
    # Decode steps as CUDA graphs (worker/graph_runner.py): auto (on CUDA with the Triton kernels, tensor
    # parallel size 1), off (vLLM's --enforce-eager), padded-eager (the graphs' static buffers without capture).
    cuda_graphs: str = "auto"
    cuda_graph_max_batch_size: int = 256  # largest captured batch (capped by max_num_seqs)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size",
                     "cuda_graph_max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype: must be auto, {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.state_dtype not in ("float32", "bfloat16", "float64"):
            raise ValueError(f"state_dtype: must be float32 or bfloat16, got {self.state_dtype!r}")
        if not 0 <= self.num_speculative_tokens <= 4:
            raise ValueError(f"num_speculative_tokens: must be in [0, 4], got {self.num_speculative_tokens}")
        if self.cache_memory < 0:
            raise ValueError(f"cache_memory: must be >= 0, got {self.cache_memory}")
        if self.cuda_graphs not in GRAPH_MODES:
            raise ValueError(f"cuda_graphs: must be one of {', '.join(GRAPH_MODES)}, got {self.cuda_graphs!r}")
        if self.num_checkpoints < 0:
            raise ValueError(f"num_checkpoints: must be >= 0, got {self.num_checkpoints}")


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=StoppingParams)
    num_speculative_tokens: int | None = None  # None = the engine's default; 0 = off; <= the engine's maximum
    use_prefix_cache: bool = True  # False: this request neither reads nor fills the prefix cache
    # Prompt positions (1..len(prompt)) where a DeltaNet state checkpoint should be taken, so a later prompt
    # sharing exactly that prefix can start there (chat-turn boundaries, client-chosen offsets).
    cache_checkpoints: tuple[int, ...] = ()


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
    num_drafted_tokens: int = 0  # MTP drafts verified for this request so far
    num_accepted_tokens: int = 0  # of which accepted
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


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
    num_checkpoints: int = 0  # prefix-cache state checkpoints (0 = prefix caching off)
    bytes_per_checkpoint: int = 0

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


def size_cache(config: EngineConfig, bytes_per_block: int, bytes_per_slot: int, bytes_per_checkpoint: int,
               device: torch.device, padding_slot: bool = False) -> tuple[int, int, int]:
    """Split the budget: prefix-cache checkpoints first (num_checkpoints, or 10% of the budget), then a state
    slot for each of max_num_seqs sequences (at most 90% of the rest: a running sequence needs its slot
    whatever its length), the rest KV blocks. Returns (blocks, slots, checkpoints)."""
    budget = config.cache_memory
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * (budget or 0.85))
    else:
        budget = int(budget or 512 << 20)
    num_ckpts = 0
    if config.enable_prefix_caching:
        num_ckpts = config.num_checkpoints or max(1, int(budget * 0.1) // bytes_per_checkpoint)
        budget -= num_ckpts * bytes_per_checkpoint
    num_slots = max(1, min(config.max_num_seqs, int(budget * 0.9) // bytes_per_slot))
    # CUDA graphs: CacheTensors' padding slot (padding rows compute into it) comes out of the KV share
    num_blocks = (budget - (num_slots + padding_slot) * bytes_per_slot) // bytes_per_block
    if num_blocks < 1:
        raise ValueError(f"cache_memory: {budget} bytes hold no KV block after {num_slots} state slots "
                         f"and {num_ckpts} prefix-cache checkpoints")
    return int(num_blocks), int(num_slots), int(num_ckpts)


class Engine:
    def __init__(self, config: EngineConfig, model: Qwen3NextForCausalLM | None = None) -> None:
        """`model`: an already built model on `config.device` (bench/full_shape.py: random weights at the real
        shape, no checkpoint on disk); then `config.model` is ignored and EOS ids come from the model's config.
        Single device only."""
        self.config = config
        self.device = torch.device(config.device)
        tp = config.tensor_parallel_size
        if model is not None:
            if tp > 1:
                raise ValueError("tensor_parallel_size: a prebuilt model runs on one device")
            self.model_dir = None
            self.followers = None
            self.model = model
        else:
            if config.model is None:
                from qnext.worker.tiny import default_checkpoint
                self.model_dir = default_checkpoint()
            else:
                self.model_dir = Path(config.model)
            dtype = None if config.dtype == "auto" else _DTYPES[config.dtype]
            # rank 0 of a tensor-parallel group: start the other ranks (they load their shards meanwhile)
            self.followers = Followers(self.model_dir, config.device, config.dtype, tp) if tp > 1 else None
            self.model = load_model(self.model_dir, self.device, dtype, tp_size=tp)
        mcfg = self.model.config
        self.dtype = self.model.model.embed_tokens.weight.dtype  # activations / KV dtype
        self.eos_token_ids = (eos_token_ids(self.model_dir, mcfg.eos_token_ids) if self.model_dir is not None
                              else mcfg.eos_token_ids)
        self.max_model_len = min(config.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
        state_dtype = _DTYPES[config.state_dtype]
        per_block = kv_bytes_per_block(mcfg, config.block_size, self.dtype)
        self.max_spec_tokens = config.num_speculative_tokens
        if self.max_spec_tokens and mcfg.num_mtp_layers == 0:
            raise ValueError(f"num_speculative_tokens: {self.model_dir or 'the model'} has no MTP head (mtp.* tensors)")
        per_slot = state_bytes_per_slot(mcfg, state_dtype, self.dtype, self.max_spec_tokens)
        per_ckpt = checkpoint_bytes(mcfg, state_dtype, self.dtype, self.dtype)
        graph_mode = self._graph_mode()
        num_blocks, num_slots, num_ckpts = size_cache(config, per_block, per_slot, per_ckpt, self.device,
                                                      padding_slot=graph_mode is not None)
        self.cache_info = CacheInfo(num_blocks, config.block_size, num_slots, per_block, per_slot, num_ckpts,
                                    per_ckpt if num_ckpts else 0)
        self.cache = CacheTensors(mcfg, CacheShape(num_blocks, config.block_size, num_slots, self.dtype, state_dtype,
                                                   self.dtype, self.max_spec_tokens, num_ckpts,
                                                   padding_slot=graph_mode is not None), self.device)
        self.cache_manager = HybridCacheManager(num_blocks, config.block_size, num_slots, num_ckpts)
        if self.followers is not None:  # from here on, every model / cache call runs on every rank
            self.model, self.cache = self.followers.lead(self.model, self.cache)
        self.graphs, self.mtp_graphs = self._graph_runners(graph_mode)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=config.max_num_seqs,
                                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                                   max_model_len=self.max_model_len), self.cache_manager)
        self._seed_rng = random.Random(config.seed)
        self._aborted: list[Request] = []
        self.timings = StepTimings()
        self.spec_counters = SpecCounters()  # all requests
        self._spec: dict[str, SpecCounters] = {}  # per request
        self._draft_probs: dict[str, torch.Tensor] = {}  # request id -> q of its pending drafts [k, V]
        # request id -> (hit position P, checkpoint's hidden state at P-1) for the MTP row at P-1 (prefix cache)
        self._restored_hidden: dict[str, tuple[int, torch.Tensor]] = {}

    def _graph_mode(self) -> str | None:
        """"capture", "padded-eager" or None (no graphs; `graphs_off_because` says why). Graphs hold Triton
        launches (QNEXT_KERNELS=reference turns them off; fp64 runs the references) on one device (no TP)."""
        mode = self.config.cuda_graphs
        why = {"off": "--enforce-eager", "padded-eager": None}.get(mode)
        if self.followers is not None:
            why = "tensor parallel"
        elif mode == "auto":
            why = ("not on CUDA" if self.device.type != "cuda" else
                   "QNEXT_KERNELS=reference" if kernels_mode() != "auto" else
                   "float64 runs the references" if self.dtype == torch.float64 else None)
        self.graphs_off_because = why
        if why is not None:
            return None
        return "capture" if mode == "auto" else mode

    def _graph_runners(self, mode: str | None) -> tuple[DecodeGraphRunner | None, DecodeGraphRunner | None]:
        """Capture the decode graphs (before serving: it takes seconds) or set up padded-eager: the target's
        decode / verify steps, and with MTP drafts of 2 or more tokens the MTP head's later drafting passes."""
        if mode is None:
            return None, None
        k = self.max_spec_tokens
        shape = dict(max_batch=min(self.config.cuda_graph_max_batch_size, self.config.max_num_seqs),
                     max_model_len=self.max_model_len, block_size=self.config.block_size, capture=mode == "capture")
        target = target_runner(self.model, self.cache, query_lens=(1, 1 + k) if k else (1,), **shape)
        mtp = mtp_draft_runner(self.model, self.cache, pool=target.pool, **shape) if k > 1 else None
        return target, mtp

    def describe_graphs(self) -> str:
        """What runs as CUDA graphs, for start-up logs."""
        if self.graphs is None:
            return f"off ({self.graphs_off_because})"
        mtp = f"; MTP drafting passes: {self.mtp_graphs.describe()}" if self.mtp_graphs is not None else ""
        return self.graphs.describe() + mtp

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
        k = self.max_spec_tokens if req.num_speculative_tokens is None else req.num_speculative_tokens
        if not 0 <= k <= self.max_spec_tokens:
            raise ValueError(f"num_speculative_tokens: must be in [0, {self.max_spec_tokens}] (the server's "
                             f"maximum), got {k}")
        bad = [p for p in req.cache_checkpoints if not 1 <= p <= len(req.prompt_token_ids)]
        if bad:
            raise ValueError(f"cache_checkpoints: positions must be in [1, {len(req.prompt_token_ids)}] (the prompt "
                             f"length), got {bad[:5]}")
        seed = req.sampling.seed if req.sampling.seed is not None else self._seed_rng.getrandbits(63)
        self.scheduler.add(Request(request_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids),
                                   stopping=req.stopping, eos_token_ids=self.eos_token_ids, sampling=req.sampling,
                                   seed=seed, num_speculative_tokens=k, use_prefix_cache=req.use_prefix_cache,
                                   checkpoint_positions=tuple(sorted(set(req.cache_checkpoints)))))
        if k:
            self._spec[req.request_id] = SpecCounters()

    def abort(self, request_id: str) -> bool:
        """Stop a request now; its blocks and slot are free at once. Its final output comes with the next step."""
        request = self.scheduler.get(request_id)
        if request is None or not self.scheduler.abort(request_id):
            return False
        self._draft_probs.pop(request_id, None)
        self._restored_hidden.pop(request_id, None)
        self._aborted.append(request)
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (running requests keep their blocks as private ones)."""
        self.scheduler.reset_prefix_cache()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any (a single-device engine holds nothing to release)."""
        if self.followers is not None:
            self.followers.close()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        # inference mode for the whole step, as for the model's own forward: the tensors a step creates (the
        # kernels' varlen tables among them, refilled in place by later CUDA-graph steps) are inference tensors,
        # and updating one in place outside inference mode is an error
        with torch.inference_mode():
            outputs = self._step()
        self.timings.total_s += time.perf_counter() - start
        return outputs

    def _step(self) -> list[RequestOutput]:
        outputs = [self._output(r, StepOutput(r.request_id, [], True, FinishReason.ABORTED))
                   for r in self._aborted]
        self._aborted.clear()
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return outputs
        if plan.restores:
            self._restore(plan)
        pieces = [(c.request, c.start, self._chunk_tokens(c)) for c in plan.chunks]
        batch = self._forward_batch(pieces, [bool(c.draft_token_ids) for c in plan.chunks])
        # logits rows: first the last token of each plain sampling chunk, then every token of each verify chunk
        ends = {c.request.request_id: end - 1 for c, end in zip(plan.chunks, accumulate(batch.query_lens))}
        plain = [c for c in plan.chunks if c.sample and not c.draft_token_ids]
        verify = [c for c in plan.chunks if c.draft_token_ids]
        rows = [ends[c.request.request_id] for c in plain]
        for c in verify:
            end = ends[c.request.request_id]
            rows += range(end - c.num_tokens + 1, end + 1)
        hidden, logits = self._run_model(batch, rows)
        self.timings.num_steps += 1
        sampled: dict[str, list[int]] = {}
        logprobs: dict[str, tuple[list[float], list[list[tuple[int, float]]]]] = {}
        if plain:
            self._sample_plain([c.request for c in plain], logits[:len(plain)], sampled, logprobs)
        if verify:
            self._verify(verify, logits[len(plain):], sampled, logprobs)
        # MTP over this step's rows before update: a request finishing now still gets its MTP KV written, so
        # the blocks and checkpoint update() caches hold complete MTP rows
        mtp_last = self._mtp_catch_up(plan, pieces, hidden, sampled) if self.max_spec_tokens else {}
        by_id = {c.request.request_id: c.request for c in plan.chunks}
        for so in self.scheduler.update(plan, sampled):
            outputs.append(self._output(by_id[so.request_id], so, *logprobs.get(so.request_id, ([], []))))
            if so.finished:
                self._draft_probs.pop(so.request_id, None)
        if plan.checkpoints:  # first device work after update: finished requests' blocks are free from here on
            self._save_checkpoints(plan, hidden, ends)
        drafting = [(by_id[rid], h) for rid, h in mtp_last.items() if by_id[rid].status == RequestStatus.RUNNING]
        if drafting:
            self._propose_drafts(drafting)
        return outputs

    def _restore(self, plan: SchedulePlan) -> None:
        """Prefix-cache hits: each request's slot gets the checkpoint's state, its fresh block the tail rows."""
        rs = plan.restores
        self.cache.copy_blocks([r.tail_block for r in rs], [r.dst_block for r in rs])
        self.cache.restore_checkpoints([r.ckpt_id for r in rs], [r.slot for r in rs])
        by_id = {c.request.request_id: c.request for c in plan.chunks}
        for r in rs:
            if by_id[r.request_id].num_speculative_tokens:
                self._restored_hidden[r.request_id] = (r.position, self.cache.ckpt_hidden[r.ckpt_id].clone())

    def _save_checkpoints(self, plan: SchedulePlan, hidden: torch.Tensor, ends: dict[str, int]) -> None:
        """The checkpoints update() decided on: state of the slot, tail block, hidden state of the last token."""
        starts = {c.request.request_id: (ends[c.request.request_id] - c.num_tokens + 1, c.start) for c in plan.chunks}
        cps = plan.checkpoints
        rows = []
        for cp in cps:
            first_row, start = starts[cp.request_id]
            rows.append(first_row + cp.checkpoint.position - 1 - start)
        self.cache.copy_blocks([cp.src_block for cp in cps], [cp.checkpoint.tail_block for cp in cps])
        self.cache.save_checkpoints([cp.slot for cp in cps], [cp.checkpoint.ckpt_id for cp in cps], hidden[rows])

    @staticmethod
    def _chunk_tokens(c) -> list[int]:
        if c.draft_token_ids:
            return c.request.token_slice(c.start, c.start + 1) + c.draft_token_ids
        return c.request.token_slice(c.start, c.start + c.num_tokens)

    def _sample_plain(self, requests: list[Request], logits: torch.Tensor, sampled: dict[str, list[int]],
                      logprobs: dict[str, tuple[list[float], list[list[tuple[int, float]]]]]) -> None:
        result = sample(logits, self._sampling_batch(requests))
        tokens = result.token_ids.tolist()
        lps = result.logprobs.tolist() if result.logprobs is not None else None
        top_ids = result.top_ids.tolist() if result.top_ids is not None else None
        top_lps = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        for j, r in enumerate(requests):
            sampled[r.request_id] = [tokens[j]]
            n = r.sampling.top_logprobs
            top = list(zip(top_ids[j][:n], top_lps[j][:n])) if n and top_ids is not None else []
            logprobs[r.request_id] = ([lps[j]] if n and lps else [], [top] if top else [])

    def _verify(self, chunks: list, logits: torch.Tensor, sampled: dict[str, list[int]],
                logprobs: dict[str, tuple[list[float], list[list[tuple[int, float]]]]]) -> None:
        """Accept or reject each verify chunk's drafts; roll DeltaNet states back to the last accepted token."""
        requests = [c.request for c in chunks]
        drafts = [c.draft_token_ids for c in chunks]
        p = processed_probs(logits, self._sampling_batch(requests, drafts, with_drafts=True))
        p_rows = list(p.split([len(d) + 1 for d in drafts]))
        q_rows = [self._draft_probs.pop(r.request_id)[:len(d)] for r, d in zip(requests, drafts)]
        result = accept_drafts(p_rows, q_rows, drafts, [r.seed for r in requests],
                               [len(r.output_token_ids) for r in requests], [_is_greedy(r) for r in requests])
        want_logprobs = any(r.sampling.top_logprobs for r in requests)
        raw = logits.float()
        # raw log-probs = logit - lse, as the sampler reports; only when a request asked for them
        lse = torch.logsumexp(raw, dim=-1, keepdim=True) if want_logprobs else None
        offsets = [0]
        for d in drafts:
            offsets.append(offsets[-1] + len(d) + 1)
        rollback_slots, rollback_pos = [], []
        for i, (r, d) in enumerate(zip(requests, drafts)):
            tokens, a = result.tokens[i], result.num_accepted[i]
            sampled[r.request_id] = tokens
            n = r.sampling.top_logprobs
            lps, tops = [], []
            if n:
                rows = slice(offsets[i], offsets[i] + len(tokens))
                lp_rows, lse_rows = raw[rows], lse[rows]
                picked = lp_rows.gather(1, torch.tensor(tokens, device=raw.device)[:, None])
                lps = (picked - lse_rows)[:, 0].tolist()
                tv, ti = lp_rows.topk(n, dim=-1)
                tv = tv - lse_rows
                tops = [list(zip(a_, b_)) for a_, b_ in zip(ti.tolist(), tv.tolist())]
            logprobs[r.request_id] = (lps, tops)
            self._spec[r.request_id].add(len(d), a)
            self.spec_counters.add(len(d), a)
            if a < len(d):
                rollback_slots.append(r.state_slot)
                rollback_pos.append(a)
        if rollback_slots:
            self.cache.rollback(torch.tensor(rollback_slots, device=self.device),
                                torch.tensor(rollback_pos, device=self.device))

    def _mtp_catch_up(self, plan: SchedulePlan, pieces: list, hidden: torch.Tensor,
                      sampled: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """MTP pass 1 (docs/architecture.md §9): the MTP over every row this step made real, pairing the target's
        hidden state h_p with token t_{p+1} (this keeps the MTP's own KV cache complete, prompt included).
        Returns, per request that sampled, the MTP hidden state of its last row: what proposes draft 1.
        A request restored from the prefix cache at P also gets the row at P-1, from the checkpoint's hidden
        state and its own token P (the cached row paired the prefix's owner's token P)."""
        ends = list(accumulate(len(toks) for _, _, toks in pieces))  # row after each piece in the target batch
        mtp_pieces, h_parts, sampling = [], [], []
        for c, (r, start, toks), end in zip(plan.chunks, pieces, ends):
            if r.num_speculative_tokens == 0 or r.status != RequestStatus.RUNNING:
                continue
            n_valid = len(sampled[r.request_id]) if c.draft_token_ids else c.num_tokens
            # the next token of each row: later tokens of the request, then what this step sampled
            known = r.token_slice(start + 1, min(start + 1 + n_valid, r.num_tokens))
            nxt = known + sampled.get(r.request_id, [])[:n_valid - len(known)]
            first = end - len(toks)
            restored = self._restored_hidden.pop(r.request_id, None)
            if restored is not None and restored[0] == start:
                mtp_pieces.append((r, start - 1, r.token_slice(start, start + 1) + nxt))
                h_parts.append(restored[1][None].to(hidden.dtype))
            else:
                mtp_pieces.append((r, start, nxt))
            h_parts.append(hidden[first:first + n_valid])
            if c.sample:
                sampling.append(len(mtp_pieces) - 1)
        if not mtp_pieces:
            return {}
        h_in = h_parts[0] if len(h_parts) == 1 else torch.cat(h_parts)
        batch = self._forward_batch(mtp_pieces, None)
        h = self.model.mtp_forward(batch.input_ids, h_in, batch, self.cache)
        if not sampling:  # only prefill chunks that sample nothing yet: their MTP KV is written, no drafts
            return {}
        last = batch.last_token_indices[sampling]
        return {mtp_pieces[i][0].request_id: h[j] for i, j in zip(sampling, last.tolist())}

    def _propose_drafts(self, drafting: list[tuple[Request, torch.Tensor]]) -> None:
        """MTP drafting (docs/architecture.md §9): draft 1 from pass 1's last row; passes 2..k feed each draft
        back with the MTP's own output hidden state, one position further each time."""
        requests = [r for r, _ in drafting]
        h = torch.stack([h for _, h in drafting])
        drafts: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        active = list(range(len(requests)))
        for j in range(self.max_spec_tokens):
            logits = self.model.compute_logits(h)
            rs = [requests[i] for i in active]
            q = processed_probs(logits, self._sampling_batch(rs, [drafts[i] for i in active], with_drafts=True,
                                                             last_only=True))
            tok = race(q, torch.tensor([r.seed for r in rs], dtype=torch.int64, device=self.device),
                       torch.tensor([len(r.output_token_ids) + j for r in rs], device=self.device), STREAM_DRAFT,
                       torch.tensor([_is_greedy(r) for r in rs], device=self.device)).tolist()
            keep = []
            for row, i in enumerate(active):
                drafts[i].append(tok[row])
                probs[i].append(q[row])
                if len(drafts[i]) < requests[i].num_speculative_tokens:
                    keep.append((row, i))
            # the next pass writes MTP KV one position further: make sure the blocks exist, else stop there
            nxt = []
            for row, i in keep:
                r = requests[i]
                grown = self.cache_manager.ensure(r.block_ids, r.state_slot, r.num_tokens + len(drafts[i]))
                if grown is not None:
                    r.block_ids, r.state_slot = grown
                    nxt.append((row, i))
            if not nxt:
                break
            rows_idx = [row for row, _ in nxt]
            active = [i for _, i in nxt]
            pieces_j = [(requests[i], requests[i].num_tokens + len(drafts[i]) - 2, [drafts[i][-1]]) for i in active]
            b = self._forward_batch(pieces_j, None)
            if self.mtp_graphs is not None:
                h = self.mtp_graphs.forward(b, h[rows_idx])
            else:
                h = self.model.mtp_forward(b.input_ids, h[rows_idx], b, self.cache)
        for r, d, pr in zip(requests, drafts, probs):
            r.draft_token_ids = d
            self._draft_probs[r.request_id] = torch.stack(pr)

    def _run_model(self, batch: ForwardBatch, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward and the logits of `rows`; timed (synchronised on CUDA) for StepTimings."""
        start = time.perf_counter()
        hidden = self.graphs.forward(batch) if self.graphs is not None else self.model(batch, self.cache)
        logits = self.model.compute_logits(hidden[rows])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings.forward_s += time.perf_counter() - start
        return hidden, logits

    def _output(self, r: Request, so: StepOutput, logprobs: list[float] | None = None,
                tops: list[list[tuple[int, float]]] | None = None) -> RequestOutput:
        n = len(so.new_token_ids)  # a stop inside accepted drafts truncates them
        spec = self._spec.pop(r.request_id, None) if so.finished else self._spec.get(r.request_id)
        return RequestOutput(
            request_id=r.request_id, new_token_ids=list(so.new_token_ids), logprobs=(logprobs or [])[:n],
            top_logprobs=(tops or [])[:n], finished=so.finished, finish_reason=so.finish_reason,
            num_prompt_tokens=len(r.prompt_token_ids), num_output_tokens=len(r.output_token_ids),
            num_preemptions=r.num_preemptions, num_drafted_tokens=spec.num_drafted if spec else 0,
            num_accepted_tokens=spec.num_accepted if spec else 0, num_cached_tokens=r.num_cached_tokens)

    def _forward_batch(self, pieces: list[tuple[Request, int, list[int]]],
                       is_verify: list[bool] | None) -> ForwardBatch:
        """pieces: (request, first position, token ids) per sequence, packed in order."""
        bs = self.config.block_size
        ids: list[int] = []
        slots: list[int] = []
        positions: list[int] = []
        for r, start, toks in pieces:
            ids += toks
            positions += range(start, start + len(toks))
            slots += [r.block_ids[p // bs] * bs + p % bs for p in range(start, start + len(toks))]
        width = max(len(r.block_ids) for r, _, _ in pieces)
        tables = [r.block_ids + [0] * (width - len(r.block_ids)) for r, _, _ in pieces]
        dev = self.device
        return ForwardBatch(
            input_ids=torch.tensor(ids, device=dev), positions=torch.tensor(positions, device=dev),
            query_lens=[len(t) for _, _, t in pieces], context_lens=[s + len(t) for _, s, t in pieces],
            slot_mapping=torch.tensor(slots, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            state_slots=torch.tensor([r.state_slot for r, _, _ in pieces], device=dev),
            is_verify=is_verify if is_verify and any(is_verify) else None)

    def _sampling_batch(self, requests: list[Request], drafts: list[list[int]] | None = None,
                        with_drafts: bool = False, last_only: bool = False) -> SamplingBatch:
        """One row per request; with drafts, one row per position j = 0..len(drafts) whose history is the
        outputs plus the first j drafts (`last_only`: just the row after all of them)."""
        rows: list[tuple[Request, list[int]]] = []
        for i, r in enumerate(requests):
            d = drafts[i] if with_drafts and drafts else []
            js = [len(d)] if last_only else range(len(d) + 1)
            rows += [(r, d[:j]) for j in js]
        return SamplingBatch.build(
            params=[r.sampling for r, _ in rows], seeds=[r.seed for r, _ in rows],
            steps=[len(r.output_token_ids) + len(d) for r, d in rows],
            prompt_ids=[r.prompt_token_ids for r, _ in rows], output_ids=[r.output_token_ids + d for r, d in rows],
            suppressed_ids=[self.scheduler.suppressed_token_ids(r, len(d)) for r, d in rows],
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


def _is_greedy(r: Request) -> bool:
    return r.sampling.temperature < GREEDY_TEMPERATURE


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
