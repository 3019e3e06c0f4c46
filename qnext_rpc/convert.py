"""Proto <-> plain Python. The only module that imports the generated `*_pb2` stubs."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from qnext.v1 import generation_pb2 as pb
from qnext.v1 import generation_pb2_grpc as pb_grpc
from qnext.rpc.messages import Ready
from qnext.worker.types import EngineStats, LogprobEntries
from qnext.rpc.stream import Chunk, Finish, TokenLogprob
from qnext.rpc.text import ChatMessage
from qnext.rpc.tool_calls import Tool, assemble_calls
from qnext.rpc.unary import SampleResult, UnaryResult
from qnext.rpc.validate import SAMPLING_FIELDS, GenerateSpec, Limits

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
DESCRIPTOR = pb.DESCRIPTOR
GenerationServicer = pb_grpc.GenerationServicer
GenerationStub = pb_grpc.GenerationStub


@dataclass(frozen=True)
class Undecodable:
    """What a handler receives for request bytes that are not a valid message of its type (corrupt wire
    format, bad UTF-8 in a string field): the service answers INVALID_ARGUMENT with `reason`."""

    reason: str


def _lenient_parser(message_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as e:  # grpc would answer UNKNOWN naming the Python exception
            why = str(e).rpartition(": ")[2]
            return Undecodable(f"request: not a valid {message_type.DESCRIPTOR.full_name} message ({why})")
    return parse


def add_servicer(servicer: Any, server: Any) -> None:
    """Register the Generation service as the generated `add_GenerationServicer_to_server` does, except that
    undecodable requests reach the handler as `Undecodable` instead of failing inside grpc."""
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["Generation"].methods:
        request, response = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(getattr(servicer, m.name), request_deserializer=_lenient_parser(request),
                                response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)

_FINISH = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS, "stop_token": pb.FINISH_REASON_STOP_TOKEN,
           "stop_string": pb.FINISH_REASON_STOP_STRING, "cancelled": pb.FINISH_REASON_CANCELLED,
           "error": pb.FINISH_REASON_ERROR, "tool_calls": pb.FINISH_REASON_TOOL_CALLS}
FINISH_NAMES = {v: k for k, v in _FINISH.items()}


def parse_generate(req: Any) -> GenerateSpec:
    spec = GenerateSpec(request_id=req.request_id, top_logprobs=req.top_logprobs)
    kind = req.WhichOneof("input")
    if kind == "text":
        spec.text = req.text
    elif kind == "token_ids":
        spec.token_ids = req.token_ids.ids  # not copied: validate checks the count before touching each id
    elif kind == "chat":
        # The proto's messages as they are (each has .role and .content, as ChatMessage): validate checks their
        # count first; converting them all before that took 8 s of the event loop for 8M empty messages (16 MB).
        spec.chat = req.chat.messages
        spec.enable_thinking = req.chat.enable_thinking if req.chat.HasField("enable_thinking") else None
        spec.tools = req.chat.tools  # uncopied too: validate checks the count first
        spec.tool_choice = req.chat.tool_choice
    fmt = req.response_format.WhichOneof("format") if req.HasField("response_format") else None
    if fmt is not None:
        spec.response_format = (fmt, "" if fmt == "json_object" else getattr(req.response_format, fmt))
        if fmt == "json_object" and not req.response_format.json_object:
            spec.response_format = None  # json_object: false is no constraint
    s = req.sampling
    spec.sampling = {name: getattr(s, name) for name in SAMPLING_FIELDS if s.HasField(name)}
    spec.logit_bias = s.logit_bias  # uncopied: validate checks its size first
    st = req.stopping
    spec.max_new_tokens = st.max_new_tokens if st.HasField("max_new_tokens") else None
    spec.min_new_tokens = st.min_new_tokens
    spec.stop_strings = list(st.stop_strings)
    spec.stop_token_ids = list(st.stop_token_ids)
    spec.ignore_eos = st.ignore_eos
    spec.include_stop_strings = st.include_stop_strings
    if st.HasField("max_reasoning_tokens"):
        spec.max_reasoning_tokens = st.max_reasoning_tokens
    if req.HasField("prompt_logprobs"):
        spec.prompt_logprobs = req.prompt_logprobs
    spec.n = req.n or 1
    if req.HasField("num_speculative_tokens"):
        spec.num_speculative_tokens = req.num_speculative_tokens
    spec.bypass_prefix_cache = req.bypass_prefix_cache
    spec.cache_checkpoints = list(req.cache_checkpoints)
    spec.allow_special_tokens = req.allow_special_tokens
    spec.priority = req.priority
    return spec


def parse_tokenize(req: Any) -> tuple[str | None, list[ChatMessage] | None, bool | None, bool, Any]:
    """(text, chat messages, enable_thinking, allow_special_tokens, the chat's tools as the proto has them)."""
    kind = req.WhichOneof("input")
    if kind == "text":
        return req.text, None, None, req.allow_special_tokens, ()
    if kind == "chat":  # uncopied, as in parse_generate
        thinking = req.chat.enable_thinking if req.chat.HasField("enable_thinking") else None
        return None, req.chat.messages, thinking, req.allow_special_tokens, req.chat.tools
    return None, None, None, req.allow_special_tokens, ()


def _logprobs(items: list[TokenLogprob]) -> list[Any]:
    return [pb.TokenLogprobs(token_id=t.token_id, logprob=t.logprob,
                             top=[pb.TopLogprob(token_id=i, logprob=lp) for i, lp in t.top]) for t in items]


def _entries(token_ids: Sequence[int], entries: LogprobEntries | None) -> list[Any]:
    """The proto entries of log-probs kept as arrays: entry i scores token_ids[i]."""
    if entries is None:
        return []
    k, ids, lps = entries.k, entries.top_ids, entries.top_logprobs
    return [pb.TokenLogprobs(token_id=t, logprob=lp, top=[pb.TopLogprob(token_id=a, logprob=b) for a, b in
                                                           zip(ids[i * k:(i + 1) * k], lps[i * k:(i + 1) * k])])
            for i, (t, lp) in enumerate(zip(token_ids, entries.logprobs))]


def _prompt_logprobs(c: Chunk) -> list[Any]:
    """The proto entries of a chunk's prompt log-probs (entry i scores prompt token i + 1)."""
    return _entries(c.prompt_token_ids[1:], c.prompt_logprobs)


def finish_info(f: Finish) -> Any:
    info = pb.FinishInfo(
        reason=_FINISH[f.reason],
        usage=pb.Usage(prompt_tokens=f.usage.prompt_tokens, completion_tokens=f.usage.completion_tokens,
                       cached_tokens=f.usage.cached_tokens, reasoning_tokens=f.usage.reasoning_tokens),
        spec=pb.SpecStats(drafted_tokens=f.drafted_tokens, accepted_tokens=f.accepted_tokens,
                          draft_steps=f.draft_steps),
        timings=pb.Timings(queue_ms=f.timings.queue_ms, prefill_ms=f.timings.prefill_ms,
                           time_to_first_token_ms=f.timings.time_to_first_token_ms, total_ms=f.timings.total_ms,
                           num_preemptions=f.timings.num_preemptions))
    if f.stop_string is not None:
        info.stop_string = f.stop_string
    elif f.stop_token_id is not None:
        info.stop_token_id = f.stop_token_id
    return info


def generate_response(c: Chunk) -> Any:
    resp = pb.GenerateResponse(token_ids=c.token_ids, text=c.text, reasoning_text=c.reasoning_text,
                               logprobs=_logprobs(c.logprobs), prompt_logprobs=_prompt_logprobs(c),
                               index=c.index,
                               tool_calls=[pb.ToolCallDelta(index=d.index, id=d.id, name=d.name,
                                                            arguments_delta=d.arguments_delta) for d in c.tool_calls])
    if c.finish is not None:
        resp.finish.CopyFrom(finish_info(c.finish))
    return resp


def _sample_result(request_id: str, s: SampleResult) -> Any:
    res = pb.GenerateResult(request_id=request_id, token_ids=s.token_ids,
                            text=s.text.decode("utf-8", "surrogatepass"),
                            reasoning_text=s.reasoning_text.decode("utf-8", "surrogatepass"),
                            logprobs=_entries(s.token_ids, s.logprobs),
                            prompt_logprobs=_entries(s.prompt_token_ids[1:], s.prompt_logprobs),
                            tool_calls=[pb.ToolCall(id=t.id, name=t.name, arguments_json=t.arguments_json)
                                        for t in assemble_calls(s.tool_calls)],
                            index=s.index)
    if s.finish is not None:
        res.finish.CopyFrom(finish_info(s.finish))
    return res


def generate_result(result: UnaryResult) -> Any:
    """GenerateUnary's GenerateResult: sample 0 at the top level, and one choice per sample when n > 1."""
    rid, samples = result.request_id, [result.samples[i] for i in sorted(result.samples)]
    if not samples:
        return pb.GenerateResult(request_id=rid)
    top = _sample_result(rid, result.samples[0]) if 0 in result.samples else pb.GenerateResult(request_id=rid)
    if result.n > 1:
        top.choices.extend(_sample_result(rid, s) for s in samples)
    return top


def tokenize_response(ids: list[int], tokens: list[str]) -> Any:
    return pb.TokenizeResponse(ids=ids, tokens=tokens)


def detokenize_request(req: Any) -> tuple[Any, bool]:
    """The ids uncopied (the proto's repeated field): the service checks their count before any work."""
    return req.ids, req.skip_special_tokens


def detokenize_response(text: str) -> Any:
    return pb.DetokenizeResponse(text=text)


def model_info(ready: Ready, limits: Limits, server: dict[str, Any]) -> Any:
    m = ready.model
    return pb.ModelInfo(
        model_id=m.model_dir.rstrip("/").rsplit("/", 1)[-1], architecture=m.architecture, dtype=m.dtype,
        quantization=m.quantization, max_model_len=limits.max_model_len, vocab_size=m.vocab_size,
        eos_token_ids=list(m.eos_token_ids), mtp_available=m.num_mtp_layers > 0,
        max_num_speculative_tokens=limits.max_num_speculative_tokens, max_stop_strings=limits.max_stop_strings,
        max_stop_string_length=limits.max_stop_string_length, default_max_new_tokens=limits.default_max_new_tokens,
        num_kv_cache_tokens=ready.cache.num_kv_tokens, num_state_slots=ready.cache.num_slots,
        default_sampling=pb.SamplingParams(**limits.default_sampling), device=m.device,
        kv_cache_dtype=m.kv_cache_dtype, state_dtype=m.state_dtype,
        scheduling_policy="priority" if limits.priority_scheduling else "fcfs", **server)


def server_stats(w: EngineStats, server: dict[str, Any]) -> Any:
    return pb.ServerStats(num_running=w.num_running, num_waiting=w.num_waiting, kv_blocks_used=w.kv_blocks_used,
                          kv_blocks_total=w.kv_blocks_total, state_slots_used=w.state_slots_used,
                          state_slots_total=w.state_slots_total, num_steps=w.num_steps,
                          num_prompt_tokens_computed=w.num_prompt_tokens_computed,
                          spec_drafted_tokens=w.spec_drafted_tokens, spec_accepted_tokens=w.spec_accepted_tokens,
                          spec_draft_steps=w.spec_draft_steps, spec_draft_length=w.spec_draft_length,
                          prefix_cache_enabled=w.prefix_cache_enabled, prefix_cache_queries=w.prefix_cache_queries,
                          prefix_cache_hits=w.prefix_cache_hits, prefix_cache_query_tokens=w.prefix_cache_query_tokens,
                          prefix_cache_hit_tokens=w.prefix_cache_hit_tokens, checkpoints_used=w.checkpoints_used,
                          checkpoints_total=w.checkpoints_total, checkpoint_evictions=w.checkpoint_evictions,
                          kv_blocks_cached=w.kv_blocks_cached, kv_block_evictions=w.kv_block_evictions, **server)


def reset_prefix_cache_response(reset: Any) -> Any:
    return pb.ResetPrefixCacheResponse(checkpoints_freed=reset.checkpoints_freed, kv_blocks_freed=reset.kv_blocks_freed)


def empty_reset_prefix_cache_request() -> Any:
    return pb.ResetPrefixCacheRequest()


def _chat_message(m: Any) -> Any:
    """A (role, content) pair or a qnext.rpc.text.ChatMessage (with tool_calls / tool_call_id) as the proto's."""
    if isinstance(m, tuple):
        return pb.ChatMessage(role=m[0], content=m[1])
    return pb.ChatMessage(role=m.role, content=m.content, tool_call_id=m.tool_call_id,
                          tool_calls=[pb.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json)
                                      for c in m.tool_calls])


def request(**fields: Any) -> Any:
    """A GenerateRequest from keyword fields (for clients): text=/token_ids=/chat=[(role, content) or ChatMessage],
    tools=[Tool], tool_choice=, response_format=(kind, source), the sampling fields and logit_bias={id: bias}, the
    stopping fields, ..."""
    req = pb.GenerateRequest(request_id=fields.pop("request_id", ""), top_logprobs=fields.pop("top_logprobs", 0))
    if "text" in fields:
        req.text = fields.pop("text")
    elif "token_ids" in fields:
        req.token_ids.ids.extend(fields.pop("token_ids"))
    elif "chat" in fields:
        req.chat.messages.extend(_chat_message(m) for m in fields.pop("chat"))
        req.chat.SetInParent()
    if "tools" in fields:  # Tools (qnext.rpc.tool_calls)
        req.chat.tools.extend(_tool(t) for t in fields.pop("tools"))
    if "tool_choice" in fields:
        req.chat.tool_choice = fields.pop("tool_choice")
    if "response_format" in fields:  # (kind, source), e.g. ("json_schema", "{...}"), ("json_object", "")
        kind, source = fields.pop("response_format")
        setattr(req.response_format, kind, True if kind == "json_object" else source)
    if "enable_thinking" in fields:
        req.chat.enable_thinking = fields.pop("enable_thinking")
    if "num_speculative_tokens" in fields:
        req.num_speculative_tokens = fields.pop("num_speculative_tokens")
    if "bypass_prefix_cache" in fields:
        req.bypass_prefix_cache = fields.pop("bypass_prefix_cache")
    if "cache_checkpoints" in fields:
        req.cache_checkpoints.extend(fields.pop("cache_checkpoints"))
    if "priority" in fields:
        req.priority = fields.pop("priority")
    if "prompt_logprobs" in fields:
        req.prompt_logprobs = fields.pop("prompt_logprobs")
    if "n" in fields:
        req.n = fields.pop("n")
    for name in SAMPLING_FIELDS:
        if name in fields:
            setattr(req.sampling, name, fields.pop(name))
    if "logit_bias" in fields:  # {token id: bias}
        req.sampling.logit_bias.update(fields.pop("logit_bias"))
    for name in ("max_new_tokens", "min_new_tokens", "ignore_eos", "include_stop_strings", "max_reasoning_tokens"):
        if name in fields:
            setattr(req.stopping, name, fields.pop(name))
    for name in ("stop_strings", "stop_token_ids"):
        if name in fields:
            getattr(req.stopping, name).extend(fields.pop(name))
    if fields:
        raise TypeError(f"unknown GenerateRequest fields: {sorted(fields)}")
    return req


def _tool(t: Tool) -> Any:
    return pb.Tool(name=t.name, description=t.description,
                   parameters_json_schema=json.dumps(t.parameters) if t.parameters else "")


def tokenize_request(text: str | None = None, chat: list[tuple[str, str]] | None = None,
                     tools: Sequence[Tool] = ()) -> Any:
    """`tools` (with chat): rendered by the chat template as Generate renders them."""
    if chat is not None:
        return pb.TokenizeRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role=r, content=c) for r, c in chat],
                                                    tools=[_tool(t) for t in tools]))
    return pb.TokenizeRequest(text=text or "")


def empty_model_info_request() -> Any:
    return pb.GetModelInfoRequest()


def empty_stats_request() -> Any:
    return pb.GetServerStatsRequest()


def detokenize(ids: list[int], skip_special_tokens: bool = True) -> Any:
    return pb.DetokenizeRequest(ids=ids, skip_special_tokens=skip_special_tokens)


def finish_reason_name(value: int) -> str:
    return FINISH_NAMES.get(value, "unspecified")
