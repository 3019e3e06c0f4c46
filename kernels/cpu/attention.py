"""A gated attention layer's decode tokens and speculative-verify chunks in one C call per layer
(`attention_steps.c`): q / k norms, RoPE, the KV-cache write, causal attention over the paged context and the
sigmoid output gate, from the q / k / v projections to the rows o_proj reads.

In torch that is ~80 small ops per layer (0.84 ms of an 8.7 ms decode step at one sequence on the 2-core box).
The reference is the layer's torch path (`worker/model.py` GatedAttention under `QNEXT_KERNELS=reference`: the
norm, RoPE and paged-attention references composed); tests/test_cpu_attention.py holds the two together. Not for
an FP8 KV cache (its rows are quantised on write: the torch path does that) or a cache in another dtype than the
activations. When it runs otherwise: the package's docstring (kernels/cpu/__init__.py).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from qnext.kernels import cpu
from qnext.kernels.cpu import DTYPE_NAMES

SEQ_FIELDS = 4  # the sequence table's columns: first row, tokens, context length (cached + new), block-table row
# new tokens x context x Hq x D, summed over the sequences, below which a call runs on one thread (the work items
# are (sequence, position, KV head)). Measured on the 2-core box (vs-vLLM checkpoint, 4 query heads of 32): one
# row at 8K context 1.09x, at 32K 1.12x, 16 rows at short contexts 1.03-1.04x with the DeltaNet split; below this
# the parallel region's start and end cost more than they save (see deltanet.py).
PARALLEL_MIN_WORK = 1 << 17


class _Args(ctypes.Structure):
    """struct attention_args of attention_steps.c, field for field."""

    _fields_ = [("num_seqs", ctypes.c_int64), ("seqs", ctypes.c_void_p),
                ("Hq", ctypes.c_int64), ("Hkv", ctypes.c_int64), ("D", ctypes.c_int64), ("R", ctypes.c_int64),
                ("qg", ctypes.c_void_p), ("qg_stride", ctypes.c_int64),
                ("k", ctypes.c_void_p), ("k_stride", ctypes.c_int64),
                ("v", ctypes.c_void_p), ("v_stride", ctypes.c_int64),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("block_size", ctypes.c_int64),
                ("slot_mapping", ctypes.c_void_p), ("block_tables", ctypes.c_void_p), ("bt_stride", ctypes.c_int64),
                ("out", ctypes.c_void_p), ("threads", ctypes.c_int64),
                ("parallel_min_work", ctypes.c_int64)]


@functools.cache
def _entries() -> dict[torch.dtype, ctypes._CFuncPtr]:
    """{activation dtype: entry point}."""
    return {act: cpu.entry(f"attention_token_steps_{a}", _Args) for act, a in DTYPE_NAMES.items()}


def runs(x: torch.Tensor, k_cache: torch.Tensor, k_scale: torch.Tensor | None) -> bool:
    """Whether an attention layer with activations like x over this KV pool takes the C token steps."""
    return k_scale is None and k_cache.dtype == x.dtype and cpu.runs(x)


def token_steps(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: torch.Tensor, heads: tuple[int, int, int],
                cos: torch.Tensor, sin: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, eps: float,
                scale: float, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                block_tables: torch.Tensor, out: torch.Tensor) -> None:
    """Run the sequences of `seqs` ([n, SEQ_FIELDS] int64: first row, tokens, context length, block-table row):
    write their rows' keys and values into the caches at slot_mapping, and give out's rows of them the gated
    attention output.

    qg [T, Hq * 2 D] (per head [query | gate]), k / v [T, Hkv * D]: rows may be strided, columns not; heads
    (Hq, Hkv, D); cos / sin [T, R] contiguous; q_norm / k_norm [D] fp32, 1 + w; the caches [blocks, block_size,
    Hkv, D] contiguous; slot_mapping [T] int64; block_tables [B, max_blocks] int32; out [T, Hq * D] contiguous; all
    activations and caches in one dtype."""
    Hq, Hkv, D = heads
    act = qg.dtype
    fn = _entries()[act]
    R = cos.shape[1]
    assert k.dtype == act and v.dtype == act and cos.dtype == act and sin.dtype == act and out.dtype == act
    assert k_cache.dtype == act and v_cache.dtype == act, "the KV cache in the activation dtype"
    assert qg.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and out.is_contiguous()
    assert qg.shape[1] == 2 * Hq * D and k.shape[1] == Hkv * D and v.shape[1] == Hkv * D and Hq % Hkv == 0
    assert cos.is_contiguous() and sin.is_contiguous() and cos.shape == sin.shape and 0 < R <= D and R % 2 == 0
    assert seqs.dtype == torch.int64 and seqs.is_contiguous() and seqs.dim() == 2 and seqs.shape[1] == SEQ_FIELDS
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[2:] == (Hkv, D)
    assert slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
    assert block_tables.dtype == torch.int32 and block_tables.is_contiguous()
    for p in (q_norm, k_norm):
        assert p.dtype == torch.float32 and p.is_contiguous() and p.numel() == D
    args = _Args(seqs.shape[0], seqs.data_ptr(), Hq, Hkv, D, R, qg.data_ptr(), qg.stride(0), k.data_ptr(),
                 k.stride(0), v.data_ptr(), v.stride(0), cos.data_ptr(), sin.data_ptr(), q_norm.data_ptr(),
                 k_norm.data_ptr(), eps, scale, k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1],
                 slot_mapping.data_ptr(), block_tables.data_ptr(), block_tables.shape[1], out.data_ptr(),
                 cpu.openmp_threads(), PARALLEL_MIN_WORK)
    if fn(ctypes.byref(args)) != 0:
        raise MemoryError("attention token steps: no memory for the call's scratch rows")


__all__ = ["SEQ_FIELDS", "runs", "token_steps"]
