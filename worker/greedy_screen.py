"""Exact greedy tokens on a CPU from an int8 screen of the LM head: the bf16 head's argmax, read at a fraction of it.

A greedy row needs one number from the LM head, the index of its largest logit, and at one row the head is a
pass over its whole weight (151,936 x H bf16) bound by memory. An int8 copy of the weight (one scale per
vocabulary row, worker/draft_head.py's quantisation) is half the bytes, and its logits a_v lie within a bound E
of the bf16 head's e_v for every v (below). So only the vocabulary rows whose a_v is within 2E (and a rounding
margin) of the row's largest a can hold the bf16 head's argmax; those rows' bf16 logits are computed by the same C
kernel (`kernels/cpu/lm_head.c` over the packed blocks that hold them), and their argmax, first index among
equals, is the token the full head gives.

When it pays, measured on the 2-core box (calls interleaved, caches flushed, bf16 head + argmax against the
screen, ms): vocabulary x 256 at 1 / 2 / 3 / 4 rows 1.77 / 1.79 / 1.83 / 1.86 against 1.32 / 1.75 / 1.99 /
2.16; x 128 1.07 / 1.12 / 1.14 / 1.10 against 1.23 / 1.72 / 2.12 / 2.45. The int8 pass grows with every row (its
activations are 16-bit integers, two integer products per weight) and the screen's own vocabulary-wide work
(~0.3 ms: the block maxima, the candidates) is there at any width, so it serves one row (`MAX_ROWS`) of a head
of at least `MIN_WEIGHT_ELEMENTS`. In the engine, one row alternating the screen and the full head step by step
(vs-vLLM checkpoint, hidden 256): a decode step 1.11-1.15x faster.

The bound, per row x (H columns) and vocabulary row v (w_v bf16, q_v int8, s_v its fp32 scale):
- weights: |w_vi - s_v q_vi| <= s_v / 2 (plus fp32 rounding of w / s_v), so sum_i |x_i| |.| <= 0.501 s_v |x|_1;
- activations: the kernel rounds x to 16-bit integers against max |x| (steps of s_x = max |x| / 32767), so
  |x_i - s_x xq_i| <= s_x / 2 (plus float rounding), and sum_i |.| |s_v q_vi| <= s_x (|w_v|_1 + H s_v);
- arithmetic: the bf16 head sums H fp32 products in order (relative error <= H 2^-24 of sum |x_i w_vi|), the
  int8 head converts and scales its integer sums (a few 2^-24): both below (H 2^-22 + 2^-16) |x|_inf B_v, with
  B_v = |w_v|_1 + H s_v;
- E = 0.501 |x|_1 max s_v + (s_x + (H 2^-22 + 2^-16) |x|_inf) max B_v, one bound per row (the maxima over v,
  so one comparison per logit picks the candidates);
- the logits are rounded to bf16 before the argmax, and values up to two bf16 steps below the largest may round
  to it: the margin 2^-6 (|max a| + E) covers that.
A row whose candidates exceed `MAX_CANDIDATES`, or whose x is not finite, takes the full head (`screen` returns
None): the tokens are the same either way, only the time differs.
"""

from __future__ import annotations

import math

import torch

from qnext.kernels import cpu
from qnext.kernels.cpu import int8_head as int8_head_cpu
from qnext.kernels.cpu import lm_head as lm_head_cpu
from qnext.worker.draft_head import quantize_rows
from qnext.worker.sampler import row_argmax

MAX_ROWS = 1  # the rows the screen serves (see above)
MIN_WEIGHT_ELEMENTS = 32 << 20  # V x H: below it (151,936 x 128) the screen loses even at one row
MAX_CANDIDATES = 4096  # per row on average; beyond it the candidates' own pass would cost more than it saves
ROUNDING_MARGIN = 2.0 ** -6


class GreedyScreen:
    """Built from the LM head's bf16 weight [V, H] and its lm_head.c packing; `screen(x)` gives the greedy
    tokens of rows x or None (then the caller computes the full logits)."""

    def __init__(self, weight: torch.Tensor, head_packed: torch.Tensor, int8: int8_head_cpu.PackedInt8Weight) -> None:
        V, H = weight.shape
        self.vocab, self.head_packed, self.int8 = V, head_packed, int8
        scale = int8.scale.double()
        self.max_scale = float(scale.max())
        l1 = torch.cat([weight[i:i + 8192].detach().double().abs().sum(dim=1) for i in range(0, V, 8192)])
        self.max_b = float((l1 + H * scale).max())  # B_v = |w_v|_1 + H s_v (module docstring), rows in chunks
        self.arith = H * 2.0 ** -22 + 2.0 ** -16

    @staticmethod
    def build(weight: torch.Tensor, head_packed: torch.Tensor | None) -> GreedyScreen | None:
        """A screen for the LM head `weight` where lm_head.c serves it (`head_packed`), the int8 kernel runs, the
        weights are finite and the head is wide enough to pay; else None."""
        if (head_packed is None or weight.dtype != torch.bfloat16 or weight.numel() < MIN_WEIGHT_ELEMENTS
                or not (lm_head_cpu.available() and int8_head_cpu.runs(weight[:1]))
                or not bool(torch.isfinite(weight).all())):
            return None
        qweight, scale = quantize_rows(weight)
        return GreedyScreen(weight, head_packed, int8_head_cpu.pack(qweight, scale))

    def bounds(self, l1s: list[float], infs: list[float]) -> list[float]:
        """E per row from its sum |x| and max |x|: every |a_v - e_v| is at most this (module docstring)."""
        return [0.501 * l1 * self.max_scale + (x_inf / 32767.0 + self.arith * x_inf) * self.max_b + 1e-30
                for l1, x_inf in zip(l1s, infs)]

    def takes(self, rows: int) -> bool:
        return 0 < rows <= MAX_ROWS

    def screen(self, x: torch.Tensor) -> list[int] | None:
        """The greedy tokens of bf16 rows x [rows, H]: the first index of each row's largest bf16 logit,
        as the full head and row_argmax give it; None where a row cannot be screened (the caller's full head)."""
        if not (lm_head_cpu.runs(x) and int8_head_cpu.runs(x)):
            return None  # the C kernels are off now (QNEXT_KERNELS=reference): the head is oneDNN's, so is the argmax
        xf = x.float()
        xa = xf.abs()
        l1s, infs = xa.sum(dim=1).tolist(), xa.amax(dim=1).tolist()
        if not all(map(math.isfinite, l1s)):  # a NaN or inf in x (or a sum past fp32): the full head decides
            return None
        a = int8_head_cpu.int8_head(xf, self.int8)  # [rows, V] fp32
        # each block of 16 vocabulary rows by its largest a: the candidates' blocks are what the exact pass reads
        rows, full = a.shape[0], self.vocab // cpu.VOCAB_BLOCK * cpu.VOCAB_BLOCK
        block_top = a[:, :full].view(rows, -1, cpu.VOCAB_BLOCK).amax(dim=2)
        if full < self.vocab:
            block_top = torch.cat([block_top, a[:, full:].amax(dim=1, keepdim=True)], dim=1)
        thresholds = []
        for top, bound in zip(block_top.amax(dim=1).tolist(), self.bounds(l1s, infs)):  # Python floats: doubles
            floor = top - 2 * bound - ROUNDING_MARGIN * (abs(top) + bound)
            thresholds.append(floor - 2.0 ** -20 * abs(floor))  # its fp32 rounding stays below the double
        keep = block_top >= torch.tensor(thresholds)[:, None]
        blocks = keep.any(dim=0).nonzero()[:, 0]  # ascending: ids stay in vocabulary order
        if blocks.numel() * cpu.VOCAB_BLOCK > rows * MAX_CANDIDATES:
            return None
        exact = lm_head_cpu.lm_head(x, self.head_packed.index_select(0, blocks), blocks.numel() * cpu.VOCAB_BLOCK)
        if full < self.vocab and int(blocks[-1]) == full // cpu.VOCAB_BLOCK:
            padding = cpu.VOCAB_BLOCK - (self.vocab - full)  # the last block's zero rows past V: logits of 0
            exact[:, exact.shape[1] - padding:] = -float("inf")
        starts = blocks.tolist()
        return [starts[i // cpu.VOCAB_BLOCK] * cpu.VOCAB_BLOCK + i % cpu.VOCAB_BLOCK
                for i in row_argmax(exact).tolist()]  # the full path's argmax: the first of equal maxima
