"""The device side of an engine step: plan -> ForwardBatch -> forward (CUDA graph or eager) -> logits -> sample.

`ModelRunner` owns the model, the cache's device memory and the decode graphs; it is built from an
`EngineConfig` (loading the checkpoint, sizing the cache from the memory budget, capturing the graphs) and turns
the scheduler's chunks into tensors. `build_forward_batch` is the one place a `ForwardBatch` is put together
from (block table, state slot, first position, token ids) per sequence: the engine, qnext-validate, the
benchmarks and the tests all build theirs with it. Speculative verify and drafting live in
`worker/spec_decode.py`; the step loop in `worker/engine.py`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import torch

from qnext.kernels import cpu as cpu_kernels
from qnext.kernels.dispatch import kernels_mode
from qnext.kernels.fp8.reference import FP8_DTYPE
from qnext.worker.cache import Restore
from qnext.worker.cache_tensors import (CacheShape, CacheTensors, checkpoint_bytes, kv_bytes_per_block,
                                        state_bytes_per_slot)
from qnext.worker.config import config_overlay, load_config
from qnext.worker.dtype_choice import choose_dtype
from qnext.worker.greedy_screen import MAX_ROWS as GREEDY_SCREEN_MAX_ROWS, GreedyScreen
from qnext.worker.graph_runner import DecodeGraphRunner, mtp_draft_runner, target_runner
from qnext.worker.host_malloc import keep_freed_memory
from qnext.worker.loader import load_model
from qnext.worker.model import ForwardBatch, Qwen3NextForCausalLM
from qnext.worker.sampler import PenaltyTokens, SamplingBatch, raw_logprobs, sample
from qnext.worker.scheduler import Request, ScheduledChunk, SchedulePlan
from qnext.worker.token_history import TokenHistory
from qnext.worker.tp_worker import Followers
from qnext.worker.types import CacheInfo, EngineConfig, LogprobEntries

PROMPT_LOGPROBS_ROWS = 256  # logits rows per block for prompt log-probs: 156 MB of float32 at a 151,936 vocabulary
# float64 exists for exactness tests (rounding out of the way), not for serving.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's rows of a forward: tokens at positions start.. of a sequence with this block table."""

    block_ids: Sequence[int]
    state_slot: int
    start: int
    token_ids: Sequence[int]


def build_forward_batch(chunks: Sequence[SeqChunk], block_size: int, device: torch.device,
                        is_verify: list[bool] | None = None, token_step_max_len: int = 1) -> ForwardBatch:
    """The packed varlen batch of `chunks`, in order; is_verify marks speculative verify chunks;
    token_step_max_len: ForwardBatch's."""
    ids: list[int] = []
    slots: list[int] = []
    positions: list[int] = []
    for c in chunks:
        end = c.start + len(c.token_ids)
        ids += c.token_ids
        positions += range(c.start, end)
        slots += [c.block_ids[p // block_size] * block_size + p % block_size for p in range(c.start, end)]
    width = max(len(c.block_ids) for c in chunks)
    tables = [list(c.block_ids) + [0] * (width - len(c.block_ids)) for c in chunks]
    return ForwardBatch(
        input_ids=torch.tensor(ids, device=device), positions=torch.tensor(positions, device=device),
        query_lens=[len(c.token_ids) for c in chunks], context_lens=[c.start + len(c.token_ids) for c in chunks],
        slot_mapping=torch.tensor(slots, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        state_slots=torch.tensor([c.state_slot for c in chunks], device=device),
        is_verify=is_verify if is_verify and any(is_verify) else None, token_step_max_len=token_step_max_len)


@dataclass
class StepForward:
    """What one step's forward produced, for sampling, verifying and the MTP head."""

    pieces: list[tuple[Request, int, list[int]]]  # (request, first position, token ids) per chunk, in batch order
    ends: dict[str, int]  # request id -> the row after its chunk in the packed batch
    hidden: torch.Tensor  # [T, H] final hidden states of every row
    plain: list[ScheduledChunk]  # chunks that sample one token (their last row's logits come first)
    verify: list[ScheduledChunk]  # speculative verify chunks (then every row of each)
    sampling_hidden: torch.Tensor  # [len(plain) + sum of verify lengths, H]: the rows `logits` are of
    # their logits [rows, V], or the runner's function making them when a greedy screen may do without (`logits`)
    _logits: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

    @property
    def logits_pending(self) -> bool:
        return not isinstance(self._logits, torch.Tensor)

    @property
    def logits(self) -> torch.Tensor:
        if self.logits_pending:
            self._logits = self._logits(self.sampling_hidden)
        return self._logits


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


class ModelRunner:
    def __init__(self, config: EngineConfig, model: Qwen3NextForCausalLM | None = None) -> None:
        """`model`: an already built model on `config.device` (bench/full_shape.py: random weights at the real
        shape, no checkpoint on disk); then `config.model` is ignored and EOS ids come from the model's config.
        Single device only."""
        self.config = config
        self.device = torch.device(config.device)
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)  # process-wide: the engine owns its process (or its caller)
        # process-wide too: the sampler's [batch, vocabulary] temporaries stop page-faulting every step
        self.host_malloc = keep_freed_memory() if self.device.type == "cpu" else "unchanged (not a CPU device)"
        self.model_dir, self.followers, self.model, self.dtype_reason = self._load(config, model)
        mcfg = self.model.config
        self.dtype = self.model.model.embed_tokens.weight.dtype  # activations
        self.kv_dtype = FP8_DTYPE if config.kv_cache_dtype == "fp8" else self.dtype  # KV cache storage
        self.eos_token_ids = (eos_token_ids(self.model_dir, mcfg.eos_token_ids) if self.model_dir is not None
                              else mcfg.eos_token_ids)
        supported = mcfg.max_supported_len
        if config.max_model_len is not None and config.max_model_len > supported:
            raise ValueError(
                f"max_model_len: {config.max_model_len} is more than the model's config supports, {supported} "
                f"(max_position_embeddings {mcfg.max_position_embeddings}"
                + (f"; YaRN factor {mcfg.rope.yarn_factor:g} x original_max_position_embeddings "
                   f"{mcfg.rope.original_max_position_embeddings}" if mcfg.rope.yarn_factor is not None else
                   "; no rope_scaling: --rope-scaling turns YaRN on") + ")")
        self.max_model_len = config.max_model_len or supported
        self.max_spec_tokens = config.num_speculative_tokens
        if self.max_spec_tokens and mcfg.num_mtp_layers == 0:
            raise ValueError(f"num_speculative_tokens: {self.model_dir or 'the model'} has no MTP head (mtp.* tensors)")
        graph_mode = self._graph_mode()
        self.cache_info, self.cache = self._allocate_cache(padding_slot=graph_mode is not None)
        # on a CPU this builds the C token steps' library (kernels/cpu) now, not in the first step
        self.cpu_token_steps = cpu_kernels.describe(self.device, self.dtype, self.cache.ssm_state.dtype)
        if getattr(self.model.lm_head, "head_packed", None) is not None:  # worker/cpu_linear.py's PackedLinear
            self.cpu_token_steps += "; the LM head in C (kernels/cpu/lm_head.c, AVX512-BF16)"
        self.greedy_screen = self._greedy_screen()
        if self.greedy_screen is not None:
            self.cpu_token_steps += (f"; the greedy tokens of steps of up to {GREEDY_SCREEN_MAX_ROWS} row(s) "
                                     f"through an int8 screen of the LM head (worker/greedy_screen.py)")
        self._fit_max_model_len(config)
        if self.followers is not None:  # from here on the cross-rank calls (tp_worker.LeadModel/LeadCache) run on every rank
            self.model, self.cache = self.followers.lead(self.model, self.cache)
        self.graphs, self.mtp_graphs = self._graph_runners(graph_mode)
        self.timings = StepTimings()

    def _greedy_screen(self) -> GreedyScreen | None:
        """The int8 screen for greedy rows where the LM head runs in C on this CPU, single device."""
        head = self.model.lm_head
        if self.followers is not None or self.device.type != "cpu":
            return None
        return GreedyScreen.build(head.weight, getattr(head, "head_packed", None))

    def _fit_max_model_len(self, config: EngineConfig) -> None:
        """One request of max_model_len tokens must fit the KV cache: an explicit --max-model-len that does not
        is an error with both numbers; the default is capped at what the cache holds."""
        info = self.cache_info
        capacity = info.num_blocks * info.block_size
        if self.max_model_len <= capacity:
            return
        if config.max_model_len is not None:
            raise ValueError(f"max_model_len: {config.max_model_len} tokens do not fit the KV cache, which holds "
                             f"{capacity} tokens ({info.num_blocks} blocks of {info.block_size}); raise "
                             f"--cache-memory or lower --max-model-len")
        self.max_model_len = capacity

    @staticmethod
    def _load(config: EngineConfig, model: Qwen3NextForCausalLM | None):
        """(checkpoint dir or None, tensor-parallel followers or None, the model on this rank, why its dtype)."""
        tp = config.tensor_parallel_size
        if model is not None:
            if tp > 1:
                raise ValueError("tensor_parallel_size: a prebuilt model runs on one device")
            return None, None, model, "the prebuilt model's dtype"
        if config.model is None:
            from qnext.worker.tiny import default_checkpoint
            model_dir = default_checkpoint()
        else:
            model_dir = Path(config.model)
        # --rope-scaling / --hf-overrides: the model is read through an overlay whose config.json has them (every
        # reader sees them, the checkpoint stays as it is); the checkpoint's own directory is what is reported
        overrides = config.config_overrides()
        source = config_overlay(model_dir, overrides) if overrides else model_dir
        device = torch.device(config.device)
        dtype, why = choose_dtype(config.dtype, load_config(source).torch_dtype, device)
        # rank 0 of a tensor-parallel group: start the other ranks (they load their shards meanwhile)
        followers = Followers(source, config.device, str(dtype).removeprefix("torch."), tp) if tp > 1 else None
        return model_dir, followers, load_model(source, device, dtype, tp_size=tp), why

    def _allocate_cache(self, padding_slot: bool) -> tuple[CacheInfo, CacheTensors]:
        config, mcfg = self.config, self.model.config
        state_dtype = TORCH_DTYPES[config.state_dtype]
        per_block = kv_bytes_per_block(mcfg, config.block_size, self.kv_dtype)
        per_slot = state_bytes_per_slot(mcfg, state_dtype, self.dtype, self.max_spec_tokens)
        per_ckpt = checkpoint_bytes(mcfg, state_dtype, self.dtype, self.dtype)
        num_blocks, num_slots, num_ckpts = size_cache(config, per_block, per_slot, per_ckpt, self.device,
                                                      padding_slot=padding_slot)
        info = CacheInfo(num_blocks, config.block_size, num_slots, per_block, per_slot, num_ckpts,
                         per_ckpt if num_ckpts else 0)
        shape = CacheShape(num_blocks, config.block_size, num_slots, self.kv_dtype, state_dtype, self.dtype,
                           self.dtype, self.max_spec_tokens, num_ckpts, padding_slot=padding_slot)
        return info, CacheTensors(mcfg, shape, self.device)

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

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any (a single-device runner holds nothing to release)."""
        if self.followers is not None:
            self.followers.close()

    # ---- one step ----------------------------------------------------------------------------------------------

    def forward(self, plan: SchedulePlan) -> StepForward:
        """The plan's restores, then one packed forward of every chunk and the logits of the rows that sample:
        first the last token of each plain sampling chunk, then every token of each verify chunk."""
        if plan.restores:
            self.restore(plan.restores)
        pieces = [(c.request, c.start, self.chunk_tokens(c)) for c in plan.chunks]
        batch = self.forward_batch(pieces, [bool(c.draft_token_ids) for c in plan.chunks])
        ends = {c.request.request_id: end for c, end in zip(plan.chunks, accumulate(batch.query_lens))}
        plain = [c for c in plan.chunks if c.sample and not c.draft_token_ids]
        verify = [c for c in plan.chunks if c.draft_token_ids]
        rows = [ends[c.request.request_id] - 1 for c in plain]
        for c in verify:
            rows += range(ends[c.request.request_id] - c.num_tokens, ends[c.request.request_id])
        # a step of few plain rows leaves its logits to be made when read: `screened_tokens` may do without them
        lazy = self.greedy_screen is not None and not verify and self.greedy_screen.takes(len(rows))
        hidden, picked, logits = self.run(batch, rows, lazy)
        self.timings.num_steps += 1
        return StepForward(pieces, ends, hidden, plain, verify, picked, self._timed_logits if lazy else logits)

    def forward_batch(self, pieces: list[tuple[Request, int, list[int]]],
                      is_verify: list[bool] | None = None, token_step_max_len: int = 1) -> ForwardBatch:
        """pieces: (request, first position, token ids) per sequence, packed in order."""
        return build_forward_batch([SeqChunk(r.block_ids, r.state_slot, start, toks) for r, start, toks in pieces],
                                   self.config.block_size, self.device, is_verify, token_step_max_len)

    @staticmethod
    def chunk_tokens(c: ScheduledChunk) -> list[int]:
        """The token ids a chunk computes: its slice of the request, or [last token, *drafts] to verify."""
        if c.draft_token_ids:
            return c.request.token_slice(c.start, c.start + 1) + c.draft_token_ids
        return c.request.token_slice(c.start, c.start + c.num_tokens)

    def run(self, batch: ForwardBatch, rows: list[int], lazy: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The forward, the hidden states of `rows` and their logits (None when `lazy`); timed (synchronised on
        CUDA) for StepTimings."""
        start = time.perf_counter()
        hidden = self.graphs.forward(batch) if self.graphs is not None else self.model(batch, self.cache)
        picked = hidden[rows]
        logits = None if lazy else self.model.compute_logits(picked)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings.forward_s += time.perf_counter() - start
        return hidden, picked, logits

    def _timed_logits(self, rows: torch.Tensor) -> torch.Tensor:
        """A lazy step's logits (CPU only), counted in the forward's time like the eager ones."""
        start = time.perf_counter()
        logits = self.model.compute_logits(rows)
        self.timings.forward_s += time.perf_counter() - start
        return logits

    def prompt_logprobs(self, plan: SchedulePlan, step: StepForward) -> None:
        """Log-probs of the prompt tokens this step's chunks computed, for the requests that asked
        (Request.prompt_logprob_values: the row at position p scores prompt token p + 1). Logits in blocks of
        PROMPT_LOGPROBS_ROWS rows: a whole 8K-token chunk would be 5 GB of float32 logits."""
        for c in plan.chunks:
            r = c.request
            if r.prompt_logprobs is None or r.prompt_logprobs_sent or c.draft_token_ids:
                continue
            # Such a request never starts from the prefix cache, so its chunks cover the prompt from position 0
            # on; after a preemption the recomputed positions already scored are skipped.
            if r.prompt_logprob_values is None:
                r.prompt_logprob_values = LogprobEntries(r.prompt_logprobs)
            lo = max(c.start, len(r.prompt_logprob_values))
            hi = min(c.start + c.num_tokens, len(r.prompt_token_ids) - 1)
            row0 = step.ends[r.request_id] - c.num_tokens - c.start  # the batch row of position p is row0 + p
            for a in range(lo, hi, PROMPT_LOGPROBS_ROWS):
                b = min(a + PROMPT_LOGPROBS_ROWS, hi)
                logits = self.model.compute_logits(step.hidden[row0 + a:row0 + b])
                tokens = torch.tensor(r.prompt_token_ids[a + 1:b + 1], device=logits.device)
                own, values, ids = raw_logprobs(logits, tokens, r.prompt_logprobs)
                r.prompt_logprob_values.extend(
                    own.cpu().numpy().tobytes(), b"" if ids is None else ids.cpu().numpy().tobytes(),
                    b"" if values is None else values.cpu().numpy().tobytes())

    def sampling_batch(self, requests: list[Request], drafts: list[list[int]] | None = None,
                       last_only: bool = False) -> SamplingBatch:
        """One row per request; with drafts, one row per position j = 0..len(drafts) whose history is the
        outputs plus the first j drafts (`last_only`: just the row after all of them)."""
        rows: list[tuple[Request, list[int]]] = []
        for i, r in enumerate(requests):
            d = drafts[i] if drafts else []
            js = [len(d)] if last_only else range(len(d) + 1)
            rows += [(r, d[:j]) for j in js]
        return SamplingBatch.build(
            params=[r.sampling for r, _ in rows], seeds=[r.seed for r, _ in rows],
            steps=[len(r.output_token_ids) + len(d) for r, d in rows],
            histories=[self._penalty_tokens(r, d) for r, d in rows],
            suppressed_ids=[r.suppressed_token_ids(len(d)) for r, d in rows],
            vocab_size=self.vocab_size, device=self.device,
            allowed=([r.grammar.allowed(d) if r.grammar is not None else None for r, d in rows]
                     if any(r.grammar is not None for r, _ in rows) else None),
            forced=([r.forced_token_id(d) for r, d in rows]
                    if any(r.stopping.max_reasoning_tokens is not None for r, _ in rows) else None))

    def _penalty_tokens(self, r: Request, drafts: list[int]) -> PenaltyTokens | None:
        """What r's penalties read for the row after its outputs and `drafts`; None without a penalty."""
        if not r.sampling.has_penalty:
            return None
        if r.token_history is None:
            r.token_history = TokenHistory(r.prompt_token_ids, self.vocab_size)
        r.token_history.update(r.output_token_ids)
        return PenaltyTokens(r.token_history, drafts)

    def screened_tokens(self, step: StepForward) -> list[int] | None:
        """The tokens of the step's plain rows through the greedy screen (worker/greedy_screen.py: the tokens the
        full head's logits give), where the step left its logits to be made (`forward`: no verify rows, few
        plain ones) and every row is greedy with nothing applied to its logits and no log-probs asked; else None
        (the caller reads `step.logits`)."""
        if not step.logits_pending:  # every step asks: the others stop here
            return None
        requests = [c.request for c in step.plain]
        if any(r.sampling.temperature or r.sampling.top_logprobs for r in requests):
            return None  # (a sampled row is the common case: known before building a SamplingBatch)
        batch = self.sampling_batch(requests)
        if not (batch.unprocessed_greedy and batch.max_top_logprobs == 0):
            return None
        start = time.perf_counter()
        tokens = self.greedy_screen.screen(step.sampling_hidden)
        self.timings.forward_s += time.perf_counter() - start
        return tokens

    def sample(self, requests: list[Request], logits: torch.Tensor, sampled: dict[str, list[int]],
               logprobs: dict[str, tuple[list[float], list[list[tuple[int, float]]]]]) -> None:
        """One new token per request from its row of logits, with the log-probs it asked for."""
        result = sample(logits, self.sampling_batch(requests))
        tokens = result.token_ids.tolist()
        lps = result.logprobs.tolist() if result.logprobs is not None else None
        top_ids = result.top_ids.tolist() if result.top_ids is not None else None
        top_lps = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        for j, r in enumerate(requests):
            sampled[r.request_id] = [tokens[j]]
            n = r.sampling.top_logprobs
            top = list(zip(top_ids[j][:n], top_lps[j][:n])) if n and top_ids is not None else []
            logprobs[r.request_id] = ([lps[j]] if n and lps else [], [top] if top else [])

    def restore(self, restores: list[Restore]) -> None:
        """Prefix-cache hits: each request's slot gets the checkpoint's state, its fresh block the tail rows."""
        self.cache.copy_blocks([r.tail_block for r in restores], [r.dst_block for r in restores])
        self.cache.restore_checkpoints([r.ckpt_id for r in restores], [r.slot for r in restores])

    def save_checkpoints(self, plan: SchedulePlan, step: StepForward) -> None:
        """The checkpoints the scheduler took in its update: state of the slot, tail block, and the hidden state
        of the checkpoint's last token from this step's row of it."""
        copies = plan.checkpoints
        rows = []
        for cp in copies:
            chunk = next(c for c in plan.chunks if c.request.request_id == cp.request_id)
            first_row = step.ends[cp.request_id] - chunk.num_tokens
            rows.append(first_row + cp.checkpoint.position - 1 - chunk.start)
        self.cache.copy_blocks([cp.src_block for cp in copies], [cp.checkpoint.tail_block for cp in copies])
        self.cache.save_checkpoints([cp.slot for cp in copies], [cp.checkpoint.ckpt_id for cp in copies],
                                    step.hidden[rows])
