"""bench/graphs.py's synthetic context: B sequences whose `context` tokens are already in the cache (random K/V in
shuffled blocks, random DeltaNet states), the steps that rewrite their last q positions, and the snapshot and
restore of what a step touches (so that an eager and a graphed step can start from the same cache state)."""

from __future__ import annotations

import random

import torch

BLOCK_SIZE = 16  # the engine's default KV block


class Context:
    """B sequences of `context` tokens already in the cache (random K/V, random DeltaNet states): sequence i owns
    state slot i and its own shuffled blocks. The chunks of each (B, q) step are built once; `batch()` turns them
    into a fresh ForwardBatch each call, the way the engine's ModelRunner does."""

    def __init__(self, cfg, cache, max_batch: int, context: int, device: torch.device, seed: int) -> None:
        self.cfg, self.cache, self.context, self.device = cfg, cache, context, device
        per_seq = -(-context // BLOCK_SIZE)
        blocks = list(range(max_batch * per_seq))
        random.Random(seed).shuffle(blocks)  # the engine's blocks are scattered too
        self.blocks = [blocks[i * per_seq:(i + 1) * per_seq] for i in range(max_batch)]
        gen = torch.Generator(device=device).manual_seed(seed)
        for pool in (*cache.k_cache, *cache.v_cache):
            pool.copy_(torch.randn(pool.shape, generator=gen, device=device, dtype=pool.dtype))
        cache.conv_state.copy_(torch.randn(cache.conv_state.shape, generator=gen, device=device))
        cache.ssm_state.copy_(0.1 * torch.randn(cache.ssm_state.shape, generator=gen, device=device))

    def host_lists(self, B: int, q: int, step: int = 0) -> dict:
        """The step's chunks: sequence i's last q positions (rewritten every step), in its blocks and slot i."""
        from qnext.worker.model_runner import SeqChunk
        start = self.context - q
        chunks = [SeqChunk(self.blocks[i], i, start, [(7919 * i + 31 * p + step) % self.cfg.vocab_size
                                                      for p in range(start, self.context)]) for i in range(B)]
        return dict(chunks=chunks, q=q, B=B)

    def batch(self, h: dict):
        from qnext.worker.model_runner import build_forward_batch
        return build_forward_batch(h["chunks"], BLOCK_SIZE, self.device,
                                   is_verify=[True] * h["B"] if h["q"] > 1 else None)

    # what a step can touch: its KV slots in every pool, its sequences' state slots (and their verify states)
    _STATE = ("conv_state", "ssm_state", "spec_conv", "spec_ssm")

    def snapshot(self, h: dict) -> dict:
        kv = self.batch(h).slot_mapping
        st = torch.arange(h["B"], device=self.device)
        pools = [p.flatten(0, 1)[kv].clone() for p in (*self.cache.k_cache, *self.cache.v_cache)]
        states = {n: getattr(self.cache, n)[:, st].clone() for n in self._STATE if getattr(self.cache, n) is not None}
        return dict(kv=kv, st=st, pools=pools, states=states)

    def restore(self, snap: dict) -> None:
        for p, saved in zip((*self.cache.k_cache, *self.cache.v_cache), snap["pools"]):
            p.flatten(0, 1)[snap["kv"]] = saved  # flatten of a contiguous pool is a view: writes land in it
        for n, saved in snap["states"].items():
            getattr(self.cache, n)[:, snap["st"]] = saved

    def states_after(self, h: dict) -> torch.Tensor:
        """The recurrent states the step leaves in its sequences' slots (and, verifying, the per-position ones)."""
        st = torch.arange(h["B"], device=self.device)
        parts = [self.cache.ssm_state[:, st].flatten()]
        if h["q"] > 1:
            parts.append(self.cache.spec_ssm[:, st, :h["q"] - 1].flatten())
        return torch.cat(parts).float()
