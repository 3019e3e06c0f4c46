"""Thin gRPC handlers: proto -> validated request -> batcher -> assembled chunks -> proto.

`_grpc_errors` wraps every handler: it is the one place that maps exceptions to gRPC status codes, answers
undecodable request bytes INVALID_ARGUMENT, and counts every finished call by method and code (Metrics.count_rpc).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog

from qnext.rpc import convert
from qnext.rpc.batcher import (AdmissionError, Batcher, RequestFailed, RequestOutOfMemory,
                               WorkerUnavailable)
from qnext.rpc.metrics import Metrics
from qnext.rpc.stream import CANCELLED, Chunk, OutputAssembler
from qnext.rpc.text import TextProcessor
from qnext.rpc.text_pool import prepare_off_loop, run_text_work
from qnext.rpc.unary import ResultTooLarge, UnaryResult
from qnext.rpc.validate import Limits, check_detokenize, check_tokenize, tool_list, tools_size

log = structlog.get_logger("qnext.service")

_STATUS: list[tuple[type[Exception], grpc.StatusCode]] = [  # first match wins
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (AdmissionError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RequestOutOfMemory, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (WorkerUnavailable, grpc.StatusCode.UNAVAILABLE),
    (RequestFailed, grpc.StatusCode.INTERNAL),
    (ResultTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
]
_GENERATION_METHODS = ("Generate", "GenerateUnary")
_DEADLINE_SLACK_S = 0.1


def status_for(e: BaseException) -> grpc.StatusCode:
    return next((code for kind, code in _STATUS if isinstance(e, kind)), grpc.StatusCode.INTERNAL)


async def _abort(context: grpc.aio.ServicerContext, e: Exception) -> None:
    code = status_for(e)
    if code == grpc.StatusCode.INTERNAL and not isinstance(e, RequestFailed):  # a bug here: the traceback
        log.exception("internal error")
    known = code != grpc.StatusCode.INTERNAL or isinstance(e, RequestFailed)
    await context.abort(code, str(e) if known else f"internal error: {e!r}")


def _final_code(context: grpc.aio.ServicerContext, e: BaseException | None) -> grpc.StatusCode:
    """The status the client sees when a handler ended with `e` (None: returned normally)."""
    if e is None:
        return grpc.StatusCode.OK
    if isinstance(e, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    if isinstance(e, (asyncio.CancelledError, GeneratorExit)):  # the client went away, or its deadline did
        # the client's timer fires a little before ours: a cancel this close to the deadline is the deadline
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= _DEADLINE_SLACK_S else \
            grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def require_decoded(request: Any) -> None:
    if isinstance(request, convert.Undecodable):
        raise ValueError(request.reason)


def _grpc_errors(fn: Callable) -> Callable:
    method = fn.__name__
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def stream(self: GenerationService, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            error: BaseException | None = None
            try:
                try:
                    async for item in fn(self, request, context):
                        yield item
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as e:  # noqa: BLE001 - mapped to a status right here
                    await _abort(context, e)
            except BaseException as e:
                error = e
                raise
            finally:
                self._count(method, context, _final_code(context, error))
        return stream

    @functools.wraps(fn)
    async def unary(self: GenerationService, request: Any, context: grpc.aio.ServicerContext) -> Any:
        error: BaseException | None = None
        try:
            try:
                if method not in _GENERATION_METHODS:  # _generate checks (and counts) its own
                    require_decoded(request)
                return await fn(self, request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:  # noqa: BLE001
                await _abort(context, e)
        except BaseException as e:
            error = e
            raise
        finally:
            self._count(method, context, _final_code(context, error))
    return unary


def _logprob_entries(chunks: list[Chunk]) -> int:
    """Log-prob entries (a token's and each alternative) the responses of `chunks` carry: their proto takes
    ~1 us an entry to build (0.63-0.68 s for a 32K-token prompt's prompt_logprobs at 20 alternatives), so many of
    them are built on the text pool (run_text_work), where the loop keeps its turns at the GIL meanwhile. For a
    plain token this check and the pool's inline call add ~1 us to its response (1.9 -> 2.9 us)."""
    return sum(sum(1 + len(t.top) for t in c.logprobs)
               + (len(c.prompt_logprobs) * (1 + c.prompt_logprobs.k) if c.prompt_logprobs is not None else 0)
               for c in chunks)


# Prompt log-prob entries per streamed response: ~1 MB at 20 alternatives, so a long prompt's entries reach a
# client whose gRPC channel keeps the default 4 MB receive limit (a 262K-token prompt's would be ~60 MB at once).
PROMPT_LOGPROBS_PER_RESPONSE = 4096


def split_prompt_logprobs(chunk: Chunk) -> list[Chunk]:
    """`chunk`, preceded by responses that carry only its leading prompt log-prob entries when it has more than
    PROMPT_LOGPROBS_PER_RESPONSE of them (in order: concatenated they are the whole list)."""
    plp, n = chunk.prompt_logprobs, PROMPT_LOGPROBS_PER_RESPONSE
    if plp is None or len(plp) <= n:
        return [chunk]
    ids = chunk.prompt_token_ids  # entry i scores ids[i + 1]
    starts = range(0, len(plp), n)
    parts = [Chunk(chunk.request_id, index=chunk.index, prompt_logprobs=plp.part(a, a + n),
                   prompt_token_ids=ids[a:a + n + 1]) for a in starts[:-1]]
    last = starts[-1]
    return [*parts, dataclasses.replace(chunk, prompt_logprobs=plp.part(last, len(plp)), prompt_token_ids=ids[last:])]


class GenerationService(convert.GenerationServicer):
    def __init__(self, batcher: Batcher, text: TextProcessor, limits: Limits, metrics: Metrics,
                 reasoning_parser: bool, server_limits: dict[str, int], stream_interval: int,
                 max_message_bytes: int) -> None:
        """`stream_interval`: after the first token, a stream's responses carry at least this many tokens (the
        last one fewer): fewer messages, less CPU per token for server and client, coarser streaming.
        `max_message_bytes`: the server's gRPC send limit, which a GenerateUnary result must fit."""
        self.batcher = batcher
        self.max_message_bytes = max_message_bytes
        self.stream_interval = stream_interval
        self.text = text
        self.limits = limits
        self.metrics = metrics
        self.reasoning_parser = reasoning_parser
        self.server_limits = server_limits
        self._admitted: set[int] = set()  # id(context) of generation calls that reached the batcher

    def _count(self, method: str, context: grpc.aio.ServicerContext, code: grpc.StatusCode) -> None:
        """Every finished call by method and code; a generation request refused before the batcher (invalid,
        undecodable, over the limits, draining) also counts in qnext_requests by its code, as admitted ones do
        there by how they finished."""
        self.metrics.count_rpc(method, code)
        if method in _GENERATION_METHODS and id(context) not in self._admitted:
            self.metrics.requests.labels(status=code.name.lower()).inc()
        self._admitted.discard(id(context))

    @_grpc_errors
    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for chunk in self._generate(request, context):
            for part in split_prompt_logprobs(chunk):
                yield await run_text_work(_logprob_entries([part]), convert.generate_response, part)

    @_grpc_errors
    async def GenerateUnary(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        require_decoded(request)
        result = UnaryResult(request.top_logprobs, max(1, request.n), self.max_message_bytes)
        async for _ in self._generate(request, context, result.add):
            pass
        return await run_text_work(result.entries(), convert.generate_result, result)

    async def _generate(self, request: Any, context: grpc.aio.ServicerContext,
                        on_chunk: Callable[[Chunk], None] | None = None) -> AsyncIterator[Chunk]:
        """The request's chunks as they are assembled; `on_chunk` sees each first, inside the request's own error
        handling (GenerateUnary's result: its ResultTooLarge ends the request here, releasing it at once)."""
        require_decoded(request)
        prepared = await prepare_off_loop(convert.parse_generate(request), self.limits, self.text)
        rid = prepared.request_id
        rlog = log.bind(request_id=rid)
        handle = self.batcher.submit(prepared.add)
        self._admitted.add(id(context))
        rlog = rlog.bind(key=handle.key)  # the worker's logs name the request by this key
        self.metrics.pending.inc()
        self.metrics.prompt_tokens.inc(len(prepared.add.prompt_token_ids))  # once, whatever n
        # one assembler per parallel sample (GenerateRequest.n): its own text, stop strings, reasoning split
        asms = [OutputAssembler(prepared, self.text, self.reasoning_parser, handle.arrival)
                for _ in range(prepared.add.n)]
        status, last = "cancelled", None
        try:
            while any(a.finish is None for a in asms):
                started = any(a.first_token is not None for a in asms)
                outputs = await handle.next(self.stream_interval if started else 1)
                by_sample = [(0, outputs)] if len(asms) == 1 else \
                    [(i, [o for o in outputs if o.index == i]) for i in sorted({o.index for o in outputs})]
                for index, sample_outputs in by_sample:
                    asm = asms[index]
                    if asm.finish is not None:
                        continue  # a sample a stop string ended: what it made meanwhile is dropped
                    asm.started = handle.started
                    chunk = asm.feed(sample_outputs)
                    chunk.index = index
                    if asm.stop_string_matched and len(asms) > 1:
                        self.batcher.abort_sample(handle, index)  # the others go on
                    self._observe_tokens(asm, len(chunk.token_ids), last)
                    last = time.monotonic()
                    if on_chunk is not None:
                        on_chunk(chunk)
                    yield chunk
            status = asms[0].finish.reason
        except Exception as e:
            status = status_for(e).name.lower()
            raise
        finally:
            self.batcher.release(handle)  # frees the worker's cache now if it is still generating
            self.metrics.pending.dec()
            self._summary(rlog, asms, status)

    def _observe_tokens(self, asm: OutputAssembler, n: int, last: float | None) -> None:
        if n == 0:
            return
        now = time.monotonic()
        if last is None and asm.first_token is not None:
            self.metrics.ttft.observe(asm.first_token - asm.arrival)
        elif last is not None:
            for _ in range(n):
                self.metrics.inter_token.observe((now - last) / n)

    def _summary(self, rlog: Any, asms: list[OutputAssembler], status: str) -> None:
        """One line and one count per request, its parallel samples together (the prompt counted once)."""
        finishes = [a.finish or a.cancel(CANCELLED) for a in asms]
        finish = finishes[0]
        self.metrics.requests.labels(status=status).inc()
        self.metrics.e2e.observe(max(f.timings.total_ms for f in finishes) / 1000.0)
        self.metrics.num_prompt += finish.usage.prompt_tokens
        t = finish.timings
        rlog.info("request done", status=status, prompt_tokens=finish.usage.prompt_tokens,
                  completion_tokens=sum(f.usage.completion_tokens for f in finishes),
                  cached_tokens=finish.usage.cached_tokens, samples=len(asms), queue_ms=round(t.queue_ms, 1),
                  ttft_ms=round(t.time_to_first_token_ms, 1), total_ms=round(t.total_ms, 1),
                  preemptions=t.num_preemptions)

    @_grpc_errors
    async def Tokenize(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        text, chat, thinking, allow_special, tool_specs = convert.parse_tokenize(request)
        size = check_tokenize(text, chat, self.limits)  # Generate's limits, before any work
        tools = tool_list(tool_specs, self.limits)  # rendered into the prompt as Generate renders them
        size += tools_size(tool_specs)

        def work() -> Any:  # the token strings and the response of a long input take time too: all on the pool
            ids = self.text.encode(text, allow_special) if chat is None else \
                self.text.encode_chat(chat, thinking, allow_special, tools=tools)
            tokens, response = self.text.tokens(ids), convert.tokenize_response([], [])
            for i in range(0, len(ids), 1 << 16):  # one call held the GIL (stalling the loop) 90 ms for 1.6M ids
                response.ids.extend(ids[i:i + (1 << 16)])
                response.tokens.extend(tokens[i:i + (1 << 16)])
            return response
        return await run_text_work(size, work)

    @_grpc_errors
    async def Detokenize(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        ids, skip = convert.detokenize_request(request)
        check_detokenize(ids, self.limits)  # the count before any work, then the vocabulary
        return convert.detokenize_response(await run_text_work(len(ids), self.text.decode, ids, skip))

    @_grpc_errors
    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        ready = self.batcher.ready
        if ready is None:
            raise WorkerUnavailable("the worker is not ready (starting or restarting); retry shortly")
        return convert.model_info(ready, self.limits, {
            **self.server_limits, "reasoning_parser": self.reasoning_parser,
            "has_chat_template": self.text.has_chat_template})

    @_grpc_errors
    async def ResetPrefixCache(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        reset = await self.batcher.reset_prefix_cache()
        log.info("prefix cache reset", checkpoints_freed=reset.checkpoints_freed, kv_blocks_freed=reset.kv_blocks_freed)
        return convert.reset_prefix_cache_response(reset)

    @_grpc_errors
    async def GetServerStats(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        m = self.metrics
        return convert.server_stats(self.batcher.stats, {
            "num_pending": self.batcher.num_pending, "worker_ready": self.batcher.ready is not None,
            "draining": self.batcher.draining, "num_worker_restarts": self.batcher.num_restarts,
            "num_requests_finished": m.num_finished, "num_prompt_tokens": m.num_prompt,
            "num_generated_tokens": m.num_generated, "generation_tokens_per_second": m.tokens_per_second(),
            "uptime_s": time.monotonic() - m.started,
            "worker_pid": self.batcher.ready.pid if self.batcher.ready else 0})
