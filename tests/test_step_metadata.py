"""kernels/step_metadata.py: the kernels' varlen tables, built once per step and refilled in place for CUDA graphs.
The tables are checked against the layouts they encode, written out by hand here."""

from __future__ import annotations

import pytest
import torch

from qnext.kernels.step_metadata import StepMetadata, VarlenLayout, query_starts


def test_layout_derives_initial_state_and_verify_flags() -> None:
    layout = VarlenLayout.of([3, 1, 2], [3, 9, 7], [False, False, True])
    assert layout.has_initial_state == (False, True, True)  # a chunk that is the whole context starts fresh
    assert layout.is_verify == (False, False, True)
    assert layout.max_context == 9
    assert VarlenLayout.of([1], [5], None, max_context=4096).max_context == 4096
    assert VarlenLayout.for_states([4, 1], [True, False]).has_initial_state == (True, False)
    assert query_starts([3, 0, 2]) == [0, 3, 3, 5]


def test_tables_are_built_once_and_shared() -> None:
    meta = StepMetadata(VarlenLayout.of([2, 1], [5, 3]), torch.device("cpu"))
    calls = []

    def build(layout: VarlenLayout) -> list[int]:
        calls.append(layout)
        return query_starts(layout.query_lens) + list(layout.context_lens)

    first = meta.get("attention", build)
    assert meta.get("attention", build) is first and len(calls) == 1  # the second layer reuses it
    assert first.dtype == torch.int32 and first.tolist() == [0, 2, 3, 5, 3]


def test_refill_rewrites_the_same_memory_and_rejects_a_new_shape() -> None:
    meta = StepMetadata(VarlenLayout.of([1, 1], [5, 3]), torch.device("cpu"))
    table = meta.get("ctx", lambda layout: list(layout.context_lens))
    address = table.data_ptr()
    meta.refill(VarlenLayout.of([1, 1], [6, 4]))
    assert table.tolist() == [6, 4] and table.data_ptr() == address and meta.layout.context_lens == (6, 4)
    with pytest.raises(ValueError, match="'ctx': 3 entries for a 2-entry table"):
        meta.refill(VarlenLayout.of([1, 1, 1], [7, 5, 2]))


def test_a_frozen_step_builds_no_new_table() -> None:
    meta = StepMetadata(VarlenLayout.of([1], [5]), torch.device("cpu"))
    meta.get("a", lambda layout: [1])
    meta.frozen = True
    assert meta.get("a", lambda layout: [2]).tolist() == [1]
    with pytest.raises(RuntimeError, match="'b' first built while frozen"):
        meta.get("b", lambda layout: [2])


def test_derived_host_values_are_computed_once_per_step() -> None:
    meta = StepMetadata(VarlenLayout.of([1, 3], [5, 3]), torch.device("cpu"))
    calls = []

    def longest(layout: VarlenLayout) -> int:
        calls.append(layout)
        return max(layout.query_lens)

    assert meta.derived("longest", longest) == 3 and meta.derived("longest", longest) == 3 and len(calls) == 1
    meta.refill(VarlenLayout.of([4, 1], [9, 4]))  # a new step: recomputed from its layout
    assert meta.derived("longest", longest) == 4 and len(calls) == 2
