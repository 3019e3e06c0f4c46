"""Causal depthwise conv1d + SiLU over a packed varlen batch, continuing from per-sequence conv states
(docs/model.md §4.2). The conv state of a sequence holds its last K-1 inputs (zeros before the first token), so a
prompt split into chunks gives exactly the one-shot result. States are time-major, [K-1, D] per slot: every copy
and product below runs along D, contiguous (with [D, K-1] a decode step's concatenation, size-4 reduction and
shifted write-back were strided: the call took 137 us at 16 x 512 bf16 channels on the 2-core CPU, now 93;
in an engine step at 16 rows the three DeltaNet layers' conv went 0.63 -> 0.49 ms).
"""

import torch
import torch.nn.functional as F

from qnext.kernels.gated_delta_rule.reference import compute_dtype
from qnext.kernels.state_rows import read_rows, write_rows


def causal_conv1d_varlen(
    x: torch.Tensor,  # [T, D] packed inputs of B sequences
    weight: torch.Tensor,  # [D, K] depthwise kernel
    conv_state: torch.Tensor,  # [S, K-1, D] one layer's state pool, updated in place
    state_slots: torch.Tensor,  # [B] int64 slot of each sequence
    query_lens: list[int],  # tokens of each sequence in x (sum = T)
    has_initial_state: list[bool],  # False: the sequence starts here, its history is zeros
    is_verify: list[bool] | None = None,  # speculative verify: keep the conv state after every position
    spec_conv: torch.Tensor | None = None,  # [S, k_max, K-1, D]: state after position j of slot s at [s, j]
) -> torch.Tensor:  # [T, D] silu(conv(x))
    T, D = x.shape
    K = weight.shape[1]
    # Sequences of one token (decode) go together as one batched update.
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    single = [i for i, n in enumerate(query_lens) if n == 1]
    multi = [i for i, n in enumerate(query_lens) if n > 1]
    all_decode = len(single) == len(query_lens)  # rows are 0..T-1: no row gathers or scatters
    if single:
        rows = None if all_decode else torch.tensor([starts[i] for i in single], device=x.device)
        slots = state_slots if all_decode else state_slots[single]
        hist, run = read_rows(conv_state, slots, x.dtype)  # [b, K-1, D], read once by the cat below
        if not all(has_initial_state[i] for i in single):
            keep = torch.tensor([has_initial_state[i] for i in single], device=x.device)
            hist = hist * keep[:, None, None].to(hist.dtype)
        window = torch.cat([hist, (x if all_decode else x[rows]).unsqueeze(1)], dim=1)  # [b, K, D]
        ct = compute_dtype(x.dtype)
        y = F.silu((window.to(ct) * weight.t().contiguous().to(ct)).sum(1)).to(x.dtype)
        write_rows(conv_state, slots, run, window[:, 1:])
        if all_decode:
            return y
    out = torch.empty_like(x)
    if single:
        out[rows] = y
    # Longer chunks (prefill, speculative verify), batched by length: a window [b, K-1+n, D] per group, the conv
    # as K shifted multiply-adds (F.conv1d costs ~60-110 us per sequence on a CPU even at n = 3, this ~30 us per
    # group; at D = 1024, n = 512 it is 0.27 vs 2.0 ms).
    by_len: dict[int, list[int]] = {}
    for i in multi:
        by_len.setdefault(query_lens[i], []).append(i)
    ct = compute_dtype(x.dtype)
    w = weight.to(ct)
    for n, group in by_len.items():
        b = len(group)
        slots = state_slots[group]
        hist, run = read_rows(conv_state, slots, x.dtype)  # [b, K-1, D]
        if not all(has_initial_state[i] for i in group):
            keep = torch.tensor([has_initial_state[i] for i in group], device=x.device)
            hist = hist * keep[:, None, None].to(hist.dtype)
        rows = (slice(starts[group[0]], starts[group[0]] + n) if b == 1 else
                torch.cat([torch.arange(starts[i], starts[i] + n, device=x.device) for i in group]))
        # time-major [b, K-1+n, D]: every op below runs along D, contiguous, the same way whatever b is (a
        # sequence's result does not depend on its batch)
        seq = torch.cat([hist, x[rows].view(b, n, D)], dim=1)
        seq_c = seq.to(ct)
        y = seq_c[:, 0:n] * w[:, 0]
        for t in range(1, K):
            y = y + seq_c[:, t:t + n] * w[:, t]
        out[rows] = F.silu(y).view(b * n, D).to(x.dtype)
        write_rows(conv_state, slots, run, seq[:, n:])
        verify = [g for g, i in enumerate(group) if is_verify and is_verify[i]]
        if verify and n > 1:  # after position j the state is the K-1 inputs ending at j, j = 0..n-2
            assert spec_conv is not None and n - 1 <= spec_conv.shape[1]
            v = torch.tensor(verify, device=x.device)
            spec_conv[slots[v], :n - 1] = seq[v].unfold(1, K - 1, 1)[:, 1:n].transpose(2, 3).to(spec_conv.dtype)
    return out
