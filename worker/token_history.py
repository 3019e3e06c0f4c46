"""A request's tokens as the repetition, frequency and presence penalties read them, kept up to date as its
outputs arrive.

The penalties need, per sampling row, the distinct ids of prompt + outputs (repetition) and each distinct output
id with its count (frequency / presence). Building those from the whole token lists on every step cost O(context)
per penalised request per step: 4.3 ms at a 32K-token prompt and 71 ms at 128K on the 2-core box, every decode
step. Here the prompt's distinct ids are found once and each new output token is folded in as it arrives (a dict
lookup), so a step reads arrays of the request's distinct ids: one C-level copy per row, no Python pass over its
context.

A verify row of speculative decoding also counts the draft tokens before its position (`extra`): those few are
merged into a copy of the row's arrays. Memory: a vocabulary-sized membership mask (152 KB at 151,936 ids) plus
the distinct ids, for requests with a penalty only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class _Growing:
    """An int64 array appended to in place (doubling), read as a view of its first n entries."""

    def __init__(self, values: np.ndarray) -> None:
        self._buf, self.n = values, len(values)

    @property
    def view(self) -> np.ndarray:
        return self._buf[:self.n]

    def append(self, value: int) -> None:
        if self.n == len(self._buf):  # amortised O(1)
            self._buf = np.resize(self._buf, max(16, 2 * self.n))
        self._buf[self.n] = value
        self.n += 1


class TokenHistory:
    """One request's penalty view of its prompt and outputs. `update(outputs)` folds in the outputs appended
    since the last call; the outputs list only ever grows (a shorter one starts the fold over)."""

    def __init__(self, prompt_ids: Sequence[int], vocab_size: int) -> None:
        self.vocab_size = vocab_size
        prompt = np.asarray(prompt_ids, dtype=np.int64)
        _check("prompt_ids", prompt, vocab_size)
        self._prompt_seen = np.unique(prompt)
        self._reset()

    def _reset(self) -> None:
        self._is_seen = np.zeros(self.vocab_size, dtype=np.bool_)  # membership in prompt + outputs
        self._is_seen[self._prompt_seen] = True
        self._seen = _Growing(self._prompt_seen.copy())  # the same ids as a list
        self._out_ids = _Growing(np.empty(0, dtype=np.int64))  # distinct outputs, first-seen order
        self._out_counts = np.empty(0, dtype=np.float32)  # their counts (same index)
        self._out_index: dict[int, int] = {}
        self._num_folded = 0

    @classmethod
    def of(cls, prompt_ids: Sequence[int], output_ids: Sequence[int], vocab_size: int) -> TokenHistory:
        h = cls(prompt_ids, vocab_size)
        h.update(output_ids)
        return h

    def update(self, output_ids: Sequence[int]) -> None:
        if len(output_ids) < self._num_folded:
            self._reset()
        new = output_ids[self._num_folded:]
        _check("output_ids", np.asarray(new, dtype=np.int64), self.vocab_size)
        for t in new:
            if not self._is_seen[t]:
                self._is_seen[t] = True
                self._seen.append(t)
            i = self._out_index.get(t)
            if i is None:
                i = self._out_index[t] = self._out_ids.n
                self._out_ids.append(t)
                if i == len(self._out_counts):
                    self._out_counts = np.resize(self._out_counts, max(16, 2 * i))
                self._out_counts[i] = 0
            self._out_counts[i] += 1
        self._num_folded = len(output_ids)

    def seen_ids(self, extra: Sequence[int] = ()) -> np.ndarray:
        """Distinct ids of prompt + outputs + `extra` (int64; the request's own array when extra adds nothing new:
        read it, do not modify it)."""
        _check("extra ids", np.asarray(extra, dtype=np.int64), self.vocab_size)
        new = list(dict.fromkeys(t for t in extra if not self._is_seen[t]))
        return np.concatenate([self._seen.view, np.asarray(new, dtype=np.int64)]) if new else self._seen.view

    def output_counts(self, extra: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(distinct ids of outputs + `extra` int64, their counts float32); the request's own arrays when extra
        is empty (read them, do not modify them)."""
        ids, counts = self._out_ids.view, self._out_counts[:self._out_ids.n]
        if not extra:
            return ids, counts
        _check("extra ids", np.asarray(extra, dtype=np.int64), self.vocab_size)
        counts = counts.copy()
        added: dict[int, int] = {}
        for t in extra:
            i = self._out_index.get(t)
            if i is not None:
                counts[i] += 1
            else:
                added[t] = added.get(t, 0) + 1
        if added:
            ids = np.concatenate([ids, np.asarray(list(added), dtype=np.int64)])
            counts = np.concatenate([counts, np.asarray(list(added.values()), dtype=np.float32)])
        return ids, counts


def _check(name: str, ids: np.ndarray, vocab_size: int) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{name} contains a token id outside [0, {vocab_size})")
