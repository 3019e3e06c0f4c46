"""One request's output, assembled from the worker's token ids: text deltas, stop strings, reasoning split,
tool calls (parsed out of the content, after the reasoning), logprobs, and the finish summary (usage, timings). Plain data in and out; convert.py makes the proto.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from qnext.rpc.text import IncrementalDetokenizer, ReasoningSplitter, StopStringMatcher, TextProcessor
from qnext.rpc.tool_calls import ToolCallDelta, ToolCallParser
from qnext.rpc.validate import PreparedRequest
from qnext.worker.types import FinishReason, LogprobEntries, RequestOutput

# The service's finish reasons: the engine's, plus the ones only the server knows.
STOP_STRING = "stop_string"
CANCELLED = "cancelled"
ERROR = "error"
TOOL_CALLS = "tool_calls"  # the model ended its turn (EOS / stop token) after making tool calls


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    prefill_ms: float
    time_to_first_token_ms: float
    total_ms: float
    num_preemptions: int


@dataclass(frozen=True)
class Finish:
    reason: str  # FinishReason value or STOP_STRING / CANCELLED / ERROR
    usage: Usage
    timings: Timings
    stop_token_id: int | None = None
    stop_string: str | None = None
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    draft_steps: int = 0


@dataclass
class Chunk:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    reasoning_text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: Finish | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    # in the first chunk of a request that asked: the worker's entries for prompt tokens 1.. (prompt_token_ids[1:]),
    # as they came (converted to the proto off the event loop when large: service.py)
    prompt_logprobs: LogprobEntries | None = None
    prompt_token_ids: Sequence[int] = ()
    index: int = 0  # which parallel sample (GenerateRequest.n)


class OutputAssembler:
    """Feed it each batch of RequestOutputs for one request; it returns the chunk to send."""

    def __init__(self, prepared: PreparedRequest, text: TextProcessor, reasoning_parser: bool,
                 arrival: float) -> None:
        self.prepared = prepared
        self.text = text
        self.detok = IncrementalDetokenizer(text)
        self.stops = StopStringMatcher(prepared.stop_strings, prepared.include_stop_strings)
        self.reasoning = ReasoningSplitter(prepared.starts_in_reasoning) if reasoning_parser else None
        self.tools = ToolCallParser() if prepared.parse_tool_calls else None
        self.arrival = arrival
        self.started: float | None = None
        self.first_token: float | None = None
        self.token_ids = array("q")  # every token so far: 8 bytes each (a list of ints took ~36)
        self.num_preemptions = 0
        self.spec = (0, 0, 0)  # (drafted, accepted, draft steps) so far: the engine's per-request MTP counters
        self.num_cached_tokens = 0  # prompt tokens the engine served from its prefix cache
        self.finish: Finish | None = None

    @property
    def stop_string_matched(self) -> bool:
        return self.stops.matched is not None

    def feed(self, outputs: list[RequestOutput]) -> Chunk:
        chunk = Chunk(self.prepared.request_id)
        engine_finish: RequestOutput | None = None
        for out in outputs:
            if out.new_token_ids and self.first_token is None:
                self.first_token = time.monotonic()
            chunk.token_ids += out.new_token_ids
            if self.prepared.top_logprobs:
                chunk.logprobs += [TokenLogprob(t, lp, top) for t, lp, top in
                                   zip(out.new_token_ids, out.logprobs, out.top_logprobs)]
            if out.prompt_logprobs is not None:
                chunk.prompt_logprobs, chunk.prompt_token_ids = out.prompt_logprobs, self.prepared.add.prompt_token_ids
            self.num_preemptions = out.num_preemptions
            self.spec = tuple(getattr(out, f, 0) for f in ("num_drafted_tokens", "num_accepted_tokens",
                                                             "num_draft_steps"))
            self.num_cached_tokens = getattr(out, "num_cached_tokens", 0)
            if out.finished:
                engine_finish = out
                break
        self.token_ids.extend(chunk.token_ids)
        final = engine_finish is not None
        delta = self.detok.push(chunk.token_ids) + (self.detok.flush() if final else "")
        self._add_text(chunk, self.stops.push(delta, final=final or self.stop_string_matched), final)
        if self.stop_string_matched:
            chunk.finish = self._finish(STOP_STRING, stop_string=self.stops.matched)
        elif engine_finish is not None:
            reason = engine_finish.finish_reason or FinishReason.LENGTH
            ended_turn = reason in (FinishReason.EOS, FinishReason.STOP_TOKEN)
            stop_id = self.token_ids[-1] if ended_turn else None
            name = CANCELLED if reason == FinishReason.ABORTED else reason.value
            if ended_turn and self.tools is not None and self.tools.calls:
                name = TOOL_CALLS
            chunk.finish = self._finish(name, stop_token_id=stop_id)
        return chunk

    def cancel(self, reason: str = CANCELLED) -> Finish:
        return self._finish(reason)

    def _add_text(self, chunk: Chunk, text: str, final: bool) -> None:
        final = final or self.stop_string_matched
        if self.reasoning is None:
            chunk.text = text
        else:
            chunk.reasoning_text, chunk.text = self.reasoning.push(text, final=final)
        if self.tools is not None:
            chunk.text, chunk.tool_calls = self.tools.push(chunk.text, final=final)

    def _finish(self, reason: str, stop_token_id: int | None = None, stop_string: str | None = None) -> Finish:
        now = time.monotonic()
        started = self.started if self.started is not None else (self.first_token or now)
        first = self.first_token if self.first_token is not None else now
        ms = lambda a, b: max(0.0, (b - a) * 1000.0)  # noqa: E731
        timings = Timings(queue_ms=ms(self.arrival, started), prefill_ms=ms(started, first),
                          time_to_first_token_ms=ms(self.arrival, first), total_ms=ms(self.arrival, now),
                          num_preemptions=self.num_preemptions)
        usage = Usage(prompt_tokens=len(self.prepared.add.prompt_token_ids), completion_tokens=len(self.token_ids),
                      cached_tokens=self.num_cached_tokens,
                      reasoning_tokens=self._reasoning_tokens())
        self.finish = Finish(reason=reason, usage=usage, timings=timings, stop_token_id=stop_token_id,
                             stop_string=stop_string, drafted_tokens=self.spec[0], accepted_tokens=self.spec[1],
                             draft_steps=self.spec[2])
        return self.finish

    def _reasoning_tokens(self) -> int:
        if self.reasoning is None:
            return 0
        end = self.text.think_end_id
        if end is not None and end in self.token_ids:
            return self.token_ids.index(end)
        return len(self.token_ids) if self.reasoning.in_reasoning else 0
