"""Every field of a request checked before anything is queued; bad input -> ValueError starting with the field.

`GenerateSpec` is the plain-Python form of a GenerateRequest (convert.py builds it from the proto, keeping
field presence); `prepare()` turns it into what the worker runs plus what the text side needs. The size checks
of text input (`check_text`, `check_chat`, `check_token_ids`, `check_detokenize`) are shared by every RPC that
takes text, and cost no more than a length: they run before any tokenising.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

from qnext.worker.types import (MAX_LOGIT_BIAS, MAX_SAMPLES, MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS, SAMPLE_SEP, GenerationRequest,
                                SamplingParams, StoppingParams)
from qnext.worker.grammar import after_think
from qnext.rpc.response_format import check_tool_choice, request_grammar
from qnext.rpc.text import CHAT_ROLES, ChatMessage, ChatPrompt, TextProcessor
from qnext.rpc.tool_calls import Tool, check_tools, parse_tool_call_arguments

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed")


@dataclass(frozen=True)
class Limits:
    """What the server accepts; most come from flags, the model's from the worker's handshake."""

    max_model_len: int
    vocab_size: int
    max_num_speculative_tokens: int = 0
    default_max_new_tokens: int = 2048  # 0 = the remaining context
    max_stop_strings: int = 16
    max_stop_string_length: int = 256
    max_request_id_length: int = 256
    max_chat_messages: int = 1024
    max_cache_checkpoints: int = 64
    max_tools: int = 128
    max_tool_calls_per_message: int = 64
    chars_per_token_limit: int = 16  # text longer than max_model_len * this is refused before tokenising
    priority_scheduling: bool = False  # --scheduling-policy priority: requests may set a priority
    default_sampling: dict[str, Any] = field(default_factory=dict)  # generation_config.json's values

    @property
    def max_prompt_chars(self) -> int:
        """Characters of text, or of all chat contents together, that any RPC accepts."""
        return self.max_model_len * self.chars_per_token_limit

    @property
    def max_detokenize_ids(self) -> int:
        """Ids one Detokenize accepts: max_model_len, the longest sequence (prompt + output) the server runs."""
        return self.max_model_len


@dataclass
class GenerateSpec:
    request_id: str = ""
    text: str | None = None
    token_ids: Sequence[int] | None = None  # convert.py passes the proto's field uncopied: its length is checked first
    chat: Sequence[ChatMessage] | None = None  # from convert.py: the proto's messages, uncopied (same fields)
    enable_thinking: bool | None = None
    allow_special_tokens: bool = False  # special-token strings in text / chat content become control tokens
    sampling: dict[str, Any] = field(default_factory=dict)  # only the fields the client set
    logit_bias: Any = None  # token id -> bias: convert.py passes the proto's map uncopied (its size is checked first)
    priority: int = 0  # lower = sooner
    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_strings: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    max_reasoning_tokens: int | None = None
    n: int = 1  # parallel samples
    num_speculative_tokens: int | None = None
    bypass_prefix_cache: bool = False
    cache_checkpoints: list[int] = field(default_factory=list)
    response_format: tuple[str, str] | None = None  # (kind, source): json_schema / json_object / regex / grammar
    tools: Sequence[Any] = ()  # the proto's ChatInput.tools, uncopied (name, description, parameters_json_schema)
    tool_choice: str = ""


@dataclass(frozen=True)
class PreparedRequest:
    add: GenerationRequest
    stop_strings: list[str]
    include_stop_strings: bool
    top_logprobs: int
    starts_in_reasoning: bool
    parse_tool_calls: bool = False  # the request has tools and tool_choice is not "none"

    @property
    def request_id(self) -> str:
        return self.add.request_id


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


def check_text(text: str, limits: Limits) -> int:
    """Its size in characters."""
    _require(text != "", "text", "must not be empty")
    _require(len(text) <= limits.max_prompt_chars, "text",
             f"{len(text)} characters is over the limit of {limits.max_prompt_chars}")
    return len(text)


def check_chat(messages: Sequence[ChatMessage], limits: Limits) -> int:
    """Count, roles and total characters of the contents (returned)."""
    _require(len(messages) > 0, "chat.messages", "must not be empty")
    _require(len(messages) <= limits.max_chat_messages, "chat.messages",
             f"{len(messages)} messages is over the limit of {limits.max_chat_messages}")
    total = 0
    for i, m in enumerate(messages):
        _require(m.role in CHAT_ROLES, f"chat.messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, "
                 f"got {m.role!r}")
        total += len(m.content) + _check_history_calls(m, i, limits)
    _require(total <= limits.max_prompt_chars, "chat.messages",
             f"{total} characters is over the limit of {limits.max_prompt_chars}")
    return total


def _check_history_calls(m: ChatMessage, i: int, limits: Limits) -> int:
    """An assistant message's tool calls (a tool message's tool_call_id); returns their characters."""
    calls = getattr(m, "tool_calls", ())
    _require(not calls or m.role == "assistant", f"chat.messages[{i}].tool_calls", "only assistant messages make calls")
    _require(len(calls) <= limits.max_tool_calls_per_message, f"chat.messages[{i}].tool_calls",
             f"{len(calls)} calls is over the limit of {limits.max_tool_calls_per_message}")
    total = len(getattr(m, "tool_call_id", ""))
    for j, c in enumerate(calls):
        field_name = f"chat.messages[{i}].tool_calls[{j}]"
        _require(c.name != "", f"{field_name}.name", "must not be empty")
        total += len(c.id) + len(c.name) + len(c.arguments_json)
        _require(total <= limits.max_prompt_chars, "chat.messages",
                 f"over {limits.max_prompt_chars} characters in tool calls")
        parse_tool_call_arguments(c.arguments_json, f"{field_name}.arguments_json")
    return total


MAX_SCHEMA_DEPTH = 64


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: a hostile value must not exhaust the stack here)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            todo += [(x, d + 1) for x in v]
    return deepest


def tools_size(specs: Sequence[Any]) -> int:
    """ChatInput.tools' size in characters: their schemas and descriptions (what the limits count)."""
    return sum(len(t.parameters_json_schema) + len(t.description) for t in specs)


def tool_list(specs: Sequence[Any], limits: Limits) -> list[Tool]:
    """ChatInput.tools (Generate's or Tokenize's) as Tools, each schema parsed; ValueError naming the field."""
    _require(len(specs) <= limits.max_tools, "chat.tools",
             f"{len(specs)} tools is over the limit of {limits.max_tools}")
    _require(tools_size(specs) <= limits.max_prompt_chars, "chat.tools", f"over {limits.max_prompt_chars} characters")
    tools = []
    for i, t in enumerate(specs):
        params: Any = {}
        if t.parameters_json_schema:
            try:
                params = json.loads(t.parameters_json_schema)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"chat.tools[{i}].parameters_json_schema: not valid JSON ({e})") from None
            _require(isinstance(params, dict), f"chat.tools[{i}].parameters_json_schema",
                     "must be a JSON object (a JSON schema)")
            # the template and the special-token protection walk it recursively
            _require(json_depth(params) <= MAX_SCHEMA_DEPTH, f"chat.tools[{i}].parameters_json_schema",
                     f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
        tools.append(Tool(t.name, t.description, params))
    check_tools(tools)
    return tools


def check_token_ids(ids: Sequence[int], limits: Limits, name: str, max_count: int) -> int:
    """The count first (a length), then each id against the vocabulary; returns the count."""
    _require(len(ids) <= max_count, name, f"{len(ids)} ids is over the limit of {max_count}")
    if ids and max(ids) >= limits.vocab_size:
        bad = [t for t in ids if t >= limits.vocab_size]
        _require(False, name, f"ids must be < vocab_size {limits.vocab_size}, got {bad[:5]}")
    return len(ids)


def check_detokenize(ids: Sequence[int], limits: Limits) -> int:
    return check_token_ids(ids, limits, "ids", limits.max_detokenize_ids)


def check_tokenize(text: str | None, chat: list[ChatMessage] | None, limits: Limits) -> int:
    """A Tokenize's input, with Generate's limits; returns its size in characters."""
    _require((text is None) != (chat is None), "input", "set one of text, chat")
    return check_text(text, limits) if chat is None else check_chat(chat, limits)


def input_size(spec: GenerateSpec, limits: Limits) -> int:
    """Checks that exactly one input is set and its size; returns it (characters, or ids)."""
    given = [n for n in ("text", "token_ids", "chat") if getattr(spec, n) is not None]
    _require(len(given) == 1, "input", "set exactly one of text, token_ids, chat")
    if spec.text is not None:
        return check_text(spec.text, limits)
    if spec.chat is not None:
        return check_chat(spec.chat, limits)
    ids = spec.token_ids
    _require(len(ids) > 0, "token_ids", "must not be empty")
    _require(len(ids) < limits.max_model_len, "token_ids",
             f"{len(ids)} ids leave no room to generate within max_model_len {limits.max_model_len}")
    return check_token_ids(ids, limits, "token_ids", limits.max_model_len)


def prompt_ids(spec: GenerateSpec, limits: Limits, text: TextProcessor,
               tools: Sequence[Tool] = ()) -> tuple[str, list[int], ChatPrompt | None]:
    """(the input field's name, its token ids, the rendered chat prompt for chat input)."""
    input_size(spec, limits)
    if spec.text is not None:
        return "text", text.encode(spec.text, spec.allow_special_tokens), None
    if spec.token_ids is not None:
        return "token_ids", list(spec.token_ids), None
    prompt = text.chat_prompt(spec.chat, spec.enable_thinking, spec.allow_special_tokens, tools=tools)
    return "chat", prompt.ids, prompt


def sampling_params(spec: GenerateSpec, limits: Limits) -> SamplingParams:
    unknown = set(spec.sampling) - set(SAMPLING_FIELDS)
    assert not unknown, unknown
    values = {**limits.default_sampling, **spec.sampling}
    bias = spec.logit_bias or {}
    _require(len(bias) <= MAX_LOGIT_BIAS, "sampling.logit_bias",
             f"{len(bias)} entries is over the limit of {MAX_LOGIT_BIAS}")
    bad = sorted(t for t in bias if t >= limits.vocab_size)
    _require(not bad, "sampling.logit_bias", f"ids must be < vocab_size {limits.vocab_size}, got {bad[:5]}")
    try:
        return SamplingParams(**values, top_logprobs=spec.top_logprobs,
                              logit_bias=tuple(sorted((int(t), float(b)) for t, b in bias.items())))
    except ValueError as e:
        raise ValueError(f"sampling.{e}") from None


def stopping_params(spec: GenerateSpec, limits: Limits, num_prompt: int,
                    reasoning_end_id: int | None = None) -> StoppingParams:
    """`reasoning_end_id`: the `</think>` id when the prompt opened a think block (the reasoning budget's token)."""
    room = limits.max_model_len - num_prompt
    max_new = spec.max_new_tokens
    if max_new is None:
        max_new = min(room, limits.default_max_new_tokens or room)
    else:
        _require(max_new >= 1, "stopping.max_new_tokens", f"must be >= 1, got {max_new}")
        _require(max_new <= room, "stopping.max_new_tokens",
                 f"prompt ({num_prompt} tokens) + max_new_tokens ({max_new}) exceeds max_model_len "
                 f"({limits.max_model_len})")
    _require(spec.min_new_tokens <= max_new, "stopping.min_new_tokens",
             f"must be <= max_new_tokens ({max_new}), got {spec.min_new_tokens}")
    _require(len(spec.stop_strings) <= limits.max_stop_strings, "stopping.stop_strings",
             f"{len(spec.stop_strings)} strings is over the limit of {limits.max_stop_strings}")
    for i, s in enumerate(spec.stop_strings):
        _require(0 < len(s) <= limits.max_stop_string_length, f"stopping.stop_strings[{i}]",
                 f"length must be in [1, {limits.max_stop_string_length}], got {len(s)}")
    _require(len(spec.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stopping.stop_token_ids",
             f"{len(spec.stop_token_ids)} ids is over the limit of {MAX_STOP_TOKEN_IDS}")
    bad = [t for t in spec.stop_token_ids if t >= limits.vocab_size]
    _require(not bad, "stopping.stop_token_ids", f"ids must be < vocab_size {limits.vocab_size}, got {bad[:5]}")
    try:
        budget = spec.max_reasoning_tokens if reasoning_end_id is not None else None
        return StoppingParams(max_new_tokens=max_new, min_new_tokens=spec.min_new_tokens,
                              stop_token_ids=tuple(spec.stop_token_ids), ignore_eos=spec.ignore_eos,
                              max_reasoning_tokens=budget, reasoning_end_id=reasoning_end_id if budget is not None
                              else None)
    except ValueError as e:
        raise ValueError(f"stopping.{e}") from None


def prepare(spec: GenerateSpec, limits: Limits, text: TextProcessor) -> PreparedRequest:
    """Validate every field (cheap checks first, tokenising last) and build the worker's request."""
    _require(len(spec.request_id) <= limits.max_request_id_length, "request_id",
             f"{len(spec.request_id)} characters is over the limit of {limits.max_request_id_length}")
    _require(0 <= spec.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
             f"must be in [0, {MAX_TOP_LOGPROBS}], got {spec.top_logprobs}")
    _require(spec.prompt_logprobs is None or 0 <= spec.prompt_logprobs <= MAX_TOP_LOGPROBS, "prompt_logprobs",
             f"must be in [0, {MAX_TOP_LOGPROBS}], got {spec.prompt_logprobs}")
    _require(1 <= spec.n <= MAX_SAMPLES, "n", f"must be in [1, {MAX_SAMPLES}], got {spec.n}")
    _require(SAMPLE_SEP not in spec.request_id, "request_id", "must not contain the character U+001F")
    _require(spec.priority == 0 or limits.priority_scheduling, "priority",
             f"must be 0 unless the server runs with --scheduling-policy priority, got {spec.priority}")
    num_spec = spec.num_speculative_tokens
    if num_spec is None:
        num_spec = limits.max_num_speculative_tokens
    _require(num_spec <= limits.max_num_speculative_tokens, "num_speculative_tokens",
             f"must be <= {limits.max_num_speculative_tokens} (the server's --num-speculative-tokens), "
             f"got {num_spec}")
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        v = spec.sampling.get(name)
        _require(v is None or math.isfinite(v), f"sampling.{name}", f"must be a finite number, got {v}")
    sampling = sampling_params(spec, limits)
    _require(spec.chat is not None or (not spec.tools and not spec.tool_choice), "chat.tools",
             "tools need chat input")
    tools = tool_list(spec.tools, limits)
    tool_choice = check_tool_choice(spec.tool_choice, tools, spec.response_format is not None)
    field_name, ids, chat_prompt = prompt_ids(spec, limits, text, tools)
    _require(len(ids) < limits.max_model_len, field_name,
             f"the prompt has {len(ids)} tokens, which leaves no room within max_model_len {limits.max_model_len}")
    in_reasoning = text.starts_in_reasoning(ids)
    stopping = stopping_params(spec, limits, len(ids), text.think_end_id if in_reasoning else None)
    _require(len(spec.cache_checkpoints) <= limits.max_cache_checkpoints, "cache_checkpoints",
             f"{len(spec.cache_checkpoints)} offsets is over the limit of {limits.max_cache_checkpoints}")
    bad = [p for p in spec.cache_checkpoints if not 1 <= p <= len(ids)]
    _require(not bad, "cache_checkpoints", f"offsets must be in [1, {len(ids)}] (the prompt's tokens), got {bad[:5]}")
    checkpoints = set(spec.cache_checkpoints)
    if chat_prompt is not None and not spec.bypass_prefix_cache:
        checkpoints.update(text.chat_turn_boundaries(chat_prompt))
    grammar = None
    if spec.response_format is not None or tool_choice not in ("auto", "none"):
        _require(not spec.ignore_eos and not spec.min_new_tokens, "stopping.ignore_eos",
                 "ignore_eos and min_new_tokens cannot be combined with response_format or a forced tool call: "
                 "the output ends with EOS when it is complete")
        _require(text.grammars is not None, "response_format", "this server has no grammar compiler")
        grammar = request_grammar(spec.response_format, tools, tool_choice, text.grammars)
    rid = spec.request_id or uuid.uuid4().hex
    if grammar is not None and in_reasoning:  # the constraint starts after </think> and the newlines after it
        grammar = after_think(grammar)
    add = GenerationRequest(rid, ids, sampling, stopping, num_speculative_tokens=num_spec,
                            use_prefix_cache=not spec.bypass_prefix_cache and spec.prompt_logprobs is None,
                            cache_checkpoints=tuple(sorted(checkpoints)),
                            grammar=grammar, grammar_starts_after=text.think_end_id if in_reasoning else None,
                            priority=spec.priority, prompt_logprobs=spec.prompt_logprobs, n=spec.n)
    return PreparedRequest(add=add, stop_strings=list(spec.stop_strings),
                           include_stop_strings=spec.include_stop_strings, top_logprobs=spec.top_logprobs,
                           starts_in_reasoning=in_reasoning, parse_tool_calls=bool(tools) and tool_choice != "none")
