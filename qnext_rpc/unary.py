"""GenerateUnary's result, gathered while the request runs: compact, and refused as soon as it cannot be sent.

A streamed request's tokens leave in each step's response; GenerateUnary answers with one message that holds
everything, so the server keeps it until the request ends. Kept as the chunks came, a token with 20
alternatives cost ~2.9 KB of Python objects (its proto ~230 bytes): n=16 samples of a 262K-token context at
top_logprobs=20 would have taken ~12 GB of the server, and then failed to send anyway (gRPC refuses a message
over the server's send limit, 64 MiB by default). Here each sample keeps flat arrays (ids, log-probs) and its
text as UTF-8 bytes, ~260 bytes a token at 20 alternatives and ~12 without, and the result's proto size is
bounded as it grows: when the bound passes the send limit the request ends at once with RESOURCE_EXHAUSTED,
naming what to change, instead of generating to the end for nothing.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from qnext.rpc.stream import Chunk, Finish
from qnext.rpc.tool_calls import ToolCallDelta
from qnext.worker.types import LogprobEntries

# Bytes a result message spends besides its samples' content: request_id, index, the choice's own framing and
# its FinishInfo (usage, timings, spec stats: fixed-width or small varints), not counting a stop string.
_MESSAGE_OVERHEAD = 160


class ResultTooLarge(Exception):
    """A GenerateUnary result outgrew the largest message the server sends (RESOURCE_EXHAUSTED)."""


def varint_len(value: int) -> int:
    """Bytes of `value` (>= 0) as a protobuf varint."""
    return max(1, (value.bit_length() + 6) // 7)


def entries_bytes(num_entries: int, k: int, max_id: int) -> int:
    """An upper bound of the proto bytes of `num_entries` TokenLogprobs entries with `k` alternatives each, no
    id above `max_id` (exact when no id or log-prob is 0: proto3 leaves those out)."""
    top = 2 + (1 + varint_len(max_id)) + 5  # tag + length, token_id, float logprob
    inner = (1 + varint_len(max_id)) + 5 + k * top
    return num_entries * (1 + varint_len(inner) + inner)


def _text_bytes(n: int) -> int:
    return 1 + varint_len(n) + n if n else 0


@dataclass
class SampleResult:
    """One sample's output so far (GenerateRequest.n: one each)."""

    index: int
    token_ids: array = field(default_factory=lambda: array("q"))
    text: bytearray = field(default_factory=bytearray)  # UTF-8 ("surrogatepass": as the proto would carry it)
    reasoning_text: bytearray = field(default_factory=bytearray)
    logprobs: LogprobEntries | None = None  # one entry per token when the request asked for top_logprobs
    logprob_bytes: int = 0
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    tool_call_bytes: int = 0
    prompt_logprobs: LogprobEntries | None = None
    prompt_token_ids: Sequence[int] = ()  # entry i of prompt_logprobs scores prompt_token_ids[i + 1]
    prompt_logprob_bytes: int = 0
    id_bytes: int = 0  # token_ids' packed varints
    finish: Finish | None = None

    def add(self, chunk: Chunk, top_logprobs: int) -> None:
        self.token_ids.extend(chunk.token_ids)
        self.id_bytes += sum(varint_len(t) for t in chunk.token_ids)
        if chunk.text:
            self.text += chunk.text.encode("utf-8", "surrogatepass")
        if chunk.reasoning_text:
            self.reasoning_text += chunk.reasoning_text.encode("utf-8", "surrogatepass")
        if chunk.logprobs:
            if self.logprobs is None:
                self.logprobs = LogprobEntries(top_logprobs)
            for t in chunk.logprobs:
                self.logprobs.append(t.logprob, t.top)
                self.logprob_bytes += entries_bytes(1, len(t.top), max([t.token_id, *(i for i, _ in t.top)]))
        for d in chunk.tool_calls:
            self.tool_calls.append(d)
            self.tool_call_bytes += 24 + sum(len(s.encode("utf-8", "surrogatepass"))
                                             for s in (d.id, d.name, d.arguments_delta))
        if chunk.prompt_logprobs is not None:
            plp = chunk.prompt_logprobs
            self.prompt_logprobs, self.prompt_token_ids = plp, chunk.prompt_token_ids
            self.prompt_logprob_bytes = entries_bytes(len(plp), plp.k, max([*chunk.prompt_token_ids, *plp.top_ids]))
        if chunk.finish is not None:
            self.finish = chunk.finish

    def bytes_bound(self) -> int:
        """An upper bound of this sample's GenerateResult size."""
        stop = self.finish.stop_string if self.finish is not None and self.finish.stop_string else ""
        return (_MESSAGE_OVERHEAD + len(stop.encode("utf-8", "surrogatepass")) * 2
                + (1 + varint_len(self.id_bytes) + self.id_bytes if self.id_bytes else 0)
                + _text_bytes(len(self.text)) + _text_bytes(len(self.reasoning_text))
                + self.logprob_bytes + self.tool_call_bytes + self.prompt_logprob_bytes)


class UnaryResult:
    """Every sample of one GenerateUnary request, fed each chunk as it is assembled (`add`)."""

    def __init__(self, top_logprobs: int, n: int, max_bytes: int) -> None:
        self.request_id = ""
        self.top_logprobs, self.n, self.max_bytes = top_logprobs, n, max_bytes
        self.samples: dict[int, SampleResult] = {}

    def add(self, chunk: Chunk) -> None:
        """Record `chunk`; ResultTooLarge when the result can no longer be sent in one message."""
        self.request_id = chunk.request_id
        sample = self.samples.get(chunk.index)
        if sample is None:
            sample = self.samples[chunk.index] = SampleResult(chunk.index)
        sample.add(chunk, self.top_logprobs)
        if chunk.token_ids or chunk.prompt_logprobs is not None:
            bound = self.bytes_bound()
            if bound > self.max_bytes:
                tokens = sum(len(s.token_ids) for s in self.samples.values())
                raise ResultTooLarge(
                    f"GenerateUnary: the result would be over the server's {self.max_bytes / 2**20:g} MiB message "
                    f"limit (~{bound / 2**20:.1f} MiB after {tokens} tokens over n={self.n} samples, "
                    f"top_logprobs={self.top_logprobs}): use Generate, which streams it, or lower "
                    "stopping.max_new_tokens, n, top_logprobs or prompt_logprobs")

    def bytes_bound(self) -> int:
        """An upper bound of the whole GenerateResult's size: with n > 1 sample 0 is in it twice (at the top
        level and as choices[0])."""
        bounds = {i: s.bytes_bound() for i, s in self.samples.items()}
        return sum(bounds.values()) + (bounds.get(0, 0) if self.n > 1 else 0)

    def entries(self) -> int:
        """Log-prob entries (a token's and each alternative) the result carries, for run_text_work's choice."""
        return sum((len(s.logprobs) * (1 + s.logprobs.k) if s.logprobs is not None else 0)
                   + (len(s.prompt_logprobs) * (1 + s.prompt_logprobs.k) if s.prompt_logprobs is not None else 0)
                   for s in self.samples.values())
