"""Causal GQA attention over the paged KV cache (docs/model.md §5): the Triton kernels on CUDA
(`triton_attention.py`), the torch reference elsewhere. triton is imported only when a kernel runs."""

import torch

from qnext.kernels.attention import reference
from qnext.kernels.dispatch import use_triton
from qnext.kernels.step_metadata import StepMetadata


def paged_attention_varlen(
    q: torch.Tensor,  # [T, Hq, D], RoPE applied
    k: torch.Tensor,  # [T, Hkv, D], RoPE applied
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], written in place
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64 flat slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    query_lens: list[int],  # new tokens per sequence
    context_lens: list[int],  # cached + new tokens per sequence
    scale: float,
    step_meta: StepMetadata | None = None,  # the step's shared device tables (Triton only)
    k_scale: torch.Tensor | None = None,  # [num_blocks, block_size, Hkv] float32: the caches are FP8
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [T, Hq, D] in q's dtype
    """Writes this step's k/v into the cache at slot_mapping (quantised, with the scales, into an FP8 cache),
    then each sequence's new tokens attend causally over its whole context read back through its block table."""
    if not use_triton(q):
        return reference.paged_attention_varlen(q, k, v, k_cache, v_cache, slot_mapping, block_tables, query_lens,
                                                context_lens, scale, k_scale, v_scale)
    from qnext.kernels.attention.triton_attention import paged_attention_fwd, write_kv_fwd
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    write_kv_fwd(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return paged_attention_fwd(q, k_cache, v_cache, block_tables, query_lens, context_lens, scale,
                               step_meta=step_meta, k_scale=k_scale, v_scale=v_scale)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Only the cache write of `paged_attention_varlen`: k/v [T, Hkv, D] into the cache at slot_mapping (< 0:
    skipped), quantised with the scales into an FP8 cache. For rows whose attention output nobody reads."""
    if not use_triton(k):
        reference.write_kv(k_cache, v_cache, k, v, slot_mapping, k_scale, v_scale)
        return
    from qnext.kernels.attention.triton_attention import write_kv_fwd
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    write_kv_fwd(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


__all__ = ["paged_attention_varlen", "write_kv"]
