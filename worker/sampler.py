"""Batched token sampler.

One call turns logits [B, V] (one row per sequence that needs a token this step) into tokens. Everything is
vectorised over the batch; the only Python loops run over requests while building the per-step tensors.

Processing order, per row (each step is a no-op for rows that leave its parameter at the default):

1. repetition penalty over prompt + output tokens (HF / vLLM): logit > 0 -> logit / p, else logit * p
2. frequency / presence penalties over output tokens (OpenAI): logit -= freq * count + presence * (count > 0)
2b. logit bias (OpenAI / vLLM `logit_bias`): logit += the request's bias for that id (greedy rows too)
3. suppression: suppressed ids (EOS / stop ids below min_new_tokens) and, for a constrained row, the ids its
   grammar forbids (worker/grammar.py's bitmask) -> -inf
4. greedy rows (temperature < 1e-5) take the argmax here; later steps do not affect them
5. temperature: logit / t
6. top-k, 7. top-p (on the top-k renormalised distribution), 8. min-p (relative to the max prob).
   All three become a per-row logit threshold, so they cost one sort per step (one topk when every top-p
   row has a top-k; `sample` first tries the largest NUCLEUS_CANDIDATES for top-p / min-p rows without one) and
   ties at a threshold are kept rather than broken by sort order.
9. softmax -> the distribution returned by `processed_probs`
10. the draw. A row with a filter (top-k, top-p or min-p) runs an exponential race: token = argmax(probs / E),
    E = -log(u), which draws exactly from probs. `sample` computes it as argmax over kept tokens of
    (logit - log E) (the same argmax: probs = exp(logit - lse), and lse is one constant per row), so only the
    kept tokens need noise: with a top-k that is k columns instead of 151,936, and the result is the same
    whichever path a batch takes. A row with no filter keeps the whole vocabulary, where a race would need
    151,936 hashed uniforms per row (36 ms for a batch of 16 on the 2-core box); it inverts the CDF of its
    softmax with one uniform instead (`inverse_cdf_draw`, 2 ms). Which of the two a row uses depends only on its
    own parameters, so a draw never depends on the batch around it.

Randomness is counter based: u = hash(seed, step, stream, column) (splitmix64 on int64 tensors), so a row's
draw depends only on its own (seed, step): reproducible and independent of batch composition, with no torch
generator state. `stream` separates independent uses of the same (seed, step), e.g. speculative decoding's
accept test.

Reported log-probs are those of the raw model distribution (log_softmax of the unprocessed logits), as
vLLM does by default.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from qnext.kernels.cpu import argmax as argmax_cpu
from qnext.worker.token_history import TokenHistory
from qnext.worker.types import GREEDY_TEMPERATURE, SamplingParams, require

# Columns tried first for rows whose filter is top-p or min-p without a top-k: a trained model's nucleus is
# usually far smaller, and a flat row (whose kept columns run past them) falls back to the whole vocabulary.
NUCLEUS_CANDIDATES = 1024
FIRST_NUCLEUS_CANDIDATES = 64  # tried before NUCLEUS_CANDIDATES: row_topk's fast range, and most nuclei at T < 1
# Noise stream used for token sampling; other users of uniform_noise must pick another stream number.
STREAM_SAMPLE = 0


# Row argmax on a CPU in blocks of this many columns: see row_argmax.
ARGMAX_BLOCK = 128


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for a 2-D x, the same indices (first maximum; a NaN counts as the maximum).

    On a CPU torch's argmax is a scalar loop: 1.0 ms for 16 x 151,936 float32 logits on the 2-core box, while
    amax is vectorised. So take each block's amax, the first block holding the row's maximum, then the argmax
    inside that block: 0.18 ms. Elsewhere plain argmax. 16-bit logits (the LM head's output in bf16) are widened
    first, which is exact: torch's amax over [16, 1187, 128] bf16 takes 0.65 ms here, the copy plus the float32
    path 0.25 ms (0.7-0.85 ms in a decode step, the logits fresh from the LM head). 16-bit logits go to a C
    kernel where it is built (kernels/cpu/argmax.py, ~0.35 ms there), which reads them as they are."""
    if x.device.type != "cpu" or x.dim() != 2 or x.shape[1] < 4 * ARGMAX_BLOCK or not x.is_floating_point():
        return x.argmax(dim=-1)
    if argmax_cpu.runs(x):
        return argmax_cpu.row_argmax(x)
    if x.element_size() < 4:
        x = x.float()
    x = _blocks(x)  # -inf padding never wins (an all -inf row still gives column 0)
    block = x.amax(dim=-1).argmax(dim=-1)  # amax and argmax both propagate NaN, so a NaN's block wins
    inside = x[torch.arange(x.shape[0], device=x.device), block].argmax(dim=-1)
    return block * ARGMAX_BLOCK + inside


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """[rows, cols] -> [rows, blocks, ARGMAX_BLOCK], the last block padded with -inf (never above a real column;
    NaN still counts as the largest)."""
    rows, cols = x.shape
    blocks = -(-cols // ARGMAX_BLOCK)
    if blocks * ARGMAX_BLOCK != cols:
        x = torch.nn.functional.pad(x, (0, blocks * ARGMAX_BLOCK - cols), value=-math.inf)
    return x.reshape(rows, blocks, ARGMAX_BLOCK)


def _topk_in_blocks(blocks: torch.Tensor, block_max: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """row_topk's values and columns from `_blocks(x)` and its maxima (n <= the number of blocks)."""
    rows = blocks.shape[0]
    top_blocks = block_max.topk(n, dim=-1).indices  # [rows, n]
    candidates = blocks.gather(1, top_blocks[:, :, None].expand(rows, n, ARGMAX_BLOCK)).reshape(rows, -1)
    values, where = candidates.topk(n, dim=-1)
    return values, top_blocks.gather(1, where // ARGMAX_BLOCK) * ARGMAX_BLOCK + where % ARGMAX_BLOCK


def row_topk(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x.topk(n, dim=-1) for a 2-D x: the same values, descending, and columns holding them (which of several
    equal values is arbitrary, as in torch.topk).

    On a CPU torch's topk reads the whole row element by element: 2.3 ms for the 21 largest of 16 x 151,936
    float32 logits on the 2-core box. The n largest values all lie in the n blocks of ARGMAX_BLOCK columns with
    the largest maxima (a column outside them is at most the n-th largest block maximum, which is itself one of n
    distinct columns at least that large), so take those blocks (a vectorised amax, then a topk over the block
    maxima) and the topk inside them. Elsewhere, or when the blocks would cover much of the row, plain topk."""
    if x.device.type != "cpu" or x.dim() != 2 or 8 * n * ARGMAX_BLOCK > x.shape[1] or not x.is_floating_point():
        return x.topk(n, dim=-1)
    blocks = _blocks(x)
    return _topk_in_blocks(blocks, blocks.amax(dim=-1), n)


def _to_int64(x: int) -> int:
    """Reinterpret x mod 2**64 as a signed int64 (torch has no uint64 arithmetic)."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _id_counts(name: str, lists: Sequence[Sequence[int]], vocab_size: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The distinct (row b, id) pairs of the ids in lists[b] as (rows [N] int64, ids [N] int64, counts [N]
    float32 occurrences); None when every list is empty. For short lists (the suppressed ids); the penalties'
    long histories come as distinct ids already (_row_entries). Sparse either way: a row costs its own ids, not a
    [B, V] matrix per step (each such matrix and its arithmetic took milliseconds at 16 x 151,936)."""
    lengths = [len(ids) for ids in lists]
    total = sum(lengths)
    if total == 0:
        return None
    cols = torch.tensor(list(chain.from_iterable(lists)), dtype=torch.int64)  # [total], built on CPU
    if int(cols.min()) < 0 or int(cols.max()) >= vocab_size:
        raise ValueError(f"{name} contains a token id outside [0, {vocab_size})")
    rows = torch.repeat_interleave(torch.arange(len(lists)), torch.tensor(lengths))  # [total]
    keys, counts = torch.unique(rows * vocab_size + cols, return_counts=True)
    return (keys.div(vocab_size, rounding_mode="floor").to(device), keys.remainder(vocab_size).to(device),
            counts.to(device=device, dtype=torch.float32))


@dataclass(frozen=True)
class PenaltyTokens:
    """One sampling row's tokens for the penalties: its request's history, plus the draft tokens the row puts
    after the outputs (a speculative verify row), counted as outputs."""

    history: TokenHistory
    extra: Sequence[int] = ()


def _row_entries(per_row: list[np.ndarray | tuple[np.ndarray, np.ndarray] | None], device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(rows [N] int64, ids [N] int64, counts [N] float32 or None) from each row's distinct ids (or (ids, counts));
    None for rows without any. None when no row has an id."""
    rows = [i for i, a in enumerate(per_row) if a is not None]
    ids = [a[0] if isinstance(a, tuple) else a for a in per_row if a is not None]
    lengths = [len(a) for a in ids]
    if not sum(lengths):
        return None
    row_of = np.repeat(np.asarray(rows, dtype=np.int64), lengths)
    counts = None
    if isinstance(next(a for a in per_row if a is not None), tuple):
        counts = torch.from_numpy(np.concatenate([a[1] for a in per_row if a is not None])).to(device)
    return (torch.from_numpy(row_of).to(device), torch.from_numpy(np.concatenate(ids)).to(device), counts)


@dataclass
class SamplingBatch:
    """Per-step sampling tensors. Optional fields are None when no row in the batch uses that feature."""

    vocab_size: int
    seeds: torch.Tensor  # [B] int64 (seed mod 2**64 as signed)
    steps: torch.Tensor  # [B] int64
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    any_greedy: bool
    temperature: torch.Tensor | None  # [B, 1] float32 (1 for greedy rows)
    top_k: torch.Tensor | None  # [B, 1] int64, 0 = off (already clamped to V)
    max_top_k: int
    top_k_bounds_top_p: bool  # every sampling row with top_p < 1 also has top_k > 0: top-p needs no full sort
    top_k_covers_sampling: bool  # every racing row has top_k > 0: the race needs noise for max_k columns only
    any_racing: bool  # some sampling row has a filter (top-k, top-p or min-p): it draws by the race
    unfiltered: torch.Tensor | None  # [B] bool: sampling rows with no filter (inverse-CDF draw); None if none
    top_p: torch.Tensor | None  # [B, 1] float32
    log_min_p: torch.Tensor | None  # [B, 1] float32, log(min_p); -inf = off
    # The penalties and suppression as entries (rows [N] int64, ids [N] int64, ...) applied to those logits
    # only (_row_entries, _id_counts): (rows, ids, the row's repetition penalty) for each distinct id of a penalised row's
    # prompt + output; (rows, ids, freq * count + presence) for each distinct output id of a row with either;
    # (rows, ids) of each row's suppressed ids.
    repetition: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    output_penalty: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    suppressed: tuple[torch.Tensor, torch.Tensor] | None
    # (rows [N] int64, ids [N] int64, biases [N] float32): every entry of the batch's logit_bias maps, added in
    # place of a dense [B, V] bias (a zero-filled 16 x 151,936 float32 tensor and a full add per step)
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    max_top_logprobs: int
    allowed_mask: torch.Tensor | None = None  # [B, V] bool: what each row's grammar allows (all for free rows)
    forced: torch.Tensor | None = None  # [B, 1] int64: the one token a row must produce, -1 = free (reasoning budget)

    @property
    def size(self) -> int:
        return self.seeds.shape[0]

    @property
    def unprocessed_greedy(self) -> bool:
        """Every row greedy with nothing applied to its logits (no penalty, bias, suppression, grammar, forced
        token): each row's token is the plain argmax of its logits."""
        return self.all_greedy and all(t is None for t in (self.repetition, self.output_penalty, self.logit_bias,
                                                            self.suppressed, self.allowed_mask, self.forced))

    @staticmethod
    def build(params: list[SamplingParams], seeds: list[int], steps: list[int],
              histories: Sequence[PenaltyTokens | None],
              suppressed_ids: list[list[int]], vocab_size: int, device: torch.device,
              allowed: list[bytes | None] | None = None,
              forced: list[int | None] | None = None) -> "SamplingBatch":
        """`histories`: per row, the tokens its penalties read (its request's TokenHistory and the draft tokens
        the row adds after the outputs); None for a row without penalties (read only for rows with one).
        `allowed`: per row, the grammar's bitmask (worker/grammar.py), None for a row nothing constrains.
        `forced`: per row, the only token it may produce (Request.forced_token_id), None for a free row."""
        _check_rows(len(params), seeds=seeds, steps=steps, histories=histories,
                    suppressed_ids=suppressed_ids, **({"allowed": allowed} if allowed is not None else {}),
                    **({"forced": forced} if forced is not None else {}))
        bad = [t for t in forced or () if t is not None and not 0 <= t < vocab_size]
        require(not bad, "forced", f"ids must be in [0, {vocab_size}), got {bad[:5]}")
        require(vocab_size > 0, "vocab_size", f"must be > 0, got {vocab_size}")
        require(all(s >= 0 for s in steps), "steps", "must be >= 0")

        def col(values: list[float]) -> torch.Tensor:  # [B, 1] float32
            return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

        greedy = [p.temperature < GREEDY_TEMPERATURE for p in params]
        top_k = [min(p.top_k, vocab_size) for p in params]
        rep = [p.repetition_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        any_rep = any(r != 1.0 for r in rep)
        any_freq_pres = any(f != 0.0 for f in freq) or any(p != 0.0 for p in pres)
        sampled = [not g for g in greedy]  # filters only matter for rows that sample
        unfiltered = [s and not p.has_filter for s, p in zip(sampled, params)]
        racing = [s and p.has_filter for s, p in zip(sampled, params)]

        # Only rows that use a penalty contribute ids, so penalty-free batches pay nothing for long prompts; a
        # penalised row reads its request's distinct ids (TokenHistory), not its whole context.
        repetition = None
        if any_rep:  # prompt and output ids together: a distinct id is penalised once
            seen = _row_entries([h.history.seen_ids(h.extra) if r != 1.0 else None
                                 for h, r in zip(histories, rep)], device)
            if seen is not None:
                rows, ids, _ = seen
                repetition = (rows, ids, torch.tensor(rep, dtype=torch.float32, device=device)[rows])
        output_penalty = None
        if any_freq_pres:
            counted = _row_entries([h.history.output_counts(h.extra) if f != 0.0 or p != 0.0 else None
                                    for h, f, p in zip(histories, freq, pres)], device)
            if counted is not None:
                rows, ids, counts = counted
                f, p = (torch.tensor(v, dtype=torch.float32, device=device)[rows] for v in (freq, pres))
                output_penalty = (rows, ids, f * counts + p)  # the float32 ops of freq * count + presence * 1
        suppressed = _id_counts("suppressed_ids", suppressed_ids, vocab_size, device)
        bias = None
        if any(p.logit_bias for p in params):
            arrays = [p.logit_bias_arrays for p in params]  # made once per request
            ids = np.concatenate([a[0] for a in arrays])
            bad = ids[ids >= vocab_size]
            require(not bad.size, "logit_bias", f"ids must be < vocab_size {vocab_size}, got {bad[:5].tolist()}")
            rows = np.repeat(np.arange(len(params), dtype=np.int64), [len(a[0]) for a in arrays])
            bias = (torch.from_numpy(rows).to(device), torch.from_numpy(ids).to(device),
                    torch.from_numpy(np.concatenate([a[1] for a in arrays])).to(device))

        return SamplingBatch(
            vocab_size=vocab_size,
            seeds=torch.tensor([_to_int64(s) for s in seeds], dtype=torch.int64, device=device),
            steps=torch.tensor(steps, dtype=torch.int64, device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            temperature=(col([1.0 if g else p.temperature for g, p in zip(greedy, params)])
                         if any(s and p.temperature != 1.0 for s, p in zip(sampled, params)) else None),
            top_k=(torch.tensor(top_k, dtype=torch.int64, device=device).unsqueeze(1)
                   if any(s and k > 0 for s, k in zip(sampled, top_k)) else None),
            max_top_k=max(top_k, default=0),
            top_k_bounds_top_p=all(k > 0 for s, k, p in zip(sampled, top_k, params) if s and p.top_p < 1.0),
            top_k_covers_sampling=all(k > 0 for r, k in zip(racing, top_k) if r),
            any_racing=any(racing),
            unfiltered=torch.tensor(unfiltered, dtype=torch.bool, device=device) if any(unfiltered) else None,
            top_p=(col([p.top_p for p in params])
                   if any(s and p.top_p < 1.0 for s, p in zip(sampled, params)) else None),
            log_min_p=(col([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params])
                       if any(s and p.min_p > 0 for s, p in zip(sampled, params)) else None),
            repetition=repetition,
            output_penalty=output_penalty,
            suppressed=suppressed[:2] if suppressed is not None else None,
            logit_bias=bias,
            max_top_logprobs=max((p.top_logprobs for p in params), default=0),
            allowed_mask=allowed_mask(allowed, vocab_size, device) if allowed is not None else None,
            forced=(torch.tensor([-1 if t is None else t for t in forced], dtype=torch.int64, device=device)[:, None]
                    if forced is not None and any(t is not None for t in forced) else None),
        )


def allowed_mask(bitmasks: list[bytes | None], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """[B, V] bool from per-row grammar bitmasks (32-bit little-endian words, bit t = token t allowed; a mask
    may have spare words past the vocabulary); a None row allows every token. None when no row is constrained.
    numpy's unpackbits does the expansion: 0.3 ms for 16 x 151,936 on the 2-core box, 6x torch's shift-and."""
    if all(m is None for m in bitmasks):
        return None
    n_bytes = -(-vocab_size // 32) * 4
    free = b"\xff" * n_bytes
    rows = []
    for m in bitmasks:
        require(m is None or len(m) >= n_bytes, "allowed", f"a bitmask of {len(m or b'')} bytes is too short for "
                f"{vocab_size} tokens")
        rows.append(free if m is None else m[:n_bytes])
    packed = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), n_bytes)
    bits = np.unpackbits(packed, axis=1, count=vocab_size, bitorder="little")
    return torch.from_numpy(bits).view(torch.bool).to(device)


def _check_rows(b: int, **rows: Sequence) -> None:
    for name, values in rows.items():
        require(len(values) == b, name, f"has {len(values)} rows, expected {b}")


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    # [B] float32, log-prob of token_ids under the raw model distribution; None when no row asked for logprobs
    # (top_logprobs > 0), which saves a reduction over the vocabulary per step
    logprobs: torch.Tensor | None
    top_ids: torch.Tensor | None  # [B, n] int64, n = max top_logprobs in batch (None if all 0)
    top_logprobs: torch.Tensor | None  # [B, n] float32, raw log-probs of top_ids, descending


# ---- counter-based noise -----------------------------------------------------------------------------------

_GOLDEN = _to_int64(0x9E3779B97F4A7C15)
_MUL1 = _to_int64(0xBF58476D1CE4E5B9)
_MUL2 = _to_int64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 lanes: torch's >> is arithmetic, so clear the sign-extended bits."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser; int64 multiplication wraps mod 2**64, which is exactly the uint64 product."""
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """[B, n] float64 uniforms in the open interval (0, 1), a pure function of (seed, step, stream, column).

    seeds, steps: [B] int64. Row key = mix(mix(mix(seed ^ golden) ^ step) ^ stream); column c is the
    (c+1)-th output of a splitmix64 sequence started at that key. The top 52 bits give u = (k + 0.5) / 2**52,
    which is exact in float64 and never 0 or 1.
    """
    return uniform_noise_at(seeds, steps, stream, torch.arange(n, device=seeds.device)[None, :])


def uniform_noise_at(seeds: torch.Tensor, steps: torch.Tensor, stream: int, columns: torch.Tensor) -> torch.Tensor:
    """uniform_noise's values at the given columns only: [B, n] int64 columns (or [1, n]) -> [B, n] float64."""
    if not 0 <= stream < 2**63:
        raise ValueError(f"stream must be in [0, 2**63), got {stream}")
    key = _mix64(_mix64(_mix64(seeds.long() ^ _GOLDEN) ^ steps.long()) ^ stream)  # [B]
    offsets = (columns.long() + 1) * _GOLDEN
    bits = _shr(_mix64(key[:, None] + offsets), 12)  # [B, n] in [0, 2**52)
    return (bits.double() + 0.5) * 2.0**-52


# ---- logits processing --------------------------------------------------------------------------------------


def _penalize_and_suppress(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Steps 1-3 (2b included) on a float32 copy of logits [B, V]; also the logits greedy rows take their
    argmax of."""
    if logits.dim() != 2 or logits.shape != (batch.size, batch.vocab_size):
        raise ValueError(f"logits must have shape {(batch.size, batch.vocab_size)}, got {tuple(logits.shape)}")
    if batch.unprocessed_greedy:
        return logits  # nothing to apply, and an argmax needs no float32 copy
    x = logits.to(torch.float32)  # no copy for fp32 logits: the first entry update below copies instead

    def put(rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor | float) -> torch.Tensor:
        """x with x[rows, ids] = values; never writes into the caller's logits. Each (row, id) is listed once."""
        return x.index_put((rows, ids), torch.as_tensor(values, dtype=x.dtype, device=x.device)) \
            if x.data_ptr() == logits.data_ptr() else \
            x.index_put_((rows, ids), torch.as_tensor(values, dtype=x.dtype, device=x.device))
    if batch.repetition is not None:
        rows, ids, r = batch.repetition
        v = x[rows, ids]
        x = put(rows, ids, torch.where(v > 0, v / r, v * r))
    if batch.output_penalty is not None:
        rows, ids, amount = batch.output_penalty
        x = put(rows, ids, x[rows, ids] - amount)
    if batch.logit_bias is not None:  # ids are unique per row (SamplingParams)
        rows, ids, biases = batch.logit_bias
        x = put(rows, ids, x[rows, ids] + biases)
    if batch.suppressed is not None:
        x = put(*batch.suppressed, -math.inf)
    if batch.allowed_mask is not None:  # where(), not masked_fill(~mask): one pass instead of two (4x on a CPU)
        x = torch.where(batch.allowed_mask, x, torch.tensor(-math.inf, device=x.device))
    if batch.forced is not None:  # a forced row is one-hot, whatever the steps above did to its column
        one_hot = torch.where(torch.arange(x.shape[-1], device=x.device)[None, :] == batch.forced, 0.0, -math.inf)
        x = torch.where(batch.forced < 0, x, one_hot.to(x.dtype))
    return x


def _scaled(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Step 5: temperature (greedy rows carry 1)."""
    return x / batch.temperature if batch.temperature is not None else x


def _threshold(x: torch.Tensor | None, batch: SamplingBatch, top: torch.Tensor | None = None,
               full_lse: torch.Tensor | None = None) -> torch.Tensor | None:
    """Steps 6-8 (top-k, top-p, min-p) as one per-row threshold [B, 1] on temperature-scaled logits x [B, V]:
    keep logits >= threshold; None when no row filters. `top`: the max_top_k (or more) largest of x, descending;
    then x itself is not needed (None). A top-p row without a top-k measures mass against `full_lse`, the
    logsumexp of its scaled logits over the whole vocabulary (given with `top`; computed here from x)."""
    if batch.top_k is None and batch.top_p is None and batch.log_min_p is None:
        return None
    neg_inf = torch.full((batch.size, 1), -math.inf, device=batch.seeds.device)
    threshold = neg_inf
    k_cols = batch.max_top_k
    if batch.top_p is not None:
        # One descending order serves top-k and top-p; when every top-p row also has a top-k, the k largest are
        # all top-p can keep: a topk, not a full sort. Top-k's threshold is its k-th largest logit.
        if top is not None:
            desc = top
        elif batch.top_k_bounds_top_p and k_cols < x.shape[-1]:
            desc = row_topk(x, k_cols)[0]
        else:
            desc = x.sort(dim=-1, descending=True).values  # [B, V]
            full_lse = torch.logsumexp(x, dim=-1, keepdim=True)
        if batch.top_k is not None:
            kth = desc.gather(1, (batch.top_k - 1).clamp(min=0))
            threshold = torch.where(batch.top_k > 0, kth, neg_inf)
            desc = desc.masked_fill(desc < threshold, -math.inf)
        # Top-p keeps the shortest prefix whose mass reaches top_p: position i stays while the mass strictly
        # before it is < top_p (so the first token always stays). Rows with top_p == 1 are left alone even
        # if float rounding pushes their cumulative mass to 1.
        probs = _nucleus_probs(desc, batch, full_lse)
        mass_before = probs.cumsum(dim=-1) - probs
        keep = (mass_before < batch.top_p).sum(dim=-1, keepdim=True)  # [B, 1] >= 1
        p_threshold = torch.where(batch.top_p < 1.0, desc.gather(1, keep - 1), neg_inf)
        threshold = torch.maximum(threshold, p_threshold)
    elif batch.top_k is not None:
        top_values = top if top is not None else row_topk(x, k_cols)[0]  # [B, max_k]
        kth = top_values.gather(1, (batch.top_k - 1).clamp(min=0))
        threshold = torch.where(batch.top_k > 0, kth, neg_inf)
    if batch.log_min_p is not None:
        # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p); min_p = 0 gives -inf, i.e. keep all.
        x_max = top[:, :1] if top is not None else x.amax(dim=-1, keepdim=True)
        threshold = torch.maximum(threshold, x_max + batch.log_min_p)
    return threshold


def _nucleus_probs(desc: torch.Tensor, batch: SamplingBatch, full_lse: torch.Tensor | None) -> torch.Tensor:
    """Top-p's probabilities of descending scaled logits desc [B, n]: a top-k row's renormalised over its k (desc
    is -inf past them), another row's over the whole vocabulary (full_lse; None when no such row matters). The
    same formula whether desc is the whole sorted row or its largest candidates, so both give the same sums."""
    log_norm = desc.logsumexp(dim=-1, keepdim=True)
    if full_lse is not None:
        log_norm = full_lse if batch.top_k is None else torch.where(batch.top_k > 0, log_norm, full_lse)
    return (desc - log_norm).exp()


def _filtered_logits(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Steps 5-8 over the whole vocabulary: scaled logits, dropped ones at -inf. x: [B, V] float32."""
    x = _scaled(x, batch)
    threshold = _threshold(x, batch)
    return x if threshold is None else x.masked_fill(x < threshold, -math.inf)


def processed_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[B, V] float32: the distribution `sample` draws from; greedy rows are one-hot at their argmax."""
    x = _penalize_and_suppress(logits, batch)
    if batch.all_greedy:  # one-hot rows: no filtering or softmax over the vocabulary needed
        return torch.nn.functional.one_hot(row_argmax(x), batch.vocab_size).to(torch.float32)
    probs = _filtered_logits(x, batch).softmax(dim=-1)
    if batch.any_greedy:
        one_hot = torch.nn.functional.one_hot(row_argmax(x), batch.vocab_size).to(probs.dtype)
        probs = torch.where(batch.greedy[:, None], one_hot, probs)
    return probs


def _draw(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Steps 5-10 for the sampling rows of penalised logits x [B, V]: rows without a filter invert their CDF
    (`inverse_cdf_draw` of the softmax `processed_probs` returns for them), the others race (`_race_filtered`)."""
    if batch.unfiltered is None:
        return _race_filtered(x, batch)
    # all rows, not just the unfiltered ones: a 2 ms pass at batch 16 beats gathering rows (a sync on a GPU)
    drawn = inverse_cdf_draw(_scaled(x, batch).softmax(dim=-1), batch.seeds, batch.steps, STREAM_SAMPLE)
    if not batch.any_racing:
        return drawn
    return torch.where(batch.unfiltered, drawn, _race_filtered(x, batch))


def _race_filtered(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The exponential race for rows with a filter: argmax_i p_i / E_i with E_i ~ Exp(1) i.i.d. (picks i with
    probability p_i), computed as argmax over kept i of (x_i - log E_i). When every racing row has a top-k, its
    kept columns are among the max_k largest (checked: ties at a threshold may run past them, and then the whole
    vocabulary is used), so only those are scaled, filtered and given noise. Rows filtered by top-p or min-p
    alone try the FIRST_NUCLEUS_CANDIDATES largest, then the NUCLEUS_CANDIDATES largest, the same way (checked
    too: the nucleus must close inside them). A kept column's score is the same in every path, so the token is.
    Greedy and unfiltered rows get a value here that the caller discards."""
    vocab = x.shape[-1]
    exempt = batch.greedy if batch.unfiltered is None else batch.greedy | batch.unfiltered
    if batch.top_p is None:
        return _race_over_kept(x, batch, exempt)
    full_lse = None
    if batch.top_k_covers_sampling:
        widths = [batch.max_top_k]
    else:  # top-p rows without a top-k: their nucleus is usually small (the first try is a blocked topk)
        widths = sorted({max(batch.max_top_k, FIRST_NUCLEUS_CANDIDATES), max(batch.max_top_k, NUCLEUS_CANDIDATES)})
        full_lse = torch.logsumexp(_scaled(x, batch), dim=-1, keepdim=True)
    for width in widths:
        if width >= vocab:
            break
        # temperature > 0 keeps the order, so the largest penalised logits are the largest scaled ones; one
        # column more than the candidates tells whether the kept ones end inside them
        top_values, top_columns = row_topk(x, width + 1)
        top_values = _scaled(top_values, batch)
        threshold = _threshold(None, batch, top=top_values[:, :-1], full_lse=full_lse)
        inside = (top_values[:, -1:] < threshold) | exempt[:, None]
        if full_lse is not None:  # and a top-p row without a top-k must not keep that extra column either
            probs = (top_values - full_lse).exp()
            extra_mass_before = probs.cumsum(dim=-1)[:, -1:] - probs[:, -1:]  # as the full sort would compute it
            no_k = batch.top_k <= 0 if batch.top_k is not None else torch.ones_like(inside)
            inside &= ~(no_k & (batch.top_p < 1.0)) | (extra_mass_before >= batch.top_p) | exempt[:, None]
        if bool(inside.all()):
            values = top_values[:, :-1].masked_fill(top_values[:, :-1] < threshold, -math.inf)
            return _race(values, top_columns[:, :-1], batch)
    return _race(_filtered_logits(x, batch), torch.arange(vocab, device=x.device)[None, :], batch)


def _race_over_kept(x: torch.Tensor, batch: SamplingBatch, exempt: torch.Tensor) -> torch.Tensor:
    """`_race_filtered` for a batch without top-p rows. Top-k's and min-p's thresholds come exactly from the
    largest values (the k-th largest; the maximum + log min_p), whatever ties there are, and a column is kept
    only inside a block of ARGMAX_BLOCK columns whose maximum reaches its row's threshold: so race over the
    columns of those blocks (the others masked), without a pass over the whole vocabulary beyond the block
    maxima. Dividing by a positive temperature keeps the order (float division is monotonic), so the raw block
    maxima and largest values, scaled, are the scaled ones. bf16 logits tie often, and ties at a top-k threshold
    sent a whole batch to the vocabulary-wide race (30-39 ms at 16 x 151,936 with top-k 50)."""
    rows, vocab = x.shape
    blocks = _blocks(x)
    block_max = blocks.amax(dim=-1)  # [rows, nb], also what the largest values are found through
    nb, k = block_max.shape[1], max(batch.max_top_k, 1)
    top = _scaled(_topk_in_blocks(blocks, block_max, k)[0] if k <= nb else x.topk(k, dim=-1).values, batch)
    threshold = _threshold(None, batch, top=top)
    if threshold is None:  # no row filters (only a batch built by hand gets here): the whole vocabulary races
        return _race(_scaled(x, batch), torch.arange(vocab, device=x.device)[None, :], batch)
    kept_blocks = (_scaled(block_max, batch) >= threshold).sum(dim=-1).masked_fill(exempt, 0)
    n = int(kept_blocks.max())
    if n == 0 or 2 * n > nb:  # nothing to race (NaN thresholds) or most of the vocabulary: race over all of it
        scaled = _scaled(x, batch)
        return _race(scaled.masked_fill(scaled < threshold, -math.inf),
                     torch.arange(vocab, device=x.device)[None, :], batch)
    chosen = block_max.topk(n, dim=-1).indices  # each racing row's kept blocks are among its n largest
    values = _scaled(blocks.gather(1, chosen[:, :, None].expand(rows, n, ARGMAX_BLOCK)).reshape(rows, -1), batch)
    columns = (chosen[:, :, None] * ARGMAX_BLOCK + torch.arange(ARGMAX_BLOCK, device=x.device)).reshape(rows, -1)
    kept = values >= threshold
    # the race hashes noise per column: give it only the kept ones (each racing row's are its m largest)
    m = int(kept.sum(dim=-1).masked_fill(exempt, 0).max())
    values, where = values.masked_fill(~kept, -math.inf).topk(m, dim=-1)
    return _race(values, columns.gather(1, where), batch)


def token_logprobs(raw: torch.Tensor, tokens: list[int], n: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """raw_logprobs as lists: each token's raw log-prob, and each row's n most likely (id, log-prob), descending
    ([] each when n = 0)."""
    picked, values, ids = raw_logprobs(raw, torch.tensor(tokens, device=raw.device), n)
    if values is None:
        return picked.tolist(), [[] for _ in tokens]
    return picked.tolist(), [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


# Columns per block of inverse_cdf_draw's two-level search.
CDF_BLOCK = 128


def inverse_cdf_draw(probs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, stream: int) -> torch.Tensor:
    """One token per row drawn exactly from probs [B, V] (>= 0; rows need not be normalised) with one uniform
    u(seed, step, stream, column 0) per row: the first column whose cumulative mass exceeds u x the row's mass.

    Two levels, so the search needs no float64 copy of the vocabulary: float32 sums of CDF_BLOCK columns (short
    sums, so their rounding is ~1e-7 of a block's mass, not of the row's), a float64 cumsum over the blocks to
    find u's block, then a float64 cumsum inside that block alone. A column of zero mass is never chosen: the
    fraction of the block left over is clamped below the block's own total. 2 ms for 16 x 151,936 on the 2-core
    box, where a race needs 36 ms of hashing."""
    b, vocab = probs.shape
    w = probs.float()
    pad = -vocab % CDF_BLOCK
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    blocks = w.view(b, -1, CDF_BLOCK)
    cum = blocks.sum(dim=-1).double().cumsum(dim=-1)  # [B, n_blocks]
    total = cum[:, -1:]
    # u < 1, but u x mass may round up to the mass: keep the target below it, so the block found has mass > 0
    target = torch.minimum(uniform_noise(seeds, steps, stream, 1) * total,
                           torch.nextafter(total, torch.zeros_like(total)))
    block = torch.searchsorted(cum, target, right=True).clamp_(max=cum.shape[1] - 1)  # first block with cum > u
    before = torch.where(block > 0, cum.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(target))
    mass = cum.gather(1, block) - before
    inner = blocks.gather(1, block[:, :, None].expand(b, 1, CDF_BLOCK))[:, 0].double().cumsum(dim=-1)  # [B, 128]
    inner_total = inner[:, -1:]
    # where inside the block, as a fraction of its mass; float rounding may put it at or past the end: clamp
    left = ((target - before) / mass).clamp(min=0.0) * inner_total
    left = torch.minimum(left, torch.nextafter(inner_total, torch.zeros_like(inner_total)))
    column = torch.searchsorted(inner, left, right=True).clamp_(max=CDF_BLOCK - 1)
    return (block * CDF_BLOCK + column).squeeze(1).clamp_(max=vocab - 1)


def _race(values: torch.Tensor, columns: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """argmax_i (values_i - log E_i) with E_i = -log u(seed, step, column_i): the token id of each row."""
    log_e = uniform_noise_at(batch.seeds, batch.steps, STREAM_SAMPLE, columns).log_().neg_().float().log_()
    best = row_argmax(values - log_e)[:, None]
    return columns.expand(values.shape).gather(1, best).squeeze(1)


def greedy_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[B] int64: the token a greedy row takes, the argmax of its penalised and suppressed logits (what `sample`
    draws for it, and the one-hot `processed_probs` gives it) without building a [B, V] distribution."""
    return row_argmax(_penalize_and_suppress(logits, batch))


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Draw one token per row of logits [B, V] (any float dtype)."""
    x = _penalize_and_suppress(logits, batch)
    if not batch.any_greedy:
        tokens = _draw(x, batch)
    else:
        tokens = row_argmax(x)  # greedy choice, [B] (greedy_tokens, sharing x with the draw below)
        if not batch.all_greedy:
            tokens = torch.where(batch.greedy, tokens, _draw(x, batch))

    if batch.max_top_logprobs == 0:  # nobody asked: skip the vocabulary-wide reduction
        return SamplerOutput(token_ids=tokens, logprobs=None, top_ids=None, top_logprobs=None)
    logprobs, top_logprobs, top_ids = raw_logprobs(logits, tokens, batch.max_top_logprobs)
    return SamplerOutput(token_ids=tokens, logprobs=logprobs, top_ids=top_ids, top_logprobs=top_logprobs)


def raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Raw log-probs (the unprocessed model distribution) of tokens [T] under the rows of logits [T, V]: float32
    [T], and each row's n most likely as (log-probs [T, n] descending, ids [T, n]), or (None, None) for n = 0.
    logit - logsumexp: one reduction instead of materialising log_softmax [T, V]."""
    raw = logits.float()
    lse = torch.logsumexp(raw, dim=-1, keepdim=True)  # [T, 1]
    picked = (raw.gather(1, tokens[:, None]) - lse).squeeze(1)
    if not n:
        return picked, None, None
    values, ids = row_topk(raw, n)
    return picked, values - lse, ids
