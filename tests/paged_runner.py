"""A minimal driver of the model's varlen forward for model-level tests: it hands out KV blocks (deliberately
out of order, and small, so block tables matter) and state slots, and builds ForwardBatch for chunks of
several sequences at once. The engine's scheduler does this for real; here the test says what runs."""

from __future__ import annotations

import random

import torch

from qnext.worker.cache_tensors import CacheShape, CacheTensors
from qnext.worker.model import ForwardBatch, Qwen3NextForCausalLM
from qnext.worker.model_runner import SeqChunk, build_forward_batch


class PagedRunner:
    def __init__(self, model: Qwen3NextForCausalLM, num_blocks: int = 512, block_size: int = 4,
                 num_slots: int = 8, seed: int = 0, max_spec_tokens: int = 0, device: str = "cpu",
                 padding_slot: bool = False) -> None:
        self.model = model
        self.block_size = block_size
        dtype = next(model.parameters()).dtype
        state_dtype = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for exactness tests
        self.device = torch.device(device)
        self.cache = CacheTensors(model.config, CacheShape(num_blocks, block_size, num_slots, dtype, state_dtype,
                                                           dtype, dtype, max_spec_tokens, padding_slot=padding_slot),
                                  self.device)
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.free_slots = list(range(num_slots))[::-1]
        self.blocks: dict[int, list[int]] = {}
        self.slot: dict[int, int] = {}
        self.length: dict[int, int] = {}
        self._next = 0

    def new_seq(self) -> int:
        sid = self._next
        self._next += 1
        self.blocks[sid], self.slot[sid], self.length[sid] = [], self.free_slots.pop(), 0
        return sid

    def batch(self, chunks: list[tuple[int, list[int]]], verify: bool = False) -> ForwardBatch:
        """verify: every chunk is a speculative-verify chunk (its DeltaNet states after each position kept)."""
        seq_chunks = []
        for sid, toks in chunks:
            start = self.length[sid]
            self.length[sid] = start + len(toks)
            while len(self.blocks[sid]) * self.block_size < self.length[sid]:
                self.blocks[sid].append(self.free_blocks.pop())
            seq_chunks.append(SeqChunk(list(self.blocks[sid]), self.slot[sid], start, toks))
        return build_forward_batch(seq_chunks, self.block_size, self.device,
                                   is_verify=[True] * len(chunks) if verify else None)

    def step(self, chunks: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """Run one forward over the chunks; returns each chunk's logits for all its tokens: [n_i, V], in float32
        (float64 for a float64 model) for the tests to compute on."""
        batch = self.batch(chunks)
        logits = self.model.compute_logits(self.model(batch, self.cache))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return list(logits.split(batch.query_lens))
