"""The server's text side, without a server: chat template, incremental detokenizer, stop strings, reasoning
split, request validation."""

import itertools
import random
import time
import pytest

from qnext.rpc.text import (ChatMessage, IncrementalDetokenizer, ReasoningSplitter, StopStringMatcher,
                            TextProcessor)
from qnext.rpc.validate import GenerateSpec, Limits, prepare

MESSAGES = [ChatMessage("system", "You are terse."), ChatMessage("user", "Héllo 你好 🙂"),
            ChatMessage("assistant", "Hi."), ChatMessage("user", "Again?")]


@pytest.fixture(scope="module")
def text(default_ckpt):
    return TextProcessor(default_ckpt)


@pytest.mark.parametrize("thinking", [None, True, False])
def test_chat_template_matches_transformers(default_ckpt, text, thinking):
    from transformers import AutoTokenizer  # test-time reference only
    ref = AutoTokenizer.from_pretrained(str(default_ckpt))
    extra = {} if thinking is None else {"enable_thinking": thinking}
    msgs = [{"role": m.role, "content": m.content} for m in MESSAGES]
    want = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **extra)
    assert text.render_chat(MESSAGES, thinking) == want
    assert text.encode_chat(MESSAGES, thinking) == ref(want, add_special_tokens=False)["input_ids"]


@pytest.fixture(params=["bytes", "window"])
def detok_text(request, text, monkeypatch):
    """The byte-level path (Qwen's tokenizer) and the window path other tokenizers take."""
    if request.param == "window":
        monkeypatch.setattr(text, "token_bytes", {True: None, False: None})
    else:
        assert text.token_bytes[True] is not None  # Qwen's tokenizer decodes bytes
    return text


def test_incremental_detokenizer_never_splits_a_character(detok_text):
    text = detok_text
    ids = text.encode("naïve 你好世界 🙂🚀 𠀋𝔘🦩ꙮ done") + [151645] + text.encode(" ok")
    detok = IncrementalDetokenizer(text)
    deltas = [detok.push([t]) for t in ids] + [detok.flush()]
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == text.decode(ids)
    # a dangling half character is emitted at the end exactly as decode renders it
    rare = next(c for c in "𠀋𝔘🦩ꙮ" if len(text.encode(c)) > 1)
    cut = text.encode(rare)[:1]
    detok = IncrementalDetokenizer(text)
    assert detok.push(cut) == ""
    assert detok.flush() == text.decode(cut)


def test_detokenizer_streams_all_but_an_unfinished_character_and_matches_decode(text):
    """Random streams of byte tokens (most of them parts of characters or invalid bytes), special and added tokens,
    and ids past the tokenizer's vocabulary, pushed a few at a time: after every push the text streamed so far is
    the tokenizer's decode of the ids so far, less only a trailing U+FFFD that stands for an unfinished character
    (a window re-decoded on every push held a whole run of invalid bytes back, and grew with it); after flush it
    is exactly that decode."""
    rng = random.Random(5)
    specials = [151643, 151644, 151645, 151657, 151667, 151668]  # <|endoftext|>, <|im_start|>, ..., </think>
    for skip in (True, False):
        for _ in range(150):
            detok, ids, streamed = IncrementalDetokenizer(text, skip_special_tokens=skip), [], ""
            for _ in range(rng.randint(1, 25)):
                new = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(151669, 151936)
                       if rng.random() < 0.05 else rng.randrange(0, 300) if rng.random() < 0.7
                       else rng.randrange(151643) for _ in range(rng.randint(1, 3))]
                ids += new
                streamed += detok.push(new)
                so_far = text.decode(ids, skip_special_tokens=skip)
                assert streamed in (so_far, so_far[:-1] if so_far.endswith("\ufffd") else so_far)
            assert streamed + detok.flush() == text.decode(ids, skip_special_tokens=skip)


def test_stop_strings_hold_back_only_possible_prefixes():
    m = StopStringMatcher(["STOP", "\n\n"], include_stop_strings=False)
    assert m.push("hello S") == "hello "
    assert m.push("T") == ""
    assert m.push("x more") == "STx more"
    assert m.push(" and ST") == " and "
    assert m.push("OP tail") == ""
    assert m.matched == "STOP"
    m = StopStringMatcher(["STOP"], include_stop_strings=True)
    assert m.push("aSTOPb") == "aSTOP" and m.matched == "STOP"
    m = StopStringMatcher(["xyz"], include_stop_strings=False)
    assert m.push("abcx") == "abc" and m.push("", final=True) == "x"


def test_stop_strings_match_the_whole_text_and_keep_only_a_short_tail():
    """Random streams against the whole text at once: the same cut and match, and the matcher holds no more than a
    stop string's length of text between pushes (it kept the whole output, copied on every push)."""
    rng = random.Random(7)
    for _ in range(300):
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        include = rng.random() < 0.5
        deltas = ["".join(rng.choice("abcd") for _ in range(rng.randint(0, 5))) for _ in range(rng.randint(1, 30))]
        m = StopStringMatcher(stops, include)
        out = []
        for d in deltas:
            out.append(m.push(d))
            assert len(m.pending) < max(map(len, stops))
        out.append(m.push("", final=True))
        whole = "".join(deltas)
        # the stream stops at the first push after which the text so far holds a stop string: the earliest one
        # there (the longest of those starting at the same place)
        seen = [whole[:n] for n in itertools.accumulate(map(len, deltas))]
        hits = next(([(i, -len(s), s) for s in stops if (i := text.find(s)) >= 0] for text in seen
                     if any(s in text for s in stops)), [])
        if hits:
            i, _, s = min(hits)
            assert m.matched == s and "".join(out) == whole[:i + (len(s) if include else 0)]
        else:
            assert m.matched is None and "".join(out) == whole


def test_stop_strings_cost_a_few_steps_per_character_whatever_the_strings():
    """16 stop strings of 256 characters whose tails almost match the held-back text: checking every tail length
    took 0.94 s for these 2,000 pushes (468 us each) on the 2-core box; the KMP states take ~15 ms."""
    stops = ["b" * 255 + chr(0x41 + i) for i in range(15)] + ["a" * 255 + "b"]
    m = StopStringMatcher(stops, include_stop_strings=False)
    start = time.perf_counter()
    out = [m.push("a") for _ in range(2000)]
    assert time.perf_counter() - start < 0.3
    assert "".join(out) == "a" * (2000 - 255) and m.pending == "a" * 255


def test_reasoning_splitter():
    r = ReasoningSplitter(starts_in_reasoning=True)
    parts = [r.push(d) for d in ["Let me ", "think.</", "think>\n\nThe answer", " is 4."]] + [r.push("", True)]
    assert "".join(p[0] for p in parts) == "Let me think."
    assert "".join(p[1] for p in parts) == "\n\nThe answer is 4."
    r = ReasoningSplitter(starts_in_reasoning=False)
    parts = [r.push(d) for d in ["<th", "ink>hmm</think>", "yes"]]
    assert "".join(p[0] for p in parts) == "hmm" and "".join(p[1] for p in parts) == "yes"
    r = ReasoningSplitter(starts_in_reasoning=False)
    assert r.push("plain <think> text") == ("", "plain <think> text")


def _split_reference(text: str, starts_in_reasoning: bool) -> tuple[str, str]:
    """(reasoning, content) of a whole output: the text inside <think> ... </think> (opened by the prompt, or by
    the output after any leading whitespace) is reasoning, the rest content."""
    if not starts_in_reasoning:
        if not text.lstrip().startswith("<think>"):
            return "", text
        text = text.lstrip()[len("<think>"):]
    head, tag, tail = text.partition("</think>")
    return head, tail if tag else ""


def test_reasoning_splitter_any_chunking_matches_the_whole_text():
    rng = random.Random(11)
    pieces = [" ", "\n", "  \n ", "<think>", "</think>", "<thi", "nk>", "</th", "hmm", "x y", "é🙂", "<", ">"]
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        starts = rng.random() < 0.3
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))) if len(text) > 1 else []
        r = ReasoningSplitter(starts)
        parts = [r.push(text[a:b]) for a, b in zip([0, *cuts], [*cuts, len(text)])] + [r.push("", final=True)]
        assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == _split_reference(text, starts)


def test_reasoning_splitter_reads_leading_whitespace_once():
    """10,000 pushes of 32 spaces before anything else: the whole run was joined and stripped again on every
    push (~1 s here, 8.75 s for 30,000); now each push reads its own text."""
    r = ReasoningSplitter(starts_in_reasoning=False)
    start = time.perf_counter()
    assert all(r.push(" " * 32) == ("", "") for _ in range(10_000))
    assert time.perf_counter() - start < 0.3
    assert r.push("<think>a</think>b", final=True) == ("a", "b")


def _limits(**kw):
    return Limits(**{"max_model_len": 64, "vocab_size": 151936, "max_num_speculative_tokens": 2,
                     "max_stop_strings": 2, "max_stop_string_length": 8, **kw})


INVALID = [
    ({}, "input"),
    ({"text": ""}, "text"),
    ({"token_ids": []}, "token_ids"),
    ({"chat": []}, "chat.messages"),
    ({"chat": [ChatMessage("robot", "hi")]}, "chat.messages[0].role"),
    ({"token_ids": [151936]}, "token_ids"),
    ({"text": "x" * 5000}, "text"),
    ({"token_ids": [1] * 60, "max_new_tokens": 10}, "stopping.max_new_tokens"),
    ({"max_new_tokens": 0}, "stopping.max_new_tokens"),
    ({"max_new_tokens": 3, "min_new_tokens": 4}, "stopping.min_new_tokens"),
    ({"sampling": {"temperature": float("nan")}}, "sampling.temperature"),
    ({"sampling": {"temperature": -1.0}}, "sampling.temperature"),
    ({"sampling": {"top_p": 0.0}}, "sampling.top_p"),
    ({"sampling": {"top_p": 1.5}}, "sampling.top_p"),
    ({"sampling": {"top_k": -1}}, "sampling.top_k"),
    ({"sampling": {"min_p": 1.5}}, "sampling.min_p"),
    ({"sampling": {"repetition_penalty": 0.0}}, "sampling.repetition_penalty"),
    ({"sampling": {"presence_penalty": 3.0}}, "sampling.presence_penalty"),
    ({"sampling": {"frequency_penalty": -2.5}}, "sampling.frequency_penalty"),
    ({"stop_strings": ["a", "b", "c"]}, "stopping.stop_strings"),
    ({"stop_strings": ["a" * 9]}, "stopping.stop_strings[0]"),
    ({"stop_token_ids": [200000]}, "stopping.stop_token_ids"),
    ({"stop_token_ids": list(range(1025))}, "stopping.stop_token_ids"),  # over MAX_STOP_TOKEN_IDS
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"num_speculative_tokens": 3}, "num_speculative_tokens"),
    ({"request_id": "r" * 300}, "request_id"),
]


@pytest.mark.parametrize("fields,name", INVALID, ids=[n for _, n in INVALID])
def test_validation_names_the_field(text, fields, name):
    spec = GenerateSpec(**{"token_ids": [1, 2, 3], **fields}) if not {"text", "chat", "token_ids"} & set(fields) \
        and fields != {} else GenerateSpec(**fields)
    with pytest.raises(ValueError) as e:
        prepare(spec, _limits(), text)
    assert str(e.value).startswith(name + ": "), str(e.value)  # every message: `field: why`


def test_prepare_defaults(text):
    p = prepare(GenerateSpec(text="Hello"), _limits(default_sampling={"temperature": 0.7, "top_k": 20}), text)
    assert p.add.prompt_token_ids == text.encode("Hello")
    assert p.add.stopping.max_new_tokens == 64 - len(p.add.prompt_token_ids)
    assert (p.add.sampling.temperature, p.add.sampling.top_k, p.add.sampling.top_p) == (0.7, 20, 1.0)
    assert p.add.num_speculative_tokens == 2 and p.request_id


def test_priority_and_logit_bias_reach_the_worker_request(text):
    """The proto's fields through parse_generate and prepare: what the worker's scheduler and sampler get."""
    from qnext.rpc import convert
    req = convert.request(token_ids=[1, 2, 3], priority=-3, logit_bias={9: 2.5, 4: -100.0})
    p = prepare(convert.parse_generate(req), _limits(priority_scheduling=True), text)
    assert p.add.priority == -3 and p.add.sampling.logit_bias == ((4, -100.0), (9, 2.5))
    assert prepare(GenerateSpec(token_ids=[1]), _limits(), text).add.priority == 0
    with pytest.raises(ValueError, match=r"^priority: must be 0 unless the server runs with --scheduling-policy"):
        prepare(convert.parse_generate(req), _limits(), text)  # as vLLM: fcfs servers refuse a priority


def test_reasoning_budget_and_prompt_logprobs_reach_the_worker_request(text):
    """max_reasoning_tokens becomes the worker's budget with the `</think>` id only when the prompt opened a think
    block; prompt_logprobs turns the prefix cache off for the request; a default of 0 is the remaining context."""
    from qnext.rpc import convert
    think = text.encode("<|im_start|>assistant\n<think>\n", allow_special_tokens=True)
    assert text.starts_in_reasoning(think)
    req = convert.request(token_ids=think, max_reasoning_tokens=5, prompt_logprobs=3)
    p = prepare(convert.parse_generate(req), _limits(default_max_new_tokens=0), text)
    assert (p.add.stopping.max_reasoning_tokens, p.add.stopping.reasoning_end_id) == (5, text.think_end_id)
    assert p.add.prompt_logprobs == 3 and not p.add.use_prefix_cache
    assert p.add.stopping.max_new_tokens == 64 - len(think)  # the remaining context
    plain = prepare(convert.parse_generate(convert.request(token_ids=[1, 2], max_reasoning_tokens=5)), _limits(),
                    text)
    assert plain.add.stopping.max_reasoning_tokens is None and plain.add.prompt_logprobs is None
    assert plain.add.use_prefix_cache
