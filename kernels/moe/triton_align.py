"""Triton version of `align.align_pairs_by_expert` for decode-sized batches: one program, one launch.

Why: the torch version is ~20 small kernels. At batch-1 decode the routed experts stream ~31 MB of FP8 weights
per layer (~7 us on an H200), so twenty launches of a few microseconds each per MoE layer would cost more than
the experts themselves, CUDA graph or not. Past DECODE_MAX_PAIRS the GEMMs dwarf them and the torch version
(which scales) runs instead.

One program walks the pairs in CHUNK-sized slices twice, with each slice's expert ids as a one-hot
[CHUNK, BLOCK_E] tile: first to count pairs per expert (-> padded group starts, the end of the used entries and
each block's expert), then to place each pair at its group's running cursor + its rank among the slice's pairs of
that expert (a cumulative sum down the one-hot): the same stable order as the torch argsort. Loop bounds are
constexpr (the batch rounded up to a power of two): a handful of compiled variants, and the interpreter can run them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qnext.kernels.moe.align import max_padded_pairs

DECODE_MAX_PAIRS = 1024  # 102 tokens at top-10


@triton.jit
def moe_align_kernel(
    ids_ptr, pairs_ptr, block_expert_ptr, num_padded_ptr,  # ids: [n]; pairs: [P] int32; [P / BLOCK_M]; [1]
    num_pairs, num_entries,  # n, P
    E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
    MAX_PAIRS: tl.constexpr, MAX_ENTRIES: tl.constexpr,  # >= n, >= P: the loops' constant bounds
):
    e = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, MAX_PAIRS, CHUNK):
        p = c0 + tl.arange(0, CHUNK)
        x = tl.load(ids_ptr + p, mask=p < num_pairs, other=-1).to(tl.int32)
        counts += tl.sum((x[:, None] == e[None, :]).to(tl.int32), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    tl.store(num_padded_ptr, tl.sum(padded, 0))

    BLOCK_B: tl.constexpr = 32
    for b0 in range(0, MAX_ENTRIES // BLOCK_M, BLOCK_B):  # block b's expert: groups ending at or before it
        b = b0 + tl.arange(0, BLOCK_B)
        before = tl.sum(((ends[None, :] <= b[:, None] * BLOCK_M) & (e < E)[None, :]).to(tl.int32), 1)
        tl.store(block_expert_ptr + b, tl.minimum(before, E - 1), mask=b * BLOCK_M < num_entries)
    for s0 in range(0, MAX_ENTRIES, 256):
        s = s0 + tl.arange(0, 256)
        tl.store(pairs_ptr + s, tl.zeros((256,), dtype=tl.int32) + num_pairs, mask=s < num_entries)
    tl.debug_barrier()  # the padding fill lands before the pairs written over it

    cursor = ends - padded  # next free entry of each group
    for c0 in range(0, MAX_PAIRS, CHUNK):
        p = c0 + tl.arange(0, CHUNK)
        ok = p < num_pairs
        x = tl.load(ids_ptr + p, mask=ok, other=-1).to(tl.int32)
        onehot = (x[:, None] == e[None, :]).to(tl.int32)  # [CHUNK, BLOCK_E]
        rank = tl.sum(onehot * (tl.cumsum(onehot, 0) - 1), 1)  # earlier pairs of the same expert in the slice
        base = tl.sum(onehot * cursor[None, :], 1)
        tl.store(pairs_ptr + base + rank, p, mask=ok)
        cursor += tl.sum(onehot, 0)


def launch_config(num_pairs: int, num_experts: int) -> dict[str, int]:
    """16-pair slices against up to 512 experts: 8K-element one-hot tiles over 16 warps (8 spill at one slice)."""
    return dict(CHUNK=16, BLOCK_E=triton.next_power_of_2(num_experts), num_warps=16)


def align_pairs_by_expert_fwd(ids: torch.Tensor, num_experts: int,
                              block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (sorted_pairs int32 [P], block_expert int32 [P // block_m], num_padded int32 [1]), equal to
    `align.align_pairs_by_expert` (block_expert past num_padded: also clamped to the last expert)."""
    n = ids.numel()
    assert 0 < n <= DECODE_MAX_PAIRS, "the one-program align is for decode-sized batches"
    flat = ids.reshape(-1)
    flat = flat if flat.is_contiguous() else flat.contiguous()
    P = max_padded_pairs(n, num_experts, block_m)
    max_pairs = triton.next_power_of_2(n)
    max_entries = triton.cdiv(max_padded_pairs(max_pairs, num_experts, block_m), 256) * 256
    pairs = torch.empty(P, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(P // block_m, dtype=torch.int32, device=ids.device)
    num_padded = torch.empty(1, dtype=torch.int32, device=ids.device)
    cfg = launch_config(n, num_experts)
    moe_align_kernel[(1,)](flat, pairs, block_expert, num_padded, n, P, E=num_experts, BLOCK_M=block_m,
                           MAX_PAIRS=max(max_pairs, cfg["CHUNK"]), MAX_ENTRIES=max_entries, **cfg)
    return pairs, block_expert, num_padded
