"""What the load test sends: synthetic prompts of chosen lengths, or prompts read from a JSONL file.

Synthetic prompts are random token ids (sent as `token_ids`, so the server tokenises nothing and the prompt
length is exact). Lengths are fixed, or uniform in [n * (1 - r), n * (1 + r)] with `--*-len-range r`.
A dataset line is {"text": str} | {"token_ids": [int]} | {"chat": [{"role", "content"}]}, with an optional
"output_len" (else the --output-len distribution applies). Requests come in a fixed order from a seed, as one
stream for the whole run: a sweep's later points get new prompts, not the earlier points' again, which a
server's prefix cache would serve without prefill. A dataset shorter than the run is cycled (its repeats can hit
the prefix cache: Usage.cached_tokens is reported).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Used when the target's GetModelInfo does not answer (an unreachable server): the requests will fail anyway,
# and every Qwen vocabulary has at least this many ordinary tokens.
FALLBACK_VOCAB_SIZE = 32000


@dataclass(frozen=True)
class Length:
    """A token count: `mean` exactly (range_ratio 0) or uniform in [mean * (1 - r), mean * (1 + r)], >= 1."""

    mean: int
    range_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.mean < 1:
            raise ValueError(f"must be >= 1, got {self.mean}")
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"range must be in [0, 1), got {self.range_ratio}")

    def draw(self, rng: random.Random) -> int:
        if self.range_ratio == 0:
            return self.mean
        lo = max(1, round(self.mean * (1 - self.range_ratio)))
        return rng.randint(lo, round(self.mean * (1 + self.range_ratio)))


@dataclass(frozen=True)
class RequestSpec:
    """One request: exactly one prompt form, and the number of tokens to ask for."""

    max_new_tokens: int
    token_ids: list[int] | None = None
    text: str | None = None
    chat: list[tuple[str, str]] | None = None

    def prompt_fields(self) -> dict[str, Any]:
        if self.token_ids is not None:
            return {"token_ids": self.token_ids}
        if self.text is not None:
            return {"text": self.text}
        return {"chat": self.chat}


def _parse_line(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: each line must be a JSON object")
    forms = [k for k in ("text", "token_ids", "chat") if k in obj]
    if len(forms) != 1:
        raise ValueError(f"{where}: give exactly one of text, token_ids, chat")
    out: dict[str, Any] = {}
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise ValueError(f"{where}: text must be a non-empty string")
        out["text"] = obj["text"]
    elif "token_ids" in obj:
        ids = obj["token_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            raise ValueError(f"{where}: token_ids must be a non-empty list of integers")
        out["token_ids"] = ids  # range checks are the server's (its INVALID_ARGUMENT is what gets measured)
    else:
        chat = obj["chat"]
        if not isinstance(chat, list) or not chat or not all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                                             for m in chat):
            raise ValueError(f"{where}: chat must be a non-empty list of {{role, content}} objects")
        out["chat"] = [(m["role"], m["content"]) for m in chat]
    if "output_len" in obj:
        if not isinstance(obj["output_len"], int) or obj["output_len"] < 1:
            raise ValueError(f"{where}: output_len must be an integer >= 1")
        out["output_len"] = obj["output_len"]
    return out


def load_dataset(path: str | Path) -> list[dict[str, Any]]:
    """Parse a JSONL dataset; ValueError naming the file and line on the first bad one."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            rows.append(_parse_line(obj, f"{path}:{n}"))
    if not rows:
        raise ValueError(f"{path}: no requests in the file")
    return rows


@dataclass(frozen=True)
class Workload:
    output_len: Length
    input_len: Length | None = None  # synthetic prompts
    dataset: list[dict[str, Any]] | None = None  # or these, cycled in file order
    vocab_size: int = FALLBACK_VOCAB_SIZE
    excluded_ids: frozenset[int] = frozenset()  # EOS ids: a prompt holding one is not a typical prompt
    seed: int = 0

    def __post_init__(self) -> None:
        assert (self.input_len is None) != (self.dataset is None), "synthetic or dataset, not both"

    def requests(self) -> Iterator[RequestSpec]:
        """An endless, reproducible stream of requests (the caller decides how many to take)."""
        rng = random.Random(self.seed)
        i = 0
        while True:
            if self.dataset is not None:
                row = self.dataset[i % len(self.dataset)]
                n = row.get("output_len") or self.output_len.draw(rng)
                yield RequestSpec(n, row.get("token_ids"), row.get("text"), row.get("chat"))
            else:
                assert self.input_len is not None
                length = self.input_len.draw(rng)
                ids: list[int] = []
                while len(ids) < length:
                    t = rng.randrange(self.vocab_size)
                    if t not in self.excluded_ids:
                        ids.append(t)
                yield RequestSpec(self.output_len.draw(rng), token_ids=ids)
            i += 1
