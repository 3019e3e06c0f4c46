"""The text side of the service (server process only; the worker sees token ids).

- `TextProcessor`: the checkpoint's tokenizer (tokenizer.json via `tokenizers`) and chat template
  (tokenizer_config.json's Jinja2 `chat_template`, rendered like transformers' apply_chat_template). Special-token
  strings (`<|im_start|>`, ...) in client text and chat content are tokenised as plain text unless the request
  opts in (allow_special_tokens): only the template's own markers become control tokens, so a message cannot
  forge a turn. Tool definitions and tool-call history (tool_calls.py) go to the template too, protected alike.
- `IncrementalDetokenizer`: token ids -> text deltas that never end inside a UTF-8 character (each token's
  bytes through an incremental UTF-8 decoder, for byte-level tokenizers like Qwen's).
- `StopStringMatcher`: finds stop strings in the streamed text, holding back only a tail that could still
  become one; the server aborts the request in the worker when one matches.
- `ReasoningSplitter`: routes the text inside <think>...</think> to reasoning, including the Thinking
  template's implicit opening tag (the prompt ends with `<think>\n`).
"""

from __future__ import annotations

import codecs
import json
import random
import re
from collections.abc import Sequence
from itertools import chain
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders

from qnext.worker.grammar import GrammarCompiler
from qnext.rpc.tool_calls import Tool, ToolCall, tool_calls_for_template, tools_for_template

CHAT_ROLES = ("system", "user", "assistant", "tool")
THINK_START = "<think>"
THINK_END = "</think>"
# Stand-ins for the special-token strings found in chat content: private-use characters no content uses
_NOT_PRIVATE_USE = re.compile("[^\ue000-\uf8ff\U000f0000-\U0010ffff]+")
_PRIVATE_USE_POINTS = (range(0xE000, 0xF900), range(0xF0000, 0x110000))
MAX_TURN_BOUNDARIES = 16  # see chat_turn_boundaries


@dataclass(frozen=True)
class ChatMessage:
    """One message. Protobuf ChatMessages are accepted wherever these are: only these attribute names are read,
    the last two with defaults (getattr), so objects without them still work."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant message's calls (anything with id, name, arguments_json)
    tool_call_id: str = ""  # a tool message: the call it answers


@dataclass
class ChatPrompt:
    """A rendered chat prompt and its ids. `rendered` has every special-token string of the contents replaced by a
    sentinel (`restore` maps them back), so the special strings left in it are the template's own markers;
    `marker_at` maps each marker's character offset in `rendered` to its token offset in `ids`."""

    messages: list[dict[str, Any]]  # the template's input, user strings protected
    enable_thinking: bool | None
    rendered: str
    restore: dict[str, str]
    ids: list[int] = field(default_factory=list)
    marker_at: dict[int, int] = field(default_factory=dict)
    tools: list[dict[str, Any]] = field(default_factory=list)  # the template's `tools`, protected; re-renders need them


def _message_dict(message: Any) -> dict[str, Any]:
    """A message as the template reads it (OpenAI-style). Keys are added only when used, so a conversation
    without tools renders byte-identically to one from before tools existed."""
    d = {"role": message.role, "content": message.content}
    calls = list(getattr(message, "tool_calls", ()) or ())
    if calls:
        d["tool_calls"] = tool_calls_for_template(calls)
    call_id = getattr(message, "tool_call_id", "")
    if call_id:
        d["tool_call_id"] = call_id
    return d


def _strings(x: Any) -> list[str]:
    """Every string in a JSON-like value, dict keys included (a schema's property names are the client's too)."""
    if isinstance(x, str):
        return [x]
    if isinstance(x, dict):
        return [s for k, v in x.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(x, (list, tuple)):
        return [s for v in x for s in _strings(v)]
    return []


def _map_strings(x: Any, f: Any) -> Any:
    if isinstance(x, str):
        return f(x)
    if isinstance(x, dict):
        return {_map_strings(k, f): _map_strings(v, f) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_map_strings(v, f) for v in x]
    return x


def _ids(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text. encode_batch_fast releases the GIL for the whole call and skips the offsets
    that `encode` converts while holding it (~150 ms for 4M characters: a stall of every other thread)."""
    return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson` (jinja2's own HTML-escapes and sorts keys, which changes the prompt)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise ValueError(f"chat: {message}")


class TextProcessor:
    """Thread-safe: the service runs large inputs on a thread pool (text_pool.py) while small ones run inline."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        # Two instances, each configured once here: encode_special_tokens is mutable state of a Tokenizer, and
        # flipping it per request on a shared one would change the tokens of a request running on another thread.
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))  # parses special-token strings
        self._plain = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._plain.encode_special_tokens = True  # special-token strings are text (non-special added ones are not)
        specials = sorted((t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special),
                          key=len, reverse=True)  # longest first: the tokenizer matches leftmost-longest
        self._special_ids = {t: self.tokenizer.token_to_id(t) for t in specials}
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self._template: jinja2.Template | None = None
        self._template_source = cfg.get("chat_template") or ""
        if self._template_source:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(self._template_source)
        self._special = {k: cfg.get(k) for k in ("bos_token", "eos_token")}
        # each token's bytes, without and with the special tokens (IncrementalDetokenizer); None: not byte-level
        self.token_bytes = _token_bytes(self.tokenizer)
        self.think_start_id = self.tokenizer.token_to_id(THINK_START)
        self.think_end_id = self.tokenizer.token_to_id(THINK_END)
        # compiles response formats and forced tool calls into grammars (worker/grammar.py); the server sets it
        # once the worker has told it the model's vocabulary size and EOS ids
        self.grammars: GrammarCompiler | None = None

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, allow_special_tokens: bool = False) -> list[int]:
        """Raw text's ids, no special tokens added; special-token strings in it are plain text unless allowed."""
        return _ids(self.tokenizer if allow_special_tokens else self._plain, [text])[0]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id) or ""

    def tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.id_to_token(i) or "" for i in ids]

    def render_chat(self, messages: Sequence[ChatMessage], enable_thinking: bool | None = None, *,
                    tools: Sequence[Tool] = ()) -> str:
        """The prompt text: the chat template with add_generation_prompt, as transformers renders it."""
        prompt = self._render_protected(messages, enable_thinking, allow_special_tokens=True, tools=tools)
        return prompt.rendered

    def encode_chat(self, messages: Sequence[ChatMessage], enable_thinking: bool | None = None,
                    allow_special_tokens: bool = False, *, tools: Sequence[Tool] = ()) -> list[int]:
        return self.chat_prompt(messages, enable_thinking, allow_special_tokens, tools=tools).ids

    def chat_prompt(self, messages: Sequence[ChatMessage], enable_thinking: bool | None = None,
                    allow_special_tokens: bool = False, *, tools: Sequence[Tool] = ()) -> ChatPrompt:
        """The rendered prompt and its ids: the template's markers as control tokens, the contents' special-token
        strings as text (unless allowed). HF tokenizers split at added tokens before BPE runs on each piece, so
        encoding the pieces between the markers one by one gives exactly the ids of a tokenizer that saw only the
        markers as special. (A content whose end completes a marker with the template text after it would still
        form one; no Qwen template puts a partial marker next to a content.)"""
        prompt = self._render_protected(messages, enable_thinking, allow_special_tokens, tools=tools)
        pieces, markers = [], []
        pos = 0
        for m in self._special_re.finditer(prompt.rendered) if self._special_re else ():
            pieces.append(prompt.rendered[pos:m.start()])
            markers.append((m.start(), self._special_ids[m.group()]))
            pos = m.end()
        pieces.append(prompt.rendered[pos:])
        for sentinel, literal in prompt.restore.items():
            pieces = [p.replace(sentinel, literal) for p in pieces]
        for piece_ids, marker in zip(_ids(self._plain, pieces), [*markers, None]):
            prompt.ids += piece_ids
            if marker is not None:
                prompt.marker_at[marker[0]] = len(prompt.ids)
                prompt.ids.append(marker[1])
        return prompt

    def _render_protected(self, messages: Sequence[ChatMessage], enable_thinking: bool | None,
                          allow_special_tokens: bool, *, tools: Sequence[Tool] = ()) -> ChatPrompt:
        """Render with each special-token string of the client's strings (contents, tool definitions, tool calls,
        tool_call_ids) replaced by a private-use sentinel that occurs in none of them and not in the template."""
        if self._template is None:
            raise ValueError("chat: this checkpoint has no chat_template in tokenizer_config.json; send text")
        dicts, tool_dicts = [_message_dict(m) for m in messages], tools_for_template(tools)
        restore: dict[str, str] = {}
        if not allow_special_tokens and self._special_re is not None:
            (dicts, tool_dicts), restore = self._protect((dicts, tool_dicts))
        rendered = self._render(dicts, enable_thinking, True, tool_dicts)
        return ChatPrompt(dicts, enable_thinking, rendered, restore, tools=tool_dicts)

    def _protect(self, data: Any) -> tuple[Any, dict[str, str]]:
        """`data` with the special-token strings in its strings replaced by sentinels, and sentinel -> literal."""
        strings = _strings(data)
        found = {t for x in strings for t in set(self._special_re.findall(x))}
        if not found:
            return data, {}
        taken = set("".join(_NOT_PRIVATE_USE.sub("", x) for x in [*strings, self._template_source]))
        free = (c for c in map(chr, chain(*_PRIVATE_USE_POINTS)) if c not in taken)
        restore, sentinel_of = {}, {}
        for literal in sorted(found):
            sentinel = next(free, None)
            if sentinel is None:
                raise ValueError("chat.messages: the contents use every private-use character; send fewer")
            restore[sentinel], sentinel_of[literal] = literal, sentinel
        return _map_strings(data, lambda x: self._special_re.sub(lambda m: sentinel_of[m.group()], x)), restore

    def _render(self, messages: list[dict[str, Any]], enable_thinking: bool | None, generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None) -> str:
        extra: dict[str, Any] = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        if tools:  # absent otherwise: a template may test `tools is defined`
            extra["tools"] = tools
        return self._template.render(messages=messages, add_generation_prompt=generation_prompt, **self._special,
                                     **extra)

    def chat_turn_boundaries(self, prompt: ChatPrompt) -> list[int]:
        """Token offsets in prompt.ids where an earlier message ends (the end of the system prompt, of each
        earlier turn): where the next request of the same conversation can resume from the prefix cache.
        A boundary is kept when the conversation rendered up to that message without the generation prompt is
        a prefix of the prompt's text ending right before one of its markers: then its tokens are exactly that
        prefix of the ids (a template may render an earlier turn differently once later turns exist, e.g.
        dropping its reasoning). Only the first message and the last MAX_TURN_BOUNDARIES - 1 are tried: each
        try renders the conversation again, so trying all would cost quadratic time in the number of messages,
        and a later request of the same conversation resumes from its latest turns."""
        n = len(prompt.messages)
        tries = sorted({1, *range(max(1, n - MAX_TURN_BOUNDARIES + 1), n)} - {n})
        boundaries = []
        for k in tries:
            head = self._render(prompt.messages[:k], prompt.enable_thinking, False, prompt.tools)
            offset = prompt.marker_at.get(len(head))
            if offset is not None and 0 < offset < len(prompt.ids) and prompt.rendered.startswith(head):
                boundaries.append(offset)
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

    Byte-level tokenizers (Qwen's): each token is a fixed byte string (TextProcessor.token_bytes) and decode is
    their concatenation read as UTF-8 with U+FFFD for invalid bytes, so the deltas come from an incremental UTF-8
    decoder: O(new bytes) per push, and only an unfinished character (at most 3 bytes) waits. Decoding a window of
    ids instead had to wait while the window's text ended in U+FFFD, and re-decoded it on every push: a run of
    invalid bytes (a client can force one with logit_bias) grew it without end (16,000 such tokens took 20 s of
    event-loop time and streamed no text), and a character split across every token boundary never streamed.

    Other tokenizers: that window (`prefix_offset:`), emitting what it adds over the emitted part
    (`prefix_offset:read_offset`), waiting while it ends in U+FFFD (an unfinished character; `flush` emits it as
    decode would).
    """

    def __init__(self, text: TextProcessor, skip_special_tokens: bool = True) -> None:
        self._text = text
        self._skip = skip_special_tokens
        self._bytes = text.token_bytes[skip_special_tokens]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, new_ids: Sequence[int]) -> str:
        if self._bytes is not None:
            table, n = self._bytes, len(self._bytes)
            return self._utf8.decode(b"".join(table[i] if 0 <= i < n else b"" for i in new_ids))
        self.ids.extend(new_ids)
        return self._delta(final=False)

    def flush(self) -> str:
        if self._bytes is not None:
            return self._utf8.decode(b"", final=True)
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        prefix = self._text.decode(self.ids[self._prefix_offset:self._read_offset], self._skip)
        full = self._text.decode(self.ids[self._prefix_offset:], self._skip)
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return full[len(prefix):]


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): printable Latin-1 bytes are their own character, the other bytes
    (controls, space, ...) the characters from U+0100 on, in byte order. Returns character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def _token_bytes(tokenizer: Tokenizer) -> dict[bool, list[bytes] | None]:
    """skip_special_tokens -> each id's bytes in decode's output (b"" for skipped special tokens and ids the
    tokenizer does not know), when the tokenizer decodes bytes (a ByteLevel decoder); None otherwise, or when a
    token has a character outside the byte alphabet, or when a sample of ids does not decode to the table's bytes
    (a check of these assumptions)."""
    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        return {True: None, False: None}
    alphabet = _byte_level_alphabet()
    added = tokenizer.get_added_tokens_decoder()
    kept = [b""] * tokenizer.get_vocab_size(with_added_tokens=True)
    try:
        for token, i in tokenizer.get_vocab(with_added_tokens=False).items():
            kept[i] = bytes(map(alphabet.__getitem__, token))
    except KeyError:  # a character outside the byte alphabet
        return {True: None, False: None}
    for i, a in added.items():
        kept[i] = a.content.encode()
    skipped = list(kept)
    for i, a in added.items():
        if a.special:
            skipped[i] = b""
    tables = {True: skipped, False: kept}
    rng = random.Random(0)
    for skip, table in tables.items():
        for _ in range(32):
            ids = [rng.randrange(len(table)) for _ in range(8)] + rng.sample(sorted(added), min(2, len(added)))
            want = tokenizer.decode(ids, skip_special_tokens=skip)
            if b"".join(table[i] for i in ids).decode("utf-8", errors="replace") != want:
                return {True: None, False: None}
    return tables


class StopStringMatcher:
    """Cuts the streamed text at the first stop string (kept when include_stop_strings).

    Only the text not emitted yet is kept: the held-back tail that could still start a stop string, plus the new
    delta (a stop string never starts inside emitted text; keeping the whole output made every push copy it:
    64,000 pushes of 4 characters took 1.5 s, 23 us each and growing). How much to hold back is the longest
    prefix of a stop string that the text ends with: each stop string's Knuth-Morris-Pratt state, advanced by the
    new characters only, gives it. Checking every tail length instead cost up to 468 us per push for 16 stop
    strings of 256 characters built so that the tails almost match (event-loop time every other stream waits
    for); the states cost a few table steps per character."""

    def __init__(self, stop_strings: Sequence[str], include_stop_strings: bool) -> None:
        self.stop_strings = [s for s in stop_strings if s]
        self.include = include_stop_strings
        self.pending = ""  # the held-back tail
        self.matched: str | None = None
        self._fallback = [_prefix_function(s) for s in self.stop_strings]
        self._state = [0] * len(self.stop_strings)  # per stop string: the longest prefix of it the text ends with

    def push(self, delta: str, final: bool = False) -> str:
        """Text safe to emit now; sets `matched` (and emits through the cut) when a stop string appears."""
        if self.matched is not None:
            return ""
        text = self.pending + delta
        hits = [(i, -len(s), s) for s in self.stop_strings if (i := text.find(s)) >= 0]
        if hits:
            i, _, s = min(hits)
            self.matched, self.pending = s, ""
            return text[:i + (len(s) if self.include else 0)]
        keep = 0 if final else self._advance(delta)
        out, self.pending = text[:len(text) - keep], text[len(text) - keep:]
        return out

    def _advance(self, delta: str) -> int:
        """Advance every stop string's state over `delta`; returns the longest (a proper prefix: no stop string
        is in the text, `push` checked)."""
        if not self.stop_strings:
            return 0
        for j, (s, fail) in enumerate(zip(self.stop_strings, self._fallback)):
            k = self._state[j]
            for c in delta:
                while k and (k == len(s) or s[k] != c):
                    k = fail[k - 1]
                if s[k] == c:
                    k += 1
            self._state[j] = k
        return max(self._state, default=0)


def _prefix_function(s: str) -> list[int]:
    """KMP's table: fail[i] = length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class ReasoningSplitter:
    """Splits streamed text into (reasoning, content) at <think> ... </think>."""

    def __init__(self, starts_in_reasoning: bool) -> None:
        self.in_reasoning = starts_in_reasoning
        self._decided = starts_in_reasoning  # whether an opening tag can still start reasoning
        self._buf = ""
        # until decided: the leading whitespace (in pieces: joining it on every push made a long run of it cost
        # O(run) per token) and the text after it, a prefix of <think>
        self._space: list[str] = []
        self._head = ""

    def push(self, delta: str, final: bool = False) -> tuple[str, str]:
        if self._decided:
            self._buf += delta
        else:
            if not self._head:
                rest = delta.lstrip()
                self._space.append(delta[:len(delta) - len(rest)])
                delta = rest
            self._head += delta
            if self._head.startswith(THINK_START):
                self.in_reasoning, self._decided = True, True
                self._buf = self._head[len(THINK_START):]  # the whitespace before the tag is dropped
            elif THINK_START.startswith(self._head) and not final:
                return "", ""  # could still become the opening tag
            else:
                self._decided = True
                self._buf = "".join(self._space) + self._head
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
