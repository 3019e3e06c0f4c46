"""`--dtype auto`: which dtype the weights and activations run in, and why (the start-up line says both).

The checkpoint's dtype (its config's `torch_dtype`; bfloat16 for the FP8 checkpoints too, whose non-FP8 tensors
and activations are bfloat16) where the device computes it natively, float32 otherwise. On CUDA that is always
the checkpoint's half type. On a CPU it depends on the instruction set: bf16 matmuls are fast only with AVX512-BF16
or AMX-BF16 (x86) or the BF16 extension (aarch64); without them torch emulates bf16 and float32 is faster and more
accurate. Measured on a 2-core AVX512-BF16 CPU at batch 16 on a bf16 checkpoint: 688 tok/s in bf16 vs 393 in
float32 (issue 18), which is why `auto` no longer means float32 on every CPU."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import torch

HALF_TYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU feature flags (/proc/cpuinfo "flags" on x86, "Features" on aarch64) that give native matmuls per half type
_CPU_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16", "bf16"), "float16": ("avx512_fp16", "amx_fp16", "fphp")}


@cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags; empty where /proc/cpuinfo does not exist (macOS, Windows)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def choose_dtype(requested: str, checkpoint_dtype: str, device: torch.device,
                 flags: frozenset[str] | None = None) -> tuple[torch.dtype, str]:
    """(dtype, why). `requested`: a dtype name or "auto"; `checkpoint_dtype`: the config's torch_dtype."""
    if requested != "auto":
        return getattr(torch, requested), "--dtype"
    half = HALF_TYPES.get(checkpoint_dtype)
    if device.type == "cuda":
        if half is None:
            return torch.bfloat16, f"auto: the checkpoint is {checkpoint_dtype}; bfloat16 on CUDA"
        return half, "auto: the checkpoint's dtype"
    if half is None:
        return torch.float32, f"auto: the checkpoint's dtype is {checkpoint_dtype}"
    flags = cpu_flags() if flags is None else flags
    native = [f for f in _CPU_FLAGS[checkpoint_dtype] if f in flags]
    if native:
        return half, f"auto: the checkpoint's dtype; this CPU computes it natively ({native[0]})"
    return torch.float32, (f"auto: the checkpoint is {checkpoint_dtype} but this {platform.machine() or 'CPU'} "
                           f"has none of {', '.join(_CPU_FLAGS[checkpoint_dtype])}, so float32 is faster")
