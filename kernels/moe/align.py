"""Token-expert pairs grouped by expert into BLOCK_M-aligned blocks, for the grouped GEMMs of `triton_moe.py`.

Pair p = t * top_k + j is token t's j-th choice, expert ids[t, j]. The pairs are sorted by expert (stably, so a
token's pairs keep their order) and each expert's run is padded to a multiple of BLOCK_M with the sentinel
T * top_k, so that every block of BLOCK_M sorted entries belongs to one expert and a GEMM program multiplies one
block by one expert's weights.

Plain torch, a dozen small ops with no host synchronisation (so the step can be captured in a CUDA graph): the
buffers are sized for the worst case, T * top_k pairs + (BLOCK_M - 1) padding for each expert that can be
non-empty (at most min(E, T * top_k) of them), and GEMM programs past the real end exit at once. vLLM does the
same job in one CUDA kernel (moe_align_block_size); if these launches show at decode, that is the next kernel.
"""

from __future__ import annotations

import torch


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Length of the sorted-pair buffer: enough for any routing of num_pairs pairs, a multiple of block_m."""
    worst = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-worst // block_m) * block_m


def align_pairs_by_expert(ids: torch.Tensor, num_experts: int,
                          block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [T, k] expert of each pair -> (sorted_pairs int32 [P]: pair ids grouped by expert, each group padded
    with T*k to a multiple of block_m; block_expert int32 [P // block_m]: the expert of each block (meaningless
    past the end); num_padded int32 [1]: entries in use, a multiple of block_m). P = max_padded_pairs(T*k, ...)."""
    flat = ids.reshape(-1)
    n = flat.numel()
    P = max_padded_pairs(n, num_experts, block_m)
    order = flat.argsort(stable=True)  # pairs in expert order
    # [E] pairs per expert; not torch.bincount, which on CUDA reads max(ids) back to the host (a sync)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    sorted_experts = flat[order]
    rank = torch.arange(n, device=ids.device) - (counts.cumsum(0) - counts)[sorted_experts]  # rank within expert
    dest = (padded_end - padded)[sorted_experts] + rank
    sorted_pairs = torch.full((P,), n, dtype=torch.int32, device=ids.device)
    sorted_pairs[dest] = order.to(torch.int32)
    block_start = torch.arange(0, P, block_m, device=ids.device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True).clamp(max=num_experts - 1)
    return sorted_pairs, block_expert.to(torch.int32), padded_end[-1:].to(torch.int32)
