"""The torch references' access to a slot pool's rows ([S, ...] per-sequence DeltaNet / conv states).

A decode step reads every sequence's row and writes it back. When the step's slots are consecutive ascending ids
(a batch admitted together gets such slots from the FIFO slot pool, and keeps them while it decodes), the rows are
one slice of the pool: the references then compute on that view in place, with no gather and no scatter (for 16
sequences of 4 x 64 x 64 float32 states on a 2-core CPU, index_select + index_copy_ cost ~125 us per layer).
Other slot sets take the gathered copy. The ids are read on the host: these helpers serve the CPU references
(the Triton kernels index the pools themselves).
"""

from __future__ import annotations

import torch


def slot_run(slots: torch.Tensor) -> slice | None:
    """`slots` [B] as one slice of pool rows when they are consecutive ascending ids, else None."""
    ids = slots.tolist()
    first = ids[0] if ids else 0
    return slice(first, first + len(ids)) if ids and ids == list(range(first, first + len(ids))) else None


def read_rows(pool: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """(rows, in_place): the pool's rows at `slots` in `dtype`, the caller's to modify. in_place: rows is a view of
    the pool itself (consecutive slots, same dtype), so changes land there and `write_rows` has nothing to do."""
    run = slot_run(slots)
    if run is not None and pool.dtype == dtype:
        return pool[run], True
    return pool.index_select(0, slots).to(dtype), False  # index_select: 4x cheaper than pool[slots] on a CPU


def write_rows(pool: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, in_place: bool) -> None:
    """Store `rows` [B, ...] at `slots` (rows from `read_rows`; nothing to do when they were the pool's view)."""
    if in_place:
        return
    run = slot_run(slots)
    if run is not None:
        pool[run].copy_(rows)  # a strided copy: cheaper than index_copy_ for small rows
    else:
        pool.index_copy_(0, slots, rows.to(pool.dtype))
