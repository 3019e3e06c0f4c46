"""Tool calls as text: what the chat template is fed, and what the model's output is split into.

Qwen3 models call tools by writing blocks into their answer:

    I'll look it up.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>
    {"name": "get_time", "arguments": {"tz": "CET"}}
    </tool_call>

(`<tool_call>` and `</tool_call>` are added tokens that are not special, so they are in the decoded text.)
`ToolCallParser` splits streamed content text into the content outside the blocks and `ToolCallDelta`s, with
the semantics of OpenAI's / vLLM's streaming tool calls: content and tool calls are separate; each call has an
index; its first delta carries a fresh id (`call_` + 24 hex digits) and the name (and any arguments text that
came with them), later deltas only raw pieces of the arguments' JSON text. What a client sees, case by case:

- A well-formed block: no content for it; deltas for call `index`, their `arguments_delta`s concatenated equal
  `ToolCall.arguments_json` exactly: the model's own bytes of the "arguments" value (from its first character
  to its last, whitespace around it excluded), so sending the call back in the history renders those bytes.
  The name goes out as soon as its string is complete; the arguments as they arrive, holding back only
  trailing whitespace and what could still be `</tool_call>` (the `}` closing the outer object is recognised
  by nesting depth, so it is never emitted). The block ends at the first `</tool_call>` outside a JSON string:
  one inside an argument string is text. Text between the outer `}` and the tag is dropped; a missing outer
  `}` is tolerated.
- Separators: the call format puts one "\\n" between the content and the first block and between blocks. One
  "\\n" directly before a block that becomes a call, and one directly after its `</tool_call>`, are dropped
  from the content (so the content sent back with the calls renders the same text again); every other
  character of the content is passed through.
- No "arguments" key (`{"name": "f"}`) or no value after it: arguments_json is "{}", sent in one delta at the
  close (a client parses it as an object either way).
- A block whose first key is not "name" (the model changed the key order) but which is a JSON object with a
  non-empty string "name" when it closes: the call is emitted at its close in one piece, arguments_json being
  `json.dumps` of its "arguments" ("{}" when absent). Same when the name was streamed but what follows it is
  not `, "arguments": ...`, and when the name's string runs past MAX_NAME_STRING characters unclosed.
- A block without a usable name when it closes or the stream ends (malformed JSON, no "name"): it goes back into
  the content verbatim, tags and the "\\n" before it included; nothing was emitted for it.
- A stream that ends inside a block whose name was emitted (e.g. max_new_tokens): the call is completed with
  the arguments produced so far (usually invalid JSON, as OpenAI does on truncation).

Whether the finish reason becomes TOOL_CALLS is the caller's decision (`calls` is non-empty). The validation
helpers raise ValueError whose message starts with the field path and a colon (INVALID_ARGUMENT).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_SPACES = re.compile(r"\s*")  # what str.isspace() calls whitespace
_FAIL = "fail"  # _expect: the steps cannot match
_NAME_STEPS = (" ", "{", " ", '"name"', " ", ":", " ", '"')  # up to the name string's opening quote
_ARGUMENTS_STEPS = (" ", ",", " ", '"arguments"', " ", ":", " ")  # after the name, up to the arguments' value
MAX_NAME_STRING = 256  # characters of a name string not closed yet before the block is no longer streamed


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # the JSON schema of the arguments, parsed


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments_json: str


@dataclass(frozen=True)
class ToolCallDelta:
    index: int  # 0-based index of the call in the response
    id: str  # non-empty only in the call's first delta
    name: str  # likewise
    arguments_delta: str


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# --- validation and the template's input -------------------------------------------------------------------

def check_tools(tools: Sequence[Tool], field: str = "chat.tools") -> None:
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool.name, str) or not _TOOL_NAME.fullmatch(tool.name):
            raise ValueError(f"{field}[{i}].name: {tool.name!r} is not 1 to 64 of A-Z a-z 0-9 _ . -")
        if tool.name in seen:
            raise ValueError(f"{field}[{i}].name: {tool.name!r} is defined twice")
        seen.add(tool.name)
        if not isinstance(tool.description, str):
            raise ValueError(f"{field}[{i}].description: must be a string")
        if not isinstance(tool.parameters, dict):
            raise ValueError(f"{field}[{i}].parameters: must be a JSON object (a JSON schema)")


def parse_tool_call_arguments(arguments_json: str, field: str) -> None:
    try:
        value = json.loads(arguments_json)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{field}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{field}: must be a JSON object, got {type(value).__name__}")


def tools_for_template(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """OpenAI-style tool definitions, what Qwen chat templates render with `tojson`."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters}} for t in tools]


def tool_calls_for_template(calls: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI-style tool calls of an assistant message. `calls` are ToolCalls or protobuf messages with the same
    field names. The arguments stay a string: the template renders a string as is (a dict it would re-dump),
    so the history renders exactly the bytes the model produced."""
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
            for c in calls]


# --- the streaming parser ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Wait:
    """_expect could not decide before the text ended: call it again from here (nothing before is read again)."""

    pos: int
    step: int


def _expect(text: str, pos: int, steps: Sequence[str], step: int = 0) -> int | _Wait | str:
    """Match steps[step:] at text[pos:]: " " is optional whitespace, anything else a literal. Returns the position
    after them, a _Wait when the text ends before they could be decided (whitespace up to the end included: more
    may come), _FAIL when they cannot match. Resuming from the _Wait keeps a block of a million spaces from being
    read again on every push."""
    for i in range(step, len(steps)):
        literal = steps[i]
        if literal == " ":  # a regex, not a loop over characters
            pos = _SPACES.match(text, pos).end()
            if pos == len(text):
                return _Wait(pos, i)
        elif text.startswith(literal, pos):
            pos += len(literal)
        elif literal.startswith(text[pos:]):
            return _Wait(pos, i)
        else:
            return _FAIL
    return pos


def _call_from_json(block: str) -> tuple[str, str] | None:
    """(name, arguments_json) of a complete block parsed as a whole; None without a usable name."""
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    return obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False)


class _Block:
    """The text of one block after its `<tool_call>` tag, lexed incrementally: where the outer JSON object
    closes and where `</tool_call>` starts outside a JSON string (one inside an argument string is text)."""

    def __init__(self, sep: str) -> None:
        self.sep = sep  # the "\n" dropped before the tag, restored if the block is not a call
        self.text = ""
        self.scanned = 0  # text[:scanned] is lexed; at most an undecided prefix of `</tool_call>` follows
        self.in_string = self.escape = False
        self.depth = 0
        self.outer_close: int | None = None  # offset of the `}` closing the outer object
        self.end: int | None = None  # offset of the closing tag
        self.name: str | None = None
        self.index = -1
        self.id = ""
        self.resume = (0, 0)  # where the name's or the arguments key's undecided _expect goes on: (pos, step)
        self.args_start: int | None = None  # where the streamed arguments start (None: not found yet)
        self.buffered = False  # the name or the arguments are taken from json.loads of the whole block
        self.emitted = 0  # characters of the arguments emitted
        self.space_checked = self.space_from = 0  # arguments_end: text read so far, where its trailing spaces start

    def feed(self, text: str) -> None:
        # Appended through a local that holds the only reference: CPython then grows the string in place instead
        # of copying the whole block on every push (30,000 pushes of 32 characters in one block: 5.3 s -> 0.27 s, the lexing)
        t, self.text = self.text, ""
        t += text
        self.text, i = t, self.scanned
        while i < len(t) and self.end is None:
            c = t[i]
            if self.in_string:
                self.escape, self.in_string = (False, True) if self.escape else (c == "\\", c != '"')
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if c == "}" and self.depth == 0 and self.outer_close is None:
                    self.outer_close = i
            elif c == "<" and not t.startswith(TOOL_CALL_END, i):
                if TOOL_CALL_END.startswith(t[i:]):
                    break  # could still be the closing tag: decide when more text comes
            elif c == "<":
                self.end = i
                break
            i += 1
        self.scanned = i

    def arguments_end(self, final: bool) -> int:
        """End offset of the arguments known so far: all of them once the object closed, the tag came or the
        stream ended; else up to the last non-space character (trailing spaces may precede the outer `}`).
        Spaces before the end are dropped in every case, so what was emitted stays a prefix."""
        assert self.args_start is not None
        floor = self.args_start + self.emitted  # emitted text never ends in a space: rstrip stops by here
        if self.outer_close is not None or self.end is not None or final:  # the last call for this block
            end = self.outer_close if self.outer_close is not None else self.end if self.end is not None else \
                len(self.text)
            return max(floor, floor + len(self.text[floor:end].rstrip())) if end > floor else end
        # streaming: only the text lexed since the last call is read, so a long run of spaces (held back, as it
        # may precede the outer `}`) costs its length once, not once per push
        if self.space_checked < floor:
            self.space_checked = self.space_from = floor
        kept = self.text[self.space_checked:self.scanned].rstrip()
        if kept:
            self.space_from = self.space_checked + len(kept)
        self.space_checked = max(self.space_checked, self.scanned)
        return self.space_from


class ToolCallParser:
    """Streaming split of content text into (content, tool-call deltas); see the module docstring."""

    def __init__(self) -> None:
        self._buf = ""  # content not yet emitted (outside a block)
        self._block: _Block | None = None
        self._skip_newline = False  # drop one "\n" right after a call's closing tag
        self._calls: list[ToolCall] = []
        self._named = 0  # calls whose first delta went out

    @property
    def calls(self) -> list[ToolCall]:
        return list(self._calls)

    def push(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = [], []
        pending = text
        while True:
            if self._block is None:
                pending = self._content(pending, final, content)
                if self._block is None:
                    break
            self._block.feed(pending)
            pending = self._advance(final, content, deltas)
            if self._block is not None:
                break
        return "".join(content), _merge(deltas)

    def _content(self, text: str, final: bool, out: list[str]) -> str:
        """Emits content up to the next block's tag (opening the block) and returns the text after the tag."""
        self._buf += text
        if self._skip_newline and self._buf:
            self._skip_newline = False
            self._buf = self._buf[1:] if self._buf.startswith("\n") else self._buf
        i = self._buf.find(TOOL_CALL_START)
        if i >= 0:
            head, rest = self._buf[:i], self._buf[i + len(TOOL_CALL_START):]
            sep = "\n" if head.endswith("\n") else ""
            out.append(head[:len(head) - len(sep)])
            self._buf, self._block = "", _Block(sep)
            return rest
        keep = 0 if final else _tag_prefix_len(self._buf)
        out.append(self._buf[:len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]
        return ""

    def _advance(self, final: bool, content: list[str], deltas: list[ToolCallDelta]) -> str:
        """Parses as far as the block's text allows; when the block ends, returns the text after it."""
        b = self._block
        if b.name is None and not b.buffered:
            self._parse_name(b, deltas)
        if b.name is not None and b.args_start is None and not b.buffered:
            self._parse_arguments_key(b)
        if b.args_start is not None:
            end = b.arguments_end(final or b.end is not None)
            if end > b.args_start + b.emitted:
                deltas.append(ToolCallDelta(b.index, "", "", b.text[b.args_start + b.emitted:end]))
                b.emitted = end - b.args_start
        if b.end is None and not final:
            return ""
        self._close(b, content, deltas)
        return b.text[b.end + len(TOOL_CALL_END):] if b.end is not None else ""

    def _parse_name(self, b: _Block, deltas: list[ToolCallDelta]) -> None:
        pos = _expect(b.text, b.resume[0], _NAME_STEPS, b.resume[1])
        if isinstance(pos, _Wait):
            b.resume = (pos.pos, pos.step)
            return
        if pos == _FAIL:  # the first key is not "name"
            b.buffered = True
            return
        b.resume = (pos - 1, len(_NAME_STEPS) - 1)  # the opening quote: only the string is read again
        m = _JSON_STRING.match(b.text, pos - 1)
        if m is None:  # the string goes on; one longer than any tool name is not streamed
            b.buffered = len(b.text) - pos > MAX_NAME_STRING
            return
        try:
            name = json.loads(m.group())
        except ValueError:  # an invalid escape or a raw control character
            name = ""
        if not name:
            b.buffered = True
            return
        b.name, b.resume = name, (m.end(), 0)  # the arguments key is looked for after the name
        self._start_call(b, deltas)

    def _start_call(self, b: _Block, deltas: list[ToolCallDelta]) -> None:
        b.index, b.id, self._named = self._named, new_call_id(), self._named + 1
        deltas.append(ToolCallDelta(b.index, b.id, b.name, ""))

    def _parse_arguments_key(self, b: _Block) -> None:
        """Finds where the arguments' value starts: after `, "arguments":` and the spaces that follow."""
        pos = _expect(b.text, b.resume[0], _ARGUMENTS_STEPS, b.resume[1])
        if isinstance(pos, _Wait):
            b.resume = (pos.pos, pos.step)
        elif pos == _FAIL:  # `{"name": "f"}` or another shape: the arguments come from the whole block
            b.buffered = True
        elif pos < (b.end if b.end is not None else len(b.text)):
            b.args_start = pos

    def _close(self, b: _Block, content: list[str], deltas: list[ToolCallDelta]) -> None:
        self._block = None
        whole = b.text[:b.end] if b.end is not None else b.text
        if b.emitted:
            arguments = b.text[b.args_start:b.args_start + b.emitted]
        else:  # nothing streamed: no arguments key or value, or another shape
            parsed = _call_from_json(whole)
            if b.name is None and parsed is None:  # not a call: the block is content again, as it came
                content.append(b.sep + TOOL_CALL_START + whole + (TOOL_CALL_END if b.end is not None else ""))
                return
            if b.name is None:
                b.name = parsed[0]
                self._start_call(b, deltas)
            arguments = parsed[1] if parsed is not None else "{}"
            deltas.append(ToolCallDelta(b.index, "", "", arguments))
        self._calls.append(ToolCall(b.id, b.name, arguments))
        self._skip_newline = b.end is not None


def _tag_prefix_len(text: str) -> int:
    """Length of the tail that could still become `<tool_call>` or the "\\n" before it."""
    n = next((n for n in range(min(len(TOOL_CALL_START) - 1, len(text)), 0, -1)
              if text.endswith(TOOL_CALL_START[:n])), 0)
    return n + 1 if text[:len(text) - n].endswith("\n") else n


def _merge(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """One delta per call and push: the arguments that came with a name ride in its delta."""
    out: list[ToolCallDelta] = []
    for d in deltas:
        if out and out[-1].index == d.index and not d.id:
            last = out[-1]
            out[-1] = ToolCallDelta(last.index, last.id, last.name, last.arguments_delta + d.arguments_delta)
        elif d.id or d.arguments_delta:
            out.append(d)
    return out


def assemble_calls(deltas: Sequence[ToolCallDelta]) -> list[ToolCall]:
    """The complete calls of a response from its streamed deltas, in index order (GenerateUnary, clients)."""
    parts: dict[int, list[str]] = {}
    heads: dict[int, ToolCallDelta] = {}
    for d in deltas:
        if d.id:
            heads.setdefault(d.index, d)
        parts.setdefault(d.index, []).append(d.arguments_delta)
    return [ToolCall(heads[i].id, heads[i].name, "".join(parts[i])) for i in sorted(heads)]
