"""What a request constrains its output to, as llguidance grammar text for the worker (worker/grammar.py):
GenerateRequest.response_format, or ChatInput.tool_choice "required" / a tool's name.

A forced tool call is written the way the chat template writes calls in the history (and the way Qwen3 models
are trained to write them): `<tool_call>` and `</tool_call>` are single tokens, the call between them one compact
JSON object `{"name": ..., "arguments": ...}` with the name first, several calls separated by a newline:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

so qnext_rpc/tool_calls.py's parser reads constrained and free calls alike. Everything is compiled and checked
against the tokenizer here, before the request is queued: a bad schema is INVALID_ARGUMENT naming its field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qnext.rpc.tool_calls import TOOL_CALL_END, TOOL_CALL_START, Tool
from qnext.worker.grammar import GrammarCompiler, embedded_json

TOOL_CHOICES = ("auto", "none", "required")  # or a tool's name


def call_schema(tool: Tool) -> dict[str, Any]:
    """The JSON schema of one call of `tool`: its name, then arguments valid against its parameters."""
    arguments = tool.parameters or {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_call_lark(tools: Sequence[Tool], choice: str) -> str:
    """Lark source for tool_choice "required" (one or more calls of any of `tools`) or a tool's name (one call)."""
    chosen = tools if choice == "required" else [t for t in tools if t.name == choice]
    schema = call_schema(chosen[0]) if len(chosen) == 1 else {"anyOf": [call_schema(t) for t in chosen]}
    start = 'start: call ("\\n" call)*' if choice == "required" else "start: call"
    return f'{start}\ncall: {TOOL_CALL_START} "\\n" {embedded_json(schema)} "\\n" {TOOL_CALL_END}\n'


def check_tool_choice(choice: str, tools: Sequence[Tool], has_response_format: bool) -> str:
    """The effective choice ("" -> "auto"); ValueError naming chat.tool_choice when it cannot apply."""
    choice = choice or "auto"
    names = [t.name for t in tools]
    if choice not in TOOL_CHOICES and choice not in names:
        raise ValueError(f"chat.tool_choice: must be auto, none, required or the name of one of chat.tools "
                         f"({', '.join(names) or 'none given'}), got {choice!r}")
    if choice in ("required", *names) and has_response_format:
        raise ValueError("chat.tool_choice: a forced tool call cannot be combined with response_format")
    if choice == "required" and not tools:
        raise ValueError("chat.tool_choice: required needs chat.tools")
    return choice


def request_grammar(response_format: tuple[str, str] | None, tools: Sequence[Tool], tool_choice: str,
                    compiler: GrammarCompiler) -> str | None:
    """The grammar the output must follow (None: free). response_format: (kind, source) of the proto's oneof."""
    if response_format is not None:
        kind, source = response_format
        return compiler.compile(f"response_format.{kind}", kind, source)
    if tool_choice == "required" or tool_choice in {t.name for t in tools}:
        return compiler.compile("chat.tools", "lark", tool_call_lark(tools, tool_choice))
    return None
