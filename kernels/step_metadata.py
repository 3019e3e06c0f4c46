"""The varlen metadata the Triton kernels read (query starts, context lengths, per-sequence flags, work items),
built once per forward step on the device and shared by every layer.

Why a shared object: every attention, conv and gated-delta-rule layer of a step needs the same small int32
tables. Built per layer call they cost one host -> device copy per layer (~150 per step at 48 layers); built once
they cost one per kind. And under CUDA graphs (worker/graph_runner.py) they must live in tensors that outlive
the capture: the graph reads the addresses it captured, so each replay refills those same tensors in place
(`refill`) instead of allocating new ones, and no table may be built while a capture runs (`frozen`).

A table is keyed by its kind and the launch parameters it depends on (attention's BLOCK_Q, conv's BLOCK_T);
its builder is a function of the step's `VarlenLayout`, so the same key can be rebuilt for the next step.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class VarlenLayout:
    """The host-side shape of a packed varlen step: what the kernels' tables are computed from."""

    query_lens: tuple[int, ...]  # new tokens per sequence
    context_lens: tuple[int, ...]  # cached + new tokens per sequence
    has_initial_state: tuple[bool, ...]  # the sequence continues from its DeltaNet state slot
    is_verify: tuple[bool, ...]  # speculative-verify chunk (keeps the state after every position)
    # Upper bound of context_lens for launch choices (attention's key splits). A graph captured for a bucket
    # is replayed with other context lengths, so there it is the model's maximum length, not this step's.
    max_context: int

    @staticmethod
    def of(query_lens: list[int], context_lens: list[int], is_verify: list[bool] | None = None,
           max_context: int | None = None) -> VarlenLayout:
        verify = tuple(bool(v) for v in is_verify) if is_verify else (False,) * len(query_lens)
        return VarlenLayout(tuple(query_lens), tuple(context_lens),
                            tuple(c > q for q, c in zip(query_lens, context_lens)), verify,
                            max(context_lens, default=0) if max_context is None else max_context)

    @staticmethod
    def for_states(query_lens: list[int], has_initial_state: list[bool],
                   is_verify: list[bool] | None = None) -> VarlenLayout:
        """A layout for the DeltaNet state kernels alone (conv1d, gated delta rule), called outside a model step:
        they read no context lengths, so one more token than the query stands for "has an initial state"."""
        return VarlenLayout.of(query_lens, [n + bool(h) for n, h in zip(query_lens, has_initial_state)], is_verify)


Builder = Callable[[VarlenLayout], list[int]]


class StepMetadata:
    """Device int32 tables of one step's layout, built on first use by a kernel wrapper and reused by the
    other layers. `refill(layout)` rewrites every table for a new layout of the same launch shape, in place."""

    def __init__(self, layout: VarlenLayout, device: torch.device) -> None:
        self.layout = layout
        self.device = device
        self.frozen = False  # True while a CUDA graph is captured: a new table would not be refilled later
        self._tables: dict[Hashable, tuple[Builder, torch.Tensor]] = {}
        self._derived: dict[Hashable, Any] = {}

    def get(self, key: Hashable, build: Builder) -> torch.Tensor:
        hit = self._tables.get(key)
        if hit is not None:
            return hit[1]
        if self.frozen:
            raise RuntimeError(f"kernel metadata {key!r} first built while frozen (during a CUDA graph capture): "
                               f"the warm-up run must build every table the captured forward reads")
        table = _to_device(build(self.layout), self.device)
        self._tables[key] = (build, table)
        return table

    def derived(self, key: Hashable, compute: Callable[[VarlenLayout], Any]) -> Any:
        """A host-side value computed from the layout (a launch split, say), once per step, not once per layer."""
        if key not in self._derived:
            self._derived[key] = compute(self.layout)
        return self._derived[key]

    def refill(self, layout: VarlenLayout) -> None:
        """Rewrite every table for `layout` into the same device memory. The new layout must give every table
        its old length (same batch size and query lengths: what a graph bucket fixes)."""
        for key, (build, table) in self._tables.items():
            values = build(layout)
            if len(values) != table.numel():
                raise ValueError(f"kernel metadata {key!r}: {len(values)} entries for a {table.numel()}-entry "
                                 f"table: the layout changed shape")
            table.copy_(_host(values, table.device), non_blocking=True)
        self.layout = layout
        self._derived.clear()

    @property
    def num_tables(self) -> int:
        return len(self._tables)


def _host(values: list[int], device: torch.device) -> torch.Tensor:
    # pinned, so the copy to CUDA needs no host wait: a copy from pageable memory blocks until the GPU drains
    return torch.tensor(values, dtype=torch.int32, pin_memory=device.type == "cuda")


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int32, device=device)
    return _host(values, device).to(device, non_blocking=True)


def query_starts(query_lens: tuple[int, ...] | list[int]) -> list[int]:
    """[B + 1] row of each sequence's first token in the packed batch, then the total."""
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return starts
