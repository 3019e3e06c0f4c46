"""C kernels for a CPU worker's decode and verify rows: one call per layer where torch takes ~100 small ops.

- `deltanet.py` (`deltanet_steps.c`): a DeltaNet layer's conv, gates, gated delta rule and gated norm.
- `attention.py` (`attention_steps.c`): a gated attention layer's norms, RoPE, KV-cache write, attention and gate.
- `argmax.py` (`argmax.c`): greedy rows' argmax over 16-bit logits, without widening them first.
- `moe_hidden.py` (`moe_hidden.c`): a small MoE block's rows between its two packed GEMMs (SiLU products times
  the routing weights, the shared expert's gate), bf16.
- `norms.py` (`norms.c`): zero-centred RMSNorm rows, with the residual add before it (kernels/norms dispatches
  here for every row count, prefill chunks included: the norm's numbers are the same whatever the batch).
- `int8_head.py` (`int8_head.c`): the int8 LM head MTP drafts are drawn from (worker/draft_head.py), integer dot
  products.
- `lm_head.py` (`lm_head.c`): the bf16 LM head (worker/cpu_linear.py), AVX512-BF16 dot products; built only for a
  CPU that has them.

The two heads, the argmax and the two layer passes split their work over torch's own OpenMP threads
(`openmp_threads`, from what the library's regions really get: `threads.c`; build.py says how the library comes
to share torch's runtime), the layer passes only above a
work threshold (their PARALLEL_MIN_WORK); an item's arithmetic is the same on any thread, so results never depend
on the count.

They run for CPU tensors (the layers' and norms' in fp32 or bf16, the argmax's in bf16 or fp16, the MoE rows' in
bf16) when `kernels_mode()` is auto and the library builds (`build.py`: the machine's C compiler, once per source
/ compiler / CPU; none, or a failed build, leaves the torch paths, and `describe()` says why in the worker's
start-up log). In the layers, prefill chunks always take the torch paths, decode and verify rows always these,
so a sequence's numbers never depend on what else is in its step. Each kernel's reference is its torch path (the
layer's; torch.argmax; kernels/norms/reference.py; PackedDenseMoE.hidden_reference; int8_head.reference;
lm_head.reference); tests/test_cpu_deltanet.py, test_cpu_attention.py, test_cpu_argmax.py, test_cpu_norms.py,
test_cpu_moe_hidden.py, test_cpu_int8_head.py and test_cpu_lm_head.py hold them together.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from pathlib import Path

import torch

from qnext.kernels.cpu import build
from qnext.kernels.dispatch import kernels_mode, use_triton

DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16"}  # what the entry points take


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, how decode rows run) or (None, why the torch paths)."""
    try:
        path = build.library_path()
        return ctypes.CDLL(str(path)), f"compiled C token steps ({path})"
    except (build.BuildError, OSError) as e:
        return None, f"torch references (the C token steps did not build: {e})"


def entry(name: str, args: type[ctypes.Structure]) -> ctypes._CFuncPtr:
    """The library's `int name(const struct *args)` entry point."""
    lib = library()[0]
    assert lib is not None, "no library: check runs() first"
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = [ctypes.POINTER(args)], ctypes.c_int
    return fn


def runs(x: torch.Tensor) -> bool:
    """Whether rows like x (device, dtype) can take the C kernels here and now."""
    return (x.is_cpu and x.dtype in DTYPE_NAMES and not use_triton(x)
            and kernels_mode() == "auto" and library()[0] is not None)


VOCAB_BLOCK = 16  # vocabulary rows per packed block of the two heads' weights (int8_head.c, lm_head.c)


def vocab_blocks(weight: torch.Tensor, group: int) -> torch.Tensor:
    """A head's weight [V, H] as the two heads' C kernels read it: blocks of VOCAB_BLOCK vocabulary rows, each
    [ceil(H / group)][VOCAB_BLOCK][group] (`group` consecutive hidden columns of the block's rows per 64 bytes:
    4 int8 or 2 bf16), zero past V and H."""
    V, H = weight.shape
    Vp, Hp = -(-V // VOCAB_BLOCK) * VOCAB_BLOCK, -(-H // group) * group
    w = torch.zeros(Vp, Hp, dtype=weight.dtype)
    w[:V, :H] = weight.detach()
    return w.view(Vp // VOCAB_BLOCK, VOCAB_BLOCK, Hp // group, group).permute(0, 2, 1, 3).contiguous()


_OPENMP_RUNTIME = re.compile(r"/lib(?:gomp|iomp5|omp)[-.\w]*\.so[.\d]*$")


@functools.cache
def _one_openmp_pool() -> bool:
    """Whether every OpenMP call in the process, torch's and the library's, lands in one runtime once the library
    is loaded: a runtime preloaded (LD_PRELOAD, as `--worker-preload` does with libiomp5) interposes its symbols
    for every library, else there must be just one mapped. Read once: settled when the library loads."""
    library()
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    runtimes = {line.split()[-1] for line in maps.splitlines() if _OPENMP_RUNTIME.search(line)}
    preloaded = {os.path.realpath(p) for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()}
    return len(runtimes) == 1 or any(os.path.realpath(r) in preloaded for r in runtimes)


@functools.cache
def _parallel_library() -> bool:
    """Whether the library's parallel regions get more than one thread (built with OpenMP; threads.c). Asked
    only once one pool is known to serve it, so the question itself starts no second pool."""
    fn = library()[0].openmp_team_size
    fn.argtypes, fn.restype = [ctypes.c_int64], ctypes.c_int64
    return fn(2) > 1


def openmp_threads() -> int:
    """How many threads the library's parallel loops may use: torch's intra-op count when those loops run on
    torch's own OpenMP pool (build.py), else 1, so they never start a second pool of threads that would compete
    with torch's for the same cores; 1 as well for a library built without OpenMP."""
    return torch.get_num_threads() if _one_openmp_pool() and _parallel_library() else 1


def describe(device: torch.device, act: torch.dtype, state: torch.dtype) -> str:
    """Which path a worker's decode and verify rows take, for its start-up log (builds the library)."""
    if device.type != "cpu":
        return "the device's kernels (the C token steps are for CPUs)"
    if act not in DTYPE_NAMES or state not in DTYPE_NAMES:
        return f"torch references (the C token steps take fp32 / bf16, not {act} with a {state} state)"
    if kernels_mode() != "auto":
        return "torch references (QNEXT_KERNELS=reference)"
    lib, how = library()
    return how if lib is None else f"{how}; their parallel loops on {openmp_threads()} OpenMP thread(s)"


__all__ = ["DTYPE_NAMES", "VOCAB_BLOCK", "describe", "entry", "library", "openmp_threads", "runs",
           "vocab_blocks"]
