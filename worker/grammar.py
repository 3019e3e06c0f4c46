"""Constrained decoding: the grammar a request's output must follow, as a token mask per sampled row (llguidance).

Three pieces, no torch (the server imports this module to check grammars before queueing a request):
- `GrammarCompiler.compile(field, kind, source)` turns a response format (a JSON schema, any JSON object, a regex,
  an EBNF / Lark grammar) into llguidance's grammar text and checks it against the tokenizer, so a bad one is a
  ValueError naming the request field, before any model work. The grammar text is what travels to the worker.
- `GrammarCompiler.matcher(grammar)` gives a fresh matcher; compiled grammars are cached (GRAMMAR_CACHE_SIZE,
  least recently used out), so the thousandth request with the same schema costs a copy, not a compile.
- `GrammarState`: one request's matcher. `allowed(ahead)` is the bitmask of the tokens the grammar allows after
  the request's output plus `ahead` (MTP drafts being verified or drawn: consumed for the mask, then rolled
  back), `accept(tokens)` advances it by the tokens a step appended. Only accepted tokens are ever committed, so
  a rejected draft never reaches the matcher, and a draft the grammar forbids gets probability 0 at verification.
  With `starts_after` (the `</think>` id of a prompt that opened a think block) nothing is constrained until
  that token has been generated: reasoning is free, the answer after it follows the grammar.

JSON is compact (", " and ": " separators, no other whitespace), as the chat template writes JSON: a model,
random or not, cannot wander into endless whitespace, and tool-call arguments look like the template's history.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path

try:
    import llguidance
except ImportError:  # a machine with torch but not our dependencies (the GPU box imports qnext with --no-deps)
    llguidance = None

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "grammar", "lark")
GRAMMAR_CACHE_SIZE = 256
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_schema_grammar(schema: dict) -> str:
    """llguidance grammar text of a JSON schema (compact JSON)."""
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


def embedded_json(schema: dict) -> str:
    """A JSON schema as a Lark `%json` block with our compact options (for grammars that wrap JSON, e.g. calls)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def after_think(grammar: str) -> str:
    """`grammar` with the blank lines a Thinking model writes after `</think>` allowed before it (the answer of
    `<think>...</think>\n\n{"a": 1}` starts at the newlines). llguidance grammar text is Lark or a JSON list of
    named grammars whose first is the start: this puts a Lark rule `WS? @answer` in front of it."""
    try:
        doc = json.loads(grammar)
    except ValueError:
        doc = {"grammars": [{"lark_grammar": grammar}]}
    inner = [dict(g) for g in doc["grammars"]]
    inner[0]["name"] = "answer"
    start = {"name": "after_think", "lark_grammar": "start: WS? @answer\nWS: /[ \\t\\r\\n]+/"}
    return json.dumps({**doc, "grammars": [start, *inner]})


class GrammarCompiler:
    """One per process; thread-safe (the server compiles on its text pool)."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        if llguidance is None:
            raise ValueError("grammar: constrained decoding needs the llguidance package (pip install llguidance)")
        self._tokenizer_json, self._vocab_size, self._eos = tokenizer_json, vocab_size, list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (~1 s for a 151k vocabulary): servers without constrained requests never pay."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json.read_text(), n_vocab=self._vocab_size,
                                                         eos_token=self._eos)
            return self._tokenizer

    def compile(self, field: str, kind: str, source: str) -> str:
        """llguidance grammar text for `source` of `kind` (GRAMMAR_KINDS); ValueError('field: why') if invalid."""
        if kind not in GRAMMAR_KINDS:
            raise ValueError(f"{field}: unknown kind {kind!r}")
        try:
            if kind == "json_schema":
                schema = json.loads(source)
                if not isinstance(schema, dict):
                    raise ValueError("must be a JSON object (a JSON schema)")
                grammar = json_schema_grammar(schema)
            elif kind == "json_object":
                grammar = json_schema_grammar({"type": "object"})
            elif kind == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(source)
            elif kind == "grammar":  # EBNF: GBNF (llama.cpp's) or Lark
                grammar = llguidance.grammar_from("ebnf", source)
            else:
                grammar = llguidance.LLMatcher.grammar_from_lark(source)
        except (ValueError, RecursionError) as e:  # RecursionError: JSON nested past Python's stack
            raise ValueError(f"{field}: {_one_line(str(e))}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"{field}: {_one_line(error)}")
        return grammar

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start; ValueError if the grammar does not compile."""
        with self._lock:
            template = self._compiled.get(grammar)
            if template is not None:
                self._compiled.move_to_end(grammar)
                return template.deep_copy()
        template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if template.is_error():
            raise ValueError(f"grammar: {_one_line(template.get_error())}")
        with self._lock:
            self._compiled[grammar] = template
            while len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return template.deep_copy()

    def start(self, grammar: str, starts_after: int | None) -> GrammarState:
        return GrammarState(self.matcher(grammar), starts_after)


def _one_line(message: str) -> str:
    return " ".join(message.split())[:500]


class GrammarState:
    """One constrained request's position in its grammar (see the module docstring)."""

    def __init__(self, matcher: llguidance.LLMatcher, starts_after: int | None) -> None:
        self.matcher = matcher
        self.starts_after = starts_after
        self.active = starts_after is None

    def _constrained_part(self, tokens: list[int]) -> list[int] | None:
        """The part of `tokens` (following what was accepted) that the grammar applies to; None: none of it yet."""
        if self.active:
            return tokens
        if self.starts_after not in tokens:
            return None
        return tokens[tokens.index(self.starts_after) + 1:]

    def allowed(self, ahead: list[int]) -> bytes | None:
        """The grammar's bitmask (bit t of 32-bit word t // 32 set = token t allowed) for the token after the
        accepted output + `ahead`; None when nothing constrains it (before `starts_after`, or after a draft the
        grammar forbids: verification rejects that draft, so the rows after it are never used)."""
        part = self._constrained_part(ahead)
        if part is None:
            return None
        if part and self.matcher.validate_tokens(part) < len(part):
            return None
        if part and not self.matcher.consume_tokens(part):
            raise RuntimeError(f"grammar: validated tokens refused: {self.matcher.get_error()}")
        try:
            return self.matcher.compute_bitmask()
        finally:
            if part:
                self.matcher.rollback(len(part))

    def accept(self, tokens: list[int]) -> None:
        """Advance by the tokens a step appended (the sampler drew them under `allowed`'s masks)."""
        part = self._constrained_part(tokens)
        if part is None:
            return
        self.active = True
        if part and not self.matcher.consume_tokens(part):
            raise RuntimeError(f"grammar: generated tokens refused: {self.matcher.get_error()}")
