"""The torch references' access to a slot pool's rows ([S, ...] per-sequence DeltaNet / conv states).

A decode step reads every sequence's row and writes it back. When the step's slots are consecutive ascending ids
(a batch admitted together gets such slots from the FIFO slot pool, and keeps them while it decodes), the rows are
one slice of the pool: the references then compute on that view in place, with no gather and no scatter (for 16
sequences of 4 x 64 x 64 float32 states on a 2-core CPU the DeltaNet decode call went from 265 to 190 us).
Other slot sets take the gathered copy. The ids are read on the host: these helpers serve the CPU references
(the Triton kernels index the pools themselves).
"""

from __future__ import annotations

import torch


def slot_run(slots: torch.Tensor) -> slice | None:
    """`slots` [B] as one slice of pool rows when they are consecutive ascending ids, else None."""
    ids = slots.tolist()
    if ids and ids == list(range(ids[0], ids[0] + len(ids))):
        return slice(ids[0], ids[0] + len(ids))
    return None


def read_rows(pool: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, slice | None]:
    """(rows, run): the pool's rows at `slots` in `dtype`, the caller's to modify, and `slot_run(slots)`. With a
    run and the pool's own dtype, rows IS the pool's view: changes land in the pool directly."""
    run = slot_run(slots)
    if run is not None and pool.dtype == dtype:
        return pool[run], run
    return pool.index_select(0, slots).to(dtype), run  # index_select: 4x cheaper than pool[slots] on a CPU


def write_rows(pool: torch.Tensor, slots: torch.Tensor, run: slice | None, rows: torch.Tensor) -> None:
    """Store `rows` [B, ...] at `slots` (`run`: read_rows' slot_run of them, None for the scatter); nothing to do
    when rows is the pool's own view."""
    if run is None:
        pool.index_copy_(0, slots, rows.to(pool.dtype))
        return
    target = pool[run]
    if rows.data_ptr() != target.data_ptr():  # else: advanced in place already
        target.copy_(rows)  # a strided copy (converting the dtype): cheaper than index_copy_ for small rows
