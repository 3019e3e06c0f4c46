"""The text side of the service (server process only; the worker sees token ids).

- `TextProcessor`: the checkpoint's tokenizer (tokenizer.json via `tokenizers`) and chat template
  (tokenizer_config.json's Jinja2 `chat_template`, rendered like transformers' apply_chat_template).
- `IncrementalDetokenizer`: token ids -> text deltas that never end inside a UTF-8 character.
- `StopStringMatcher`: finds stop strings in the streamed text, holding back only a tail that could still
  become one; the server aborts the request in the worker when one matches.
- `ReasoningSplitter`: routes the text inside <think>...</think> to reasoning, including the Thinking
  template's implicit opening tag (the prompt ends with `<think>\n`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

CHAT_ROLES = ("system", "user", "assistant", "tool")
THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson` (jinja2's own HTML-escapes and sorts keys, which changes the prompt)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise ValueError(f"chat: {message}")


class TextProcessor:
    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self._template: jinja2.Template | None = None
        if cfg.get("chat_template"):
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(cfg["chat_template"])
        self._special = {k: cfg.get(k) for k in ("bos_token", "eos_token")}
        self.think_start_id = self.tokenizer.token_to_id(THINK_START)
        self.think_end_id = self.tokenizer.token_to_id(THINK_END)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id) or ""

    def render_chat(self, messages: Sequence[ChatMessage], enable_thinking: bool | None = None) -> str:
        """The prompt text: the chat template with add_generation_prompt, as transformers renders it."""
        if self._template is None:
            raise ValueError("chat: this checkpoint has no chat_template in tokenizer_config.json; send text")
        extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        return self._template.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                     add_generation_prompt=True, **self._special, **extra)

    def encode_chat(self, messages: Sequence[ChatMessage], enable_thinking: bool | None = None) -> list[int]:
        return self.encode(self.render_chat(messages, enable_thinking))

    def chat_turn_boundaries(self, messages: Sequence[ChatMessage], enable_thinking: bool | None,
                             prompt_ids: Sequence[int]) -> list[int]:
        """Token offsets in prompt_ids where an earlier message ends (the end of the system prompt, of each
        earlier turn): where the next request of the same conversation can resume from the prefix cache.
        Each is the token count of the conversation rendered up to that message without the generation
        prompt, kept only when those tokens are exactly a prefix of prompt_ids (a template may render an earlier
        turn differently once later turns exist, e.g. dropping its reasoning)."""
        if self._template is None:
            return []
        extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        boundaries = []
        for n in range(1, len(messages)):
            head = self._template.render(messages=[{"role": m.role, "content": m.content} for m in messages[:n]],
                                         add_generation_prompt=False, **self._special, **extra)
            ids = self.encode(head)
            if 0 < len(ids) < len(prompt_ids) and list(prompt_ids[:len(ids)]) == ids:
                boundaries.append(len(ids))
        return boundaries

    def starts_in_reasoning(self, prompt_ids: Sequence[int]) -> bool:
        """True when the prompt opened a think block it did not close (the Thinking template's implicit tag)."""
        if self.think_start_id is None:
            return False
        last_open = max((i for i, t in enumerate(prompt_ids) if t == self.think_start_id), default=-1)
        last_close = max((i for i, t in enumerate(prompt_ids) if t == self.think_end_id), default=-1)
        return last_open > last_close


class IncrementalDetokenizer:
    """Text deltas whose concatenation is decode(all ids).

    Decodes a short window (`prefix_offset:`) and emits what it adds over the already-emitted part
    (`prefix_offset:read_offset`); a window that ends in U+FFFD is an unfinished UTF-8 character and waits
    for the next token (or for `flush`, which emits it as decode would).
    """

    def __init__(self, text: TextProcessor, skip_special_tokens: bool = True) -> None:
        self._text = text
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(new_ids)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        prefix = self._text.decode(self.ids[self._prefix_offset:self._read_offset], self._skip)
        full = self._text.decode(self.ids[self._prefix_offset:], self._skip)
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return full[len(prefix):]


class StopStringMatcher:
    """Cuts the streamed text at the first stop string (kept when include_stop_strings)."""

    def __init__(self, stop_strings: Sequence[str], include_stop_strings: bool) -> None:
        self.stop_strings = [s for s in stop_strings if s]
        self.include = include_stop_strings
        self.text = ""
        self._emitted = 0
        self.matched: str | None = None

    def push(self, delta: str, final: bool = False) -> str:
        """Text safe to emit now; sets `matched` (and emits through the cut) when a stop string appears."""
        if self.matched is not None:
            return ""
        self.text += delta
        hits = [(i, -len(s), s) for s in self.stop_strings if (i := self.text.find(s, self._emitted)) >= 0]
        if hits:
            i, _, s = min(hits)
            self.matched = s
            end = i + (len(s) if self.include else 0)
        else:
            end = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the unemitted text that is a proper prefix of a stop string."""
        tail = self.text[self._emitted:]
        best = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:n]):
                    best = n
                    break
        return best


class ReasoningSplitter:
    """Splits streamed text into (reasoning, content) at <think> ... </think>."""

    def __init__(self, starts_in_reasoning: bool) -> None:
        self.in_reasoning = starts_in_reasoning
        self._decided = starts_in_reasoning  # whether an opening tag can still start reasoning
        self._buf = ""

    def push(self, delta: str, final: bool = False) -> tuple[str, str]:
        self._buf += delta
        if not self._decided:
            stripped = self._buf.lstrip()
            if stripped.startswith(THINK_START):
                self.in_reasoning, self._decided = True, True
                self._buf = stripped[len(THINK_START):]
            elif THINK_START.startswith(stripped) and not final:
                return "", ""  # could still become the opening tag
            else:
                self._decided = True
        if not self.in_reasoning:
            out, self._buf = self._buf, ""
            return "", out
        i = self._buf.find(THINK_END)
        if i >= 0:
            reasoning, content = self._buf[:i], self._buf[i + len(THINK_END):]
            self.in_reasoning, self._buf = False, ""
            return reasoning, content
        keep = 0 if final else next((n for n in range(len(THINK_END) - 1, 0, -1)
                                     if self._buf.endswith(THINK_END[:n])), 0)
        out, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        return out, ""
