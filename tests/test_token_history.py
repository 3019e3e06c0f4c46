"""TokenHistory (worker/token_history.py) against the penalties' definition computed from the whole token lists."""

import random
from collections import Counter

import numpy as np
import pytest

from qnext.worker.token_history import TokenHistory

VOCAB = 50


def _reference(prompt: list[int], outputs: list[int], extra: list[int]) -> tuple[set[int], dict[int, int]]:
    return set(prompt) | set(outputs) | set(extra), dict(Counter(outputs + extra))


def _check(h: TokenHistory, prompt: list[int], outputs: list[int], extra: list[int]) -> None:
    seen, counts = _reference(prompt, outputs, extra)
    got_seen = h.seen_ids(extra)
    assert got_seen.dtype == np.int64 and len(got_seen) == len(seen) and set(got_seen.tolist()) == seen
    ids, n = h.output_counts(extra)
    assert ids.dtype == np.int64 and n.dtype == np.float32 and len(ids) == len(counts)
    assert dict(zip(ids.tolist(), n.tolist())) == counts


def test_matches_the_whole_lists_as_outputs_arrive_with_and_without_drafts():
    rng = random.Random(3)
    for _ in range(40):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 30))]
        h = TokenHistory(prompt, VOCAB)
        outputs: list[int] = []
        for _ in range(rng.randint(1, 40)):
            outputs += [rng.randrange(VOCAB) for _ in range(rng.randint(0, 3))]  # 0-3 accepted tokens a step
            h.update(outputs)
            for extra in ([], [rng.randrange(VOCAB) for _ in range(rng.randint(1, 3))]):
                _check(h, prompt, outputs, extra)
            _check(h, prompt, outputs, [])  # a draft row's extra tokens never stay in the request's arrays


def test_shorter_outputs_start_over_and_ids_outside_the_vocabulary_are_refused():
    h = TokenHistory.of([1, 2], [3, 3, 4], VOCAB)
    h.update([5])
    _check(h, [1, 2], [5], [])
    with pytest.raises(ValueError, match="prompt_ids"):
        TokenHistory([VOCAB], VOCAB)
    with pytest.raises(ValueError, match="output_ids"):
        h.update([5, -1])
    with pytest.raises(ValueError, match="extra"):
        h.seen_ids([VOCAB])
