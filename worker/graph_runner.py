"""CUDA graphs for decode steps: the target model's forward captured once per (batch-size bucket, tokens per
sequence) and replayed, so a decode step costs one graph launch instead of ~10 kernel launches per layer x 48
layers (at batch 1 the launches, not the memory bandwidth, bound an eager step: graphs made batch-1 decode of the
FP8 model 10.6x faster on an H200, bench/README.md; how the runner works: docs/architecture.md §7).

What a graph fixes at capture: the addresses it reads and writes and every launch's grid. So a captured step
runs on static buffers (`StaticBatch`): this step's ids, positions, KV slots, block tables and state slots are
copied into them, and the kernels' varlen tables (kernels/step_metadata.py) are refilled in place. A step of B
sequences replays the smallest bucket >= B; rows B.. are padding sequences that attend over a few keys read
through whatever their block-table rows hold (finite values, never written: their KV slots are -1) and compute
their DeltaNet state in CacheTensors' padding slot. Their outputs are dropped.

Which steps qualify: every sequence has the same number of new tokens q, and q is a captured length: 1 (plain
decode) or 1 + k_max (a speculative verify chunk of every sequence); mixed prefill/decode steps, and verify
chunks shortened by a request's own k or a full cache, run eagerly. The MTP head's drafting passes 2..k (one
token per sequence) have graphs of their own (`mtp_draft_runner`, sharing the memory pool); its first pass, over
the ragged rows a step made real, runs eagerly.

Modes (EngineConfig.cuda_graphs): `auto` captures on CUDA (tensor parallel size 1, Triton kernels); `off` never;
`padded-eager` runs qualifying steps through the same static buffers and padding without capturing, on any
device: for the CPU tests (which cannot capture), and to tell a capture problem from a padding one on a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qnext.kernels.step_metadata import StepMetadata, VarlenLayout
from qnext.worker.cache_tensors import CacheTensors
from qnext.worker.model import ForwardBatch, Qwen3NextForCausalLM

MODES = ("auto", "off", "padded-eager")


def batch_buckets(max_batch: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every multiple of 8 up to max_batch (and max_batch itself), as
    vLLM does: at most 7 padding rows above 8."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


@dataclass
class InputBuffers:
    """The device buffers every graph reads its step's inputs from, sized for the largest bucket; a smaller one
    reads the leading part (replays run one at a time, so they can share)."""

    input_ids: torch.Tensor  # [max tokens] int64
    positions: torch.Tensor  # [max tokens] int64
    slot_mapping: torch.Tensor  # [max tokens] int64
    block_tables: torch.Tensor  # [max batch, blocks of max_model_len] int32
    state_slots: torch.Tensor  # [max batch] int64
    hidden: torch.Tensor | None  # [max tokens, H]: the MTP head's hidden-state input (None for the target)

    @staticmethod
    def allocate(max_batch: int, max_tokens: int, max_blocks: int, device: torch.device,
                 hidden: tuple[int, torch.dtype] | None = None) -> InputBuffers:
        def ints(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)
        h = torch.zeros(max_tokens, hidden[0], dtype=hidden[1], device=device) if hidden else None
        return InputBuffers(ints(max_tokens), ints(max_tokens), ints(max_tokens),
                            ints(max_batch, max_blocks, dtype=torch.int32), ints(max_batch), h)


class StaticBatch:
    """What one graph reads, for `batch_size` sequences of `query_len` new tokens each."""

    def __init__(self, batch_size: int, query_len: int, buffers: InputBuffers, max_model_len: int,
                 padding_slot: int) -> None:
        self.batch_size, self.query_len = batch_size, query_len
        self.max_model_len, self.padding_slot = max_model_len, padding_slot
        T = batch_size * query_len
        self.hidden = buffers.hidden[:T] if buffers.hidden is not None else None
        self.batch = ForwardBatch(
            input_ids=buffers.input_ids[:T], positions=buffers.positions[:T],
            query_lens=[query_len] * batch_size, context_lens=[self.padding_context] * batch_size,
            slot_mapping=buffers.slot_mapping[:T], block_tables=buffers.block_tables[:batch_size],
            state_slots=buffers.state_slots[:batch_size], is_verify=[True] * batch_size if query_len > 1 else None)
        # every row starts as padding: no KV write, the padding slot
        self.batch.slot_mapping.fill_(-1)
        self.batch.state_slots.fill_(padding_slot)
        self.batch.kernel_meta = StepMetadata(self._layout(self.batch.context_lens), buffers.input_ids.device)

    @property
    def padding_context(self) -> int:
        # one key more than the query: a padding row "continues" a sequence (a verify chunk must), and its
        # attention sees keys 0..q of its block-table row
        return self.query_len + 1

    def _layout(self, context_lens: list[int]) -> VarlenLayout:
        # launch choices (attention's key splits) must hold for any context a replay may bring
        return VarlenLayout.of(self.batch.query_lens, context_lens, self.batch.is_verify, self.max_model_len)

    def load(self, step: ForwardBatch, hidden: torch.Tensor | None) -> None:
        """Copy a qualifying step's inputs into the buffers; rows past it become padding again (their hidden
        input keeps whatever an earlier step left: finite, and their outputs are dropped)."""
        B, T = len(step.query_lens), step.input_ids.shape[0]
        s = self.batch
        if self.hidden is not None:
            self.hidden[:T].copy_(hidden, non_blocking=True)
        s.input_ids[:T].copy_(step.input_ids, non_blocking=True)
        s.positions[:T].copy_(step.positions, non_blocking=True)
        s.slot_mapping[:T].copy_(step.slot_mapping, non_blocking=True)
        s.slot_mapping[T:].fill_(-1)
        width = step.block_tables.shape[1]
        s.block_tables[:B, :width].copy_(step.block_tables, non_blocking=True)
        s.state_slots[:B].copy_(step.state_slots, non_blocking=True)
        s.state_slots[B:].fill_(self.padding_slot)
        context_lens = list(step.context_lens) + [self.padding_context] * (self.batch_size - B)
        # the host lists matter only to an eager run on these buffers (padded-eager); a replay reads the tables
        s.context_lens = context_lens
        s.forget_derived()  # the cached tables of the last step's lengths and slots
        s.kernel_meta.refill(self._layout(context_lens))


@dataclass
class GraphStats:
    num_graphs: int = 0
    capture_s: float = 0.0
    replayed_steps: int = 0  # forwards served by a graph (or, padded-eager, by the static buffers)
    eager_steps: int = 0  # forwards that did not qualify
    padded_rows: int = 0  # padding sequences run in replayed steps


StepForward = Callable[[ForwardBatch, torch.Tensor | None], torch.Tensor]


class DecodeGraphRunner:
    """Runs `forward(batch, hidden)` (a forward of the target model or of the MTP head) for qualifying steps
    through the captured graphs (or padded-eager), and eagerly otherwise."""

    def __init__(self, forward: StepForward, cache: CacheTensors, *, max_batch: int, max_model_len: int,
                 block_size: int, query_lens: tuple[int, ...], capture: bool,
                 hidden_in: tuple[int, torch.dtype] | None = None, pool: object | None = None) -> None:
        if cache.padding_slot is None:
            raise ValueError("the cache has no padding slot (CacheShape.padding_slot) for the graphs' padding rows")
        self._forward, self.cache, self.capture = forward, cache, capture
        self.buckets = batch_buckets(max_batch)
        self.query_lens = tuple(sorted(set(query_lens)))
        self.stats = GraphStats()
        device = cache.conv_state.device
        # block-table width: a verify chunk (and the MTP drafts after it) may reach q - 1 positions past the
        # longest request
        self.max_blocks = -(-(max_model_len + self.query_lens[-1]) // block_size)
        buffers = InputBuffers.allocate(self.buckets[-1], self.buckets[-1] * self.query_lens[-1], self.max_blocks,
                                        device, hidden_in)
        self._static: dict[tuple[int, int], StaticBatch] = {}
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        start = time.perf_counter()
        self.pool = pool  # the graphs' memory pool, shareable with another runner's (they never run at once)
        # largest first: the later, smaller graphs fit in the memory pool the first one sized
        for q in self.query_lens:
            for b in reversed(self.buckets):
                static = StaticBatch(b, q, buffers, max_model_len, cache.padding_slot)
                self._static[(b, q)] = static
                if capture:
                    try:
                        self._capture(static)
                    except Exception as e:  # say which graph, and how to run without them
                        raise RuntimeError(f"CUDA graph capture failed for batch {b}, {q} tokens per sequence: {e} "
                                           f"(--enforce-eager / cuda_graphs='off' runs without graphs)") from e
        self.stats.num_graphs = len(self._graphs)
        self.stats.capture_s = time.perf_counter() - start

    def _capture(self, static: StaticBatch) -> None:
        """Warm up (compiles the Triton kernels, builds every varlen table), then capture one forward. The
        padding rows touch only the padding slot, so warming up on the live cache is harmless."""
        side = torch.cuda.Stream()  # warm up off the default stream, as torch.cuda.graph's docs ask
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(static.batch, static.hidden)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        static.batch.kernel_meta.frozen = True
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(static.batch, static.hidden)
        self._graphs[(static.batch_size, static.query_len)] = (graph, out)
        self.pool = graph.pool()

    def describe(self) -> str:
        """One line for the start-up log."""
        shapes = f"batch <= {self.buckets[-1]} in {len(self.buckets)} buckets, tokens per sequence " \
                 f"{'/'.join(map(str, self.query_lens))}"
        if not self.capture:
            return f"padded-eager ({shapes}; nothing captured)"
        return f"{self.stats.num_graphs} captured in {self.stats.capture_s:.1f} s ({shapes})"

    def bucket_for(self, batch: ForwardBatch) -> tuple[int, int] | None:
        """The (bucket, query length) that runs this step, or None when it must run eagerly."""
        lens = batch.query_lens
        q = lens[0]
        if q not in self.query_lens or len(lens) > self.buckets[-1] or any(n != q for n in lens):
            return None
        if batch.block_tables.shape[1] > self.max_blocks:
            return None
        verify = batch.is_verify or []
        if (q > 1) != (bool(verify) and all(verify)):  # a q-token chunk that is not a verify chunk: a prefill
            return None
        b = next(b for b in self.buckets if b >= len(lens))
        return b, q

    @torch.inference_mode()  # the static tables were built inside the model's (inference-mode) forward
    def forward(self, batch: ForwardBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """forward(batch, hidden): [T, H], through a graph when the step qualifies."""
        key = self.bucket_for(batch)
        if key is None:
            self.stats.eager_steps += 1
            return self._forward(batch, hidden)
        static = self._static[key]
        static.load(batch, hidden)
        T = batch.input_ids.shape[0]
        self.stats.replayed_steps += 1
        self.stats.padded_rows += static.batch_size - len(batch.query_lens)
        if key in self._graphs:
            graph, out = self._graphs[key]
            graph.replay()
        else:  # padded-eager: the first run plays the warm-up; later ones must find every table built
            out = self._forward(static.batch, static.hidden)
            static.batch.kernel_meta.frozen = True
        # a copy: the graph's output buffer is overwritten by the next replay
        return out[:T].clone()


def target_runner(model: Qwen3NextForCausalLM, cache: CacheTensors, **kwargs) -> DecodeGraphRunner:
    """The target model's decode and verify steps."""
    return DecodeGraphRunner(lambda batch, _: model(batch, cache), cache, **kwargs)


def mtp_draft_runner(model: Qwen3NextForCausalLM, cache: CacheTensors, **kwargs) -> DecodeGraphRunner:
    """The MTP head's drafting passes 2..k: one token per sequence (its previous draft), paired with the head's
    own previous hidden state. (Pass 1, over every row a step made real, has ragged lengths: eager.)"""
    cfg = model.config
    dtype = model.model.embed_tokens.weight.dtype
    return DecodeGraphRunner(lambda batch, h: model.mtp_forward(batch.input_ids, h, batch, cache), cache,
                             query_lens=(1,), hidden_in=(cfg.hidden_size, dtype), **kwargs)
