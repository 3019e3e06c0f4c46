"""The sampler's cost per step over Qwen3-Next's 151,936-token vocabulary, with and without the shortcuts that
race only the columns a filter can keep and draw unfiltered rows by their inverse CDF (worker/sampler.py
`_draw`), measured in the same process.

The baseline is the same code with NUCLEUS_CANDIDATES set to the vocabulary size, which makes rows filtered by
top-p or min-p alone take the whole-vocabulary path (a full sort for top-p), as before the shortcut, and with
unfiltered rows raced over the whole vocabulary (the batch marked as having none), as before the inverse CDF
draw. Logits are
N(0, scale^2) per row (scale 4 by default: a peaked row, as a trained model's usually are; a flat row's nucleus
runs past the candidates and both columns then show the whole-vocabulary cost). Best of --repeats.

    python bench/sampler.py                       # batch 1 and 16, CPU
    python bench/sampler.py --device cuda --batch-sizes 1,64,256
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for bench.*; qnext itself: pip install -e .

import torch  # noqa: E402

from qnext.worker import sampler  # noqa: E402
from qnext.worker.sampler import PenaltyTokens, SamplingBatch, sample  # noqa: E402
from qnext.worker.token_history import TokenHistory  # noqa: E402
from qnext.worker.types import SamplingParams

VOCAB = 151936
CASES = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature 0.8": SamplingParams(temperature=0.8),
    "top_p 0.9": SamplingParams(temperature=0.8, top_p=0.9),
    "min_p 0.05": SamplingParams(temperature=0.8, min_p=0.05),
    "top_k 20 + top_p 0.8": SamplingParams(temperature=0.7, top_k=20, top_p=0.8),
}


def best_ms(logits: torch.Tensor, batch: SamplingBatch, repeats: int) -> float:
    sample(logits, batch)  # warm-up
    times = []
    for _ in range(repeats):
        if logits.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        sample(logits, batch).token_ids.tolist()  # the engine reads the tokens back every step
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--scale", type=float, default=4.0, help="logit standard deviation")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"sampler over {VOCAB} columns on {device}, logits N(0, {args.scale}^2), best of {args.repeats}")
    print(f"{'case':22s} {'batch':>5s} {'baseline ms':>12s} {'now ms':>8s} {'ratio':>6s}")
    shortcut = sampler.NUCLEUS_CANDIDATES
    for b in (int(x) for x in args.batch_sizes.split(",")):
        logits = (torch.randn(b, VOCAB, generator=torch.Generator().manual_seed(b)) * args.scale).to(device)
        for name, params in CASES.items():
            history = PenaltyTokens(TokenHistory.of([1], [], VOCAB))  # the prompt of one token 1, as before
            batch = SamplingBatch.build([params] * b, list(range(b)), [0] * b, [history] * b, [[]] * b, VOCAB,
                                        device)
            sampler.NUCLEUS_CANDIDATES = VOCAB  # baseline: no nucleus shortcut, every sampling row races
            raced = dataclasses.replace(batch, unfiltered=None, any_racing=not batch.all_greedy,
                                        top_k_covers_sampling=batch.top_k_covers_sampling and batch.top_k is not None)
            base = best_ms(logits, raced, args.repeats)
            sampler.NUCLEUS_CANDIDATES = shortcut
            now = best_ms(logits, batch, args.repeats)
            print(f"{name:22s} {b:5d} {base:12.1f} {now:8.1f} {base / now:5.1f}x")


if __name__ == "__main__":
    main()
