"""The LM head MTP drafts are drawn from: on a CPU with bf16 / fp16 weights, an int8 copy of the model's LM head.

A draft pass needs one row of logits per drafting request, and at one stream that is one row: the LM head is
then a pass over its whole weight (151,936 rows) for a single dot product per row, memory-bound, and with k = 2
it runs twice per step for the drafts on top of the verify forward's own. torch's weight-only int8 kernel
(`torch._weight_int8pack_mm`, CPU) reads half the bytes. Measured on the 2-core AVX512-BF16 box, one row,
vocabulary x 256: packed bf16 2.1 ms, int8 1.2 ms; in the engine (aligned tiny checkpoint, batch 1, k = 2, the
int8 draft head on and off in alternate steps, 400 steps) the verify step 18.7 -> 16.5 ms. The int8 kernel is a
dot product loop per row, its time growing with every row, while oneDNN's packed bf16 GEMM hardly grows: they
tie at about two rows, so only single-row passes use the int8 head (`MAX_ROWS`).

Outputs do not change. The target verifies every draft with its own full-precision logits: a greedy request
accepts a draft only where it is the target's argmax, and a sampled request runs the acceptance rule with the q
this head produced, which leaves the target's distribution exact for any q. Only the acceptance rate can move:
each logit moves by at most half a quantisation step of its row times sum |h| (one scale per vocabulary row,
max |w| / 127), which flips an argmax only where the top two logits are that close.
"""

from __future__ import annotations

import torch

MAX_ROWS = 1  # passes with more rows use the full head (see above)


class Int8DraftHead:
    """logits = h @ (q * scale)^T with q int8 [V, H] and one scale per vocabulary row, in h's dtype like
    `compute_logits`."""

    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.qweight = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.scale = scale.to(weight.dtype)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(hidden, self.qweight, self.scale)


def draft_head(choice: str, lm_head_weight: torch.Tensor) -> Int8DraftHead | None:
    """The int8 head where `choice` is auto and it pays (a bf16 / fp16 LM head on a CPU), else None: the model's
    own head. A torch without the CPU kernel keeps the full head too."""
    w = lm_head_weight
    if choice != "auto" or w.device.type != "cpu" or w.dtype not in (torch.bfloat16, torch.float16):
        return None
    head = Int8DraftHead(w)
    try:
        head(torch.zeros(1, w.shape[1], dtype=w.dtype))
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
    return head
