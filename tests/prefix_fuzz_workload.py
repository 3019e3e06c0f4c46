"""The requests tests/test_prefix_cache_fuzz.py draws: shared prefixes with random extensions, exact repeats,
prompts diverging at or near a block boundary, strict prefixes of an earlier prompt + output, conversation
continuations, turn-boundary and random checkpoint offsets, random draft lengths, requests bypassing the cache."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from qnext.worker.types import FinishReason


@dataclass
class Sent:
    rid: str
    prompt: tuple[int, ...]
    max_new: int
    stops: tuple[int, ...]
    k: int
    bypass: bool
    checkpoints: tuple[int, ...] = ()
    out: list[int] = field(default_factory=list)
    finished: FinishReason | None = None
    aborted: bool = False


class Workload:
    """Draws requests; later ones reuse earlier prompts and finished outputs."""

    def __init__(self, rng: random.Random, block_size: int, max_tokens: int, max_new: int, vocab: int) -> None:
        self.rng, self.vocab = rng, vocab
        self.max_new = max_new
        self.max_tokens = max_tokens  # prompt + max_new of one request (it must fit the KV pool alone)
        self.bs = block_size
        n = rng.randint(1, 3)
        self.bases = [self.toks(rng.randint(max(1, block_size - 2), min(36, 2 * block_size + 8))) for _ in range(n)]
        self.prompts: list[Sent] = []
        self.done: list[Sent] = []  # finished, not aborted
        self.seen_outputs: list[int] = []
        self.count = 0
        self.ks = rng.choice([[0], [2], [0, 1, 2]])  # draft lengths (roots: with MTP or without)

    def toks(self, n: int) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(n)]

    def prompt(self) -> tuple[list[int], str, list[int], Sent | None]:
        rng, bs = self.rng, self.bs
        src = None  # the earlier request this prompt is derived from
        kinds = ["ext", "ext"]
        if self.prompts:
            kinds += ["repeat", "diverge"]
        if self.done:
            kinds += ["prefix_of_output", "continue", "continue"]
        kind = rng.choice(kinds)
        boundaries = []  # a chat template's turn boundaries
        if kind == "ext":
            base = rng.choice(self.bases)
            p = list(base) + self.toks(rng.randint(0, 12))
            boundaries.append(len(base))
        elif kind == "repeat":
            src = rng.choice(self.prompts)
            p = list(src.prompt)
        elif kind == "diverge":
            src = rng.choice(self.prompts)
            cut = rng.randint(0, len(src.prompt))
            if rng.random() < 0.6:  # at a block boundary (the next token is outside the block), or just off it
                cut = min(len(src.prompt), max(0, (cut // bs) * bs + rng.choice([0, 0, -1, 1, bs - 1])))
            p = list(src.prompt[:cut]) + self.toks(rng.randint(1, 6))
        else:
            src = rng.choice(self.done)
            full = list(src.prompt) + src.out
            if kind == "prefix_of_output":
                p = full[:rng.randint(1, len(full))]
            else:
                p = full + self.toks(rng.randint(1, 8))
                boundaries.append(len(full))
        p = p[:self.max_tokens - 1]
        return p, kind, [b for b in boundaries if 1 <= b <= len(p) and rng.random() < 0.7], src

    def request(self) -> Sent:
        rng = self.rng
        p, kind, boundaries, src = self.prompt()
        max_new = rng.randint(1, min(self.max_new, self.max_tokens - len(p)))
        stops = ()
        if self.seen_outputs and rng.random() < 0.2:  # tokens the model does produce, so stops do happen
            stops = tuple(rng.sample(self.seen_outputs, min(2, len(self.seen_outputs))))
        self.count += 1
        offsets = [rng.randint(1, len(p)) for _ in range(rng.choice([0, 0, 1, 2]))]  # client-chosen offsets
        k, bypass = rng.choice(self.ks), rng.random() < 0.15
        if src is not None and rng.random() < 0.7:  # the same client again: same draft length, cache on
            k, bypass = src.k, False
        sent = Sent(f"q{self.count}-{kind}", tuple(p), max_new, stops, k=k, bypass=bypass,
                    checkpoints=tuple(boundaries + offsets))
        self.prompts.append(sent)
        return sent
