"""What a kernel case is and how one is measured: the shapes (the model's, or --small's), the run's settings
(`Bench`), a result row, the measurement of a Triton op against its reference, and the device's copy bandwidth."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.bench_common import rel_err

PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16; the bound for the compute-bound rows (prefill, big MoE)
# Gated delta rule chunked prefill, one sequence of 8192 tokens, one Qwen3-Next layer (16 key / 32 value heads
# of 128), H200: the figures published for FLA's Triton kernels and for FlashQLA.
PUBLISHED_GDR_8K = "published H200, T=8192, per layer: FLA 472 us, FlashQLA 280 us"


@dataclass(frozen=True)
class Shapes:
    """Every dimension the cases use: the model's, or --small's (every one shrunk, so that the Triton
    interpreter runs all cases on a CPU in seconds; FP8 dims stay multiples of the 128 block)."""
    hidden: int = 2048
    conv_dim: int = 8192
    conv_k: int = 4
    heads_q: int = 16
    heads_kv: int = 2
    head_dim: int = 256
    kv_block: int = 16
    experts: int = 512
    top_k: int = 10
    moe_intermediate: int = 512
    decode_context: int = 4096  # context of every sequence in the attention decode rows
    fp8_linears: tuple[tuple[str, int, int], ...] = (
        ("in_proj_qkvz", 12288, 2048), ("q_proj", 8192, 2048), ("out_proj", 2048, 4096),
        ("shared_up", 512, 2048), ("shared_down", 2048, 512))
    prefill: int = 4096
    prefill_mid: int = 8192  # the gated delta rule's published comparison
    prefill_long: int = 32768
    gdr_hk: int = 16  # key heads
    gdr_hv: int = 32  # value heads
    gdr_d: int = 128  # dk = dv
    batch_sizes: str = "1,64,256"


MODEL = Shapes()
SMALL = Shapes(hidden=256, conv_dim=64, heads_q=4, heads_kv=2, head_dim=32, experts=8, top_k=2,
               moe_intermediate=128, decode_context=40,
               fp8_linears=(("in_proj_qkvz", 384, 256), ("out_proj", 256, 128)),
               prefill=70, prefill_mid=100, prefill_long=130, gdr_hk=2, gdr_hv=4, gdr_d=32, batch_sizes="1,3")


@dataclass
class Row:
    op: str
    shape: str
    triton_us: float | None
    reference_us: float | None  # None: not timed (above --max-reference-tokens, or no reference)
    min_bytes: int
    gbps: float | None
    bound_pct: float | None  # bandwidth-bound time / Triton time
    rel_err: float | None  # None: no reference run (above --max-check-tokens)
    extra: str = ""
    timings: dict[str, float | None] = field(default_factory=dict)  # other implementations' us, by name


class Skip(Exception):
    """A case that cannot run here (a missing package, a CUDA-only comparison on CPU): recorded as skipped,
    not as an error."""


@dataclass
class Bench:
    """The run's settings, handed to every case builder."""
    device: str
    shapes: Shapes
    batch_sizes: list[int]
    peak_gbps: float
    warmup_ms: float
    rep_ms: float
    max_reference_tokens: int
    max_check_tokens: int
    long: bool  # include the 32K-token cases
    prefill_batches: bool  # the token-count ops (GEMMs, norms, MoE) also at the prefill size

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def bench_us(self, fn: Callable[[], object]) -> float:
        """Median of do_bench on CUDA; on CPU (the interpreter, seconds a call) one timed call after the one
        the caller made, which is all a plumbing check needs."""
        if self.cuda:
            import triton.testing
            return triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median") * 1e3
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6

    def token_counts(self) -> list[int]:
        """Batch sizes of the ops that only see a token count: the decode batches, then the prefill."""
        extra = [self.shapes.prefill] if self.prefill_batches and self.shapes.prefill not in self.batch_sizes else []
        return self.batch_sizes + extra


Case = tuple[str, str, Callable[[], Row]]  # (op, shape, measure): builders yield them lazily, one at a time


def copy_gbps(b: Bench) -> float:
    """Device copy bandwidth: read + write of a 2 GiB buffer (64 MiB on CPU, where it only feeds the columns)."""
    src = torch.empty((2 << 30) if b.cuda else (64 << 20), dtype=torch.uint8, device=b.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() / (b.bench_us(lambda: dst.copy_(src)) * 1e-6) / 1e9


def measure(b: Bench, op: str, shape: str, fast: Callable[[], torch.Tensor],
            ref: Callable[[], torch.Tensor] | None, nbytes: int, tokens: int, extra: str = "",
            cheap_ref: bool = False) -> Row:
    """One row: rel_err from one call of each (the reference only up to --max-check-tokens), then the timings
    (the reference's only up to --max-reference-tokens). `cheap_ref`: a fast stand-in reference (SDPA), run
    and timed at any size."""
    out = fast()
    err = rel_err(out, ref()) if ref is not None and (cheap_ref or tokens <= b.max_check_tokens) else None
    del out
    t_fast = b.bench_us(fast)
    t_ref = b.bench_us(ref) if ref is not None and (cheap_ref or tokens <= b.max_reference_tokens) else None
    gbps = nbytes / (t_fast * 1e-6) / 1e9
    return Row(op, shape, t_fast, t_ref, nbytes, gbps, 100 * gbps / b.peak_gbps, err, extra)


def tflops(flops: float, us: float | None) -> float:
    return flops / (us * 1e-6) / 1e12 if us else float("nan")


def squeeze(text: str, head: int = 60, tail: int = 140) -> str:
    """One line; a long message keeps its start and its end (PyTorch's scaled_mm errors list every form it
    knows, then say what they got last)."""
    text = " ".join(text.split())
    return text if len(text) <= head + tail + 5 else text[:head] + " ... " + text[-tail:]
