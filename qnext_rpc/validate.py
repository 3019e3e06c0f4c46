"""Every field of a request checked before anything is queued; bad input -> ValueError starting with the field.

`GenerateSpec` is the plain-Python form of a GenerateRequest (convert.py builds it from the proto, keeping
field presence); `prepare()` turns it into what the worker runs plus what the text side needs.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from qnext.worker.types import GenerationRequest, MAX_TOP_LOGPROBS, SamplingParams, StoppingParams
from qnext.rpc.text import CHAT_ROLES, ChatMessage, TextProcessor

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed")


@dataclass(frozen=True)
class Limits:
    """What the server accepts; most come from flags, the model's from the worker's handshake."""

    max_model_len: int
    vocab_size: int
    max_num_speculative_tokens: int = 0
    default_max_new_tokens: int = 2048
    max_stop_strings: int = 16
    max_stop_string_length: int = 256
    max_request_id_length: int = 256
    max_chat_messages: int = 1024
    max_cache_checkpoints: int = 64
    chars_per_token_limit: int = 16  # text longer than max_model_len * this is refused before tokenising
    default_sampling: dict[str, Any] = field(default_factory=dict)  # generation_config.json's values

    @property
    def max_prompt_chars(self) -> int:
        return self.max_model_len * self.chars_per_token_limit


@dataclass
class GenerateSpec:
    request_id: str = ""
    text: str | None = None
    token_ids: list[int] | None = None
    chat: list[ChatMessage] | None = None
    enable_thinking: bool | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # only the fields the client set
    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_strings: bool = False
    top_logprobs: int = 0
    num_speculative_tokens: int | None = None
    bypass_prefix_cache: bool = False
    cache_checkpoints: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class PreparedRequest:
    add: GenerationRequest
    stop_strings: list[str]
    include_stop_strings: bool
    top_logprobs: int
    starts_in_reasoning: bool

    @property
    def request_id(self) -> str:
        return self.add.request_id


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


def prompt_ids(spec: GenerateSpec, limits: Limits, text: TextProcessor) -> tuple[str, list[int]]:
    """(the input field's name, its token ids)."""
    given = [n for n in ("text", "token_ids", "chat") if getattr(spec, n) is not None]
    _require(len(given) == 1, "input", "set exactly one of text, token_ids, chat")
    if spec.text is not None:
        _require(spec.text != "", "text", "must not be empty")
        _require(len(spec.text) <= limits.max_prompt_chars, "text",
                 f"{len(spec.text)} characters is over the limit of {limits.max_prompt_chars}")
        return "text", text.encode(spec.text)
    if spec.token_ids is not None:
        ids = spec.token_ids
        _require(len(ids) > 0, "token_ids", "must not be empty")
        _require(len(ids) < limits.max_model_len, "token_ids",
                 f"{len(ids)} ids leave no room to generate within max_model_len {limits.max_model_len}")
        bad = [t for t in ids if t >= limits.vocab_size]
        _require(not bad, "token_ids", f"ids must be < vocab_size {limits.vocab_size}, got {bad[:5]}")
        return "token_ids", list(ids)
    messages = spec.chat or []
    _require(len(messages) > 0, "chat.messages", "must not be empty")
    _require(len(messages) <= limits.max_chat_messages, "chat.messages",
             f"{len(messages)} messages is over the limit of {limits.max_chat_messages}")
    total = 0
    for i, m in enumerate(messages):
        _require(m.role in CHAT_ROLES, f"chat.messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, "
                 f"got {m.role!r}")
        total += len(m.content)
    _require(total <= limits.max_prompt_chars, "chat.messages",
             f"{total} characters is over the limit of {limits.max_prompt_chars}")
    return "chat", text.encode_chat(messages, spec.enable_thinking)


def sampling_params(spec: GenerateSpec, limits: Limits) -> SamplingParams:
    unknown = set(spec.sampling) - set(SAMPLING_FIELDS)
    assert not unknown, unknown
    values = {**limits.default_sampling, **spec.sampling}
    try:
        return SamplingParams(**values, top_logprobs=spec.top_logprobs)
    except ValueError as e:
        raise ValueError(f"sampling.{e}") from None


def stopping_params(spec: GenerateSpec, limits: Limits, num_prompt: int) -> StoppingParams:
    room = limits.max_model_len - num_prompt
    max_new = spec.max_new_tokens
    if max_new is None:
        max_new = min(room, limits.default_max_new_tokens)
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
    bad = [t for t in spec.stop_token_ids if t >= limits.vocab_size]
    _require(not bad, "stopping.stop_token_ids", f"ids must be < vocab_size {limits.vocab_size}, got {bad[:5]}")
    try:
        return StoppingParams(max_new_tokens=max_new, min_new_tokens=spec.min_new_tokens,
                              stop_token_ids=tuple(spec.stop_token_ids), ignore_eos=spec.ignore_eos)
    except ValueError as e:
        raise ValueError(f"stopping.{e}") from None


def prepare(spec: GenerateSpec, limits: Limits, text: TextProcessor) -> PreparedRequest:
    """Validate every field (cheap checks first, tokenising last) and build the worker's request."""
    _require(len(spec.request_id) <= limits.max_request_id_length, "request_id",
             f"{len(spec.request_id)} characters is over the limit of {limits.max_request_id_length}")
    _require(0 <= spec.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
             f"must be in [0, {MAX_TOP_LOGPROBS}], got {spec.top_logprobs}")
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
    field_name, ids = prompt_ids(spec, limits, text)
    _require(len(ids) < limits.max_model_len, field_name,
             f"the prompt has {len(ids)} tokens, which leaves no room within max_model_len {limits.max_model_len}")
    stopping = stopping_params(spec, limits, len(ids))
    _require(len(spec.cache_checkpoints) <= limits.max_cache_checkpoints, "cache_checkpoints",
             f"{len(spec.cache_checkpoints)} offsets is over the limit of {limits.max_cache_checkpoints}")
    bad = [p for p in spec.cache_checkpoints if not 1 <= p <= len(ids)]
    _require(not bad, "cache_checkpoints", f"offsets must be in [1, {len(ids)}] (the prompt's tokens), got {bad[:5]}")
    checkpoints = set(spec.cache_checkpoints)
    if field_name == "chat" and not spec.bypass_prefix_cache:
        checkpoints.update(text.chat_turn_boundaries(spec.chat or [], spec.enable_thinking, ids))
    rid = spec.request_id or uuid.uuid4().hex
    add = GenerationRequest(rid, ids, sampling, stopping, num_speculative_tokens=num_spec,
                     use_prefix_cache=not spec.bypass_prefix_cache, cache_checkpoints=tuple(sorted(checkpoints)))
    return PreparedRequest(add=add, stop_strings=list(spec.stop_strings),
                           include_stop_strings=spec.include_stop_strings, top_logprobs=spec.top_logprobs,
                           starts_in_reasoning=text.starts_in_reasoning(ids))
