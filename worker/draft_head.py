"""The LM head MTP drafts are drawn from: on a CPU with bf16 / fp16 weights, an int8 copy of the model's LM head.

A draft pass needs one row of logits per drafting request, and at one stream that is one row: the LM head is
then a pass over its whole weight (151,936 rows) for a single dot product per row, memory-bound, and with k = 2
it runs twice per step for the drafts on top of the verify forward's own. An int8 copy reads half the bytes.

Two kernels compute it. Where kernels/cpu builds, `int8_head.c`: integer dot products (AVX512-VNNI where the CPU
has it) on torch's OpenMP threads, rows up to `C_MAX_ROWS`. Measured on the 2-core AVX512-BF16 box, vocabulary x
128 with the caches flushed, ms per pass at 1 / 2 / 3 / 4 / 8 rows: C 0.50 / 0.57 / 0.64 / 0.95 / 1.79, torch's
`_weight_int8pack_mm` 0.74 / 0.92 / 1.24 / 1.50 / 2.9, the packed bf16 head 1.32 / 1.26 / 1.46 / 1.31 / 1.51
(x 256: C 1.08 / 1.16 / 1.36 / 1.44 / 2.72, bf16 2.88 / 2.71 / 2.75 / 2.67 / 3.47); in the engine (aligned tiny
checkpoint, one sequence, k = 2, 10 alternating rounds) 0.72 -> 0.45 ms a pass. The full head those passes
would use otherwise is now kernels/cpu/lm_head.c where the CPU has AVX512-BF16; against it (calls interleaved,
two runs, ms at 1 / 2 / 4 / 6 rows) the int8 head still wins up to 4 rows: x 128 int8 0.65-0.69 / 0.66-0.96 /
1.10-1.58 / 1.74-1.83, bf16 0.94-1.16 / 0.97-1.00 / 1.05-1.12 / 1.14-1.20 (a tie at 4); x 256 int8 1.22-1.34 /
1.33-1.46 / 1.55-1.81 / 2.54-3.59, bf16 2.11-2.23 / 2.10-2.29 / 2.16-2.27 / 2.21-2.46. Elsewhere torch's kernel, which
widens each weight to a float and grows with every row: it ties with the bf16 head at about two rows, so it takes
single-row passes only (`TORCH_MAX_ROWS`).

Outputs do not change. The target verifies every draft with its own full-precision logits: a greedy request
accepts a draft only where it is the target's argmax, and a sampled request runs the acceptance rule with the q
this head produced, which leaves the target's distribution exact for any q. Only the acceptance rate can move:
each logit moves by at most half a quantisation step of its row times sum |h| (one scale per vocabulary row,
max |w| / 127), which flips an argmax only where the top two logits are that close. (The C kernel also rounds the
activations to 16-bit integers against the row's largest: a further ~1.5e-5 of max |h| per element.)
"""

from __future__ import annotations

import torch

from qnext.kernels.cpu import int8_head as int8_head_cpu

C_MAX_ROWS = 4  # the C kernel's passes up to here (the C bf16 head ties at 4 rows at hidden 128, wins at 6)
TORCH_MAX_ROWS = 1  # torch's kernel: single-row passes (see above)


def quantize_rows(weight: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """q [V, H] int8 and fp32 scales [V] with weight ~ q * scale: one scale per row, max |w| / 127. In chunks of
    rows: a float32 copy of a whole 151,936 x 2048 head would be 1.2 GB for a moment."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=torch.float32)
    for i in range(0, weight.shape[0], chunk):
        w = weight[i:i + chunk].detach().float()
        s = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        q[i:i + chunk], scale[i:i + chunk] = (w / s[:, None]).round().clamp(-127, 127), s
    return q, scale


class Int8DraftHead:
    """logits = h @ (q * scale)^T with q int8 [V, H] and one scale per vocabulary row, in h's dtype like
    `compute_logits`; `takes(rows)` says whether a pass of that many rows should use it."""

    def __init__(self, weight: torch.Tensor, packed: int8_head_cpu.PackedInt8Weight | None = None) -> None:
        """`packed`: the C kernel's weights of this same quantisation, already made (the greedy screen's,
        worker/greedy_screen.py), so the head is not held twice; torch's copy is then made only if a pass needs it
        (the C kernel not running: QNEXT_KERNELS=reference)."""
        self.weight, self._torch = weight, None
        if packed is None:
            qweight, scale = quantize_rows(weight)
            # torch's kernel takes the scales in the activations' dtype
            self._torch = (qweight, scale.to(weight.dtype))
            probe = torch.zeros(1, weight.shape[1], dtype=weight.dtype)
            packed = int8_head_cpu.pack(qweight, scale) if int8_head_cpu.runs(probe) else None
        self.packed = packed

    def takes(self, rows: int) -> bool:
        return rows <= (C_MAX_ROWS if self.packed is not None else TORCH_MAX_ROWS)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and int8_head_cpu.runs(hidden):
            return int8_head_cpu.int8_head(hidden, self.packed)
        if self._torch is None:
            qweight, scale = quantize_rows(self.weight)
            self._torch = (qweight, scale.to(self.weight.dtype))
        return torch._weight_int8pack_mm(hidden, *self._torch)


def draft_head(choice: str, lm_head_weight: torch.Tensor,
               packed: int8_head_cpu.PackedInt8Weight | None = None) -> Int8DraftHead | None:
    """The int8 head where `choice` is auto and it pays (a bf16 / fp16 LM head on a CPU), else None: the model's
    own head. A torch without the CPU kernel keeps the full head too. `packed`: as Int8DraftHead takes it."""
    w = lm_head_weight
    if choice != "auto" or w.device.type != "cpu" or w.dtype not in (torch.bfloat16, torch.float16):
        return None
    head = Int8DraftHead(w, packed)
    try:
        head(torch.zeros(1, w.shape[1], dtype=w.dtype))
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
    return head
