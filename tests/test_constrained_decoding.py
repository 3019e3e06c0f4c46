"""Constrained decoding in the engine (worker/grammar.py + the sampler's mask): outputs of a random-weight model
follow a JSON schema (checked by the jsonschema package), a regex (Python's re) and an EBNF grammar; MTP keeps
constrained greedy output exact; a Thinking prompt is free until </think>; nothing leaks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer

from qnext.worker.engine import Engine
from qnext.worker.grammar import GrammarCompiler
from qnext.worker.sampler import allowed_mask
from qnext.worker.tiny import align_mtp_with_target, make_checkpoint, tiny_config
from qnext.worker.tokenizer_files import ENDOFTEXT_ID, IM_END_ID, THINK_END_ID, VOCAB_SIZE
from qnext.worker.types import EngineConfig, GenerationRequest, SamplingParams, StoppingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                   "active": {"type": "boolean"}},
                  "required": ["name", "active"], "additionalProperties": False},
    },
    "required": ["id", "kind", "owner"],
    "additionalProperties": False,
}
EOS = {IM_END_ID, ENDOFTEXT_ID}


@pytest.fixture(scope="module")
def compiler(default_ckpt) -> GrammarCompiler:
    return GrammarCompiler(default_ckpt / "tokenizer.json", VOCAB_SIZE, (IM_END_ID, ENDOFTEXT_ID))


@pytest.fixture(scope="module")
def engine(default_ckpt):
    e = Engine(EngineConfig(model=str(default_ckpt), seed=0, max_num_seqs=32, cache_memory=256 << 20))
    yield e
    assert not e.has_unfinished() and not e.scheduler.has_unfinished()
    e.reset_prefix_cache()
    assert e.cache_manager.is_full()


def run(engine: Engine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return out


def text_of(tokenizer: Tokenizer, ids: list[int]) -> str:
    assert ids and ids[-1] in EOS, f"no EOS: the grammar did not complete ({len(ids)} tokens)"
    return tokenizer.decode(ids[:-1], skip_special_tokens=False)


def test_100_seeded_sampled_requests_follow_a_json_schema(engine, compiler, default_ckpt):
    grammar = compiler.compile("response_format.json_schema", "json_schema", json.dumps(SCHEMA))
    prompt = Tokenizer.from_file(str(default_ckpt / "tokenizer.json")).encode("Describe a pet as JSON:").ids
    requests = [GenerationRequest(f"j{i}", prompt, SamplingParams(temperature=1.0, seed=i),
                                  StoppingParams(max_new_tokens=160), grammar=grammar) for i in range(100)]
    out = run(engine, requests)
    tok = Tokenizer.from_file(str(default_ckpt / "tokenizer.json"))
    kinds = set()
    for rid, ids in out.items():
        doc = json.loads(text_of(tok, ids))
        jsonschema.validate(doc, SCHEMA)
        kinds.add(doc["kind"])
    assert len(kinds) >= 2  # sampled, not one fixed answer
    assert len({tuple(ids) for ids in out.values()}) > 90


def test_regex_and_ebnf_requests(engine, compiler, default_ckpt):
    tok = Tokenizer.from_file(str(default_ckpt / "tokenizer.json"))
    regex = r"(yes|no), [0-9]{2,4}-[a-z]{3}"
    ebnf = 'root ::= "[" num ("," num)* "]"\nnum ::= [1-9] [0-9]?'
    grammars = {"regex": compiler.compile("response_format.regex", "regex", regex),
                "grammar": compiler.compile("response_format.grammar", "grammar", ebnf)}
    requests = [GenerationRequest(f"{kind}{i}", [9707, 11, 1879], SamplingParams(temperature=1.0, seed=i),
                                  StoppingParams(max_new_tokens=64), grammar=g)
                for kind, g in grammars.items() for i in range(8)]
    out = run(engine, requests)
    for rid, ids in out.items():
        text = text_of(tok, ids)
        pattern = regex if rid.startswith("regex") else r"\[[1-9][0-9]?(,[1-9][0-9]?)*\]"
        assert re.fullmatch(pattern, text), (rid, text)


def test_bad_grammars_name_the_field(compiler):
    cases = [("response_format.json_schema", "json_schema", "{not json"),
             ("response_format.json_schema", "json_schema", "[1, 2]"),
             ("response_format.json_schema", "json_schema", '{"type": 3}'),
             ("response_format.regex", "regex", "[a-z"),
             ("response_format.grammar", "grammar", "root ::= (")]
    for field, kind, source in cases:
        with pytest.raises(ValueError, match=f"^{re.escape(field)}: "):
            compiler.compile(field, kind, source)


def test_compiled_grammars_are_cached_and_matchers_independent(compiler):
    grammar = compiler.compile("g", "regex", "ab|ac")
    a, b = compiler.matcher(grammar), compiler.matcher(grammar)
    assert len(compiler._compiled) >= 1 and grammar in compiler._compiled
    ids = compiler.tokenizer.tokenize_str("ab")
    assert a.consume_tokens(ids) and a.is_accepting() and not b.is_accepting()


def test_allowed_mask_unpacks_the_bitmask(compiler):
    grammar = compiler.compile("g", "regex", "(cat|dog)")
    mask = allowed_mask([compiler.matcher(grammar).compute_bitmask(), None], VOCAB_SIZE, torch.device("cpu"))
    allowed = mask[0].nonzero().flatten().tolist()
    assert allowed and all(re.fullmatch("(c|ca|cat|d|do|dog)", compiler.tokenizer.decode_str([t])) for t in allowed)
    assert bool(mask[1].all())


@pytest.fixture(scope="module")
def aligned_ckpt(tmp_path_factory) -> Path:
    """The real tokenizer and an MTP head that drafts exactly the target's prediction: every draft is accepted."""
    d = make_checkpoint(tmp_path_factory.mktemp("grammar_aligned"), tiny_config(), seed=5)
    align_mtp_with_target(d)
    return d


@pytest.mark.parametrize("ckpt_name", ["default_ckpt", "aligned_ckpt"])
def test_mtp_keeps_constrained_greedy_output_exact(request, compiler, ckpt_name):
    ckpt = request.getfixturevalue(ckpt_name)
    grammar = compiler.compile("g", "json_schema", json.dumps(SCHEMA))
    outs, drafted = [], []
    for k in (0, 2):
        e = Engine(EngineConfig(model=str(ckpt), seed=0, num_speculative_tokens=k, dtype="float32",
                                speculative_draft_length="fixed", cache_memory=128 << 20))
        reqs = [GenerationRequest(f"m{i}", [100 + i, 200, 300 + i], SamplingParams(temperature=0.0),
                                  StoppingParams(max_new_tokens=120), grammar=grammar) for i in range(6)]
        outs.append(run(e, reqs))
        drafted.append((e.spec.counters.num_drafted, e.spec.counters.num_accepted))
        assert e.spec.num_tracked == 0
    assert outs[0] == outs[1]
    assert drafted[1][0] > 0
    if ckpt_name == "aligned_ckpt":  # the multi-accept path ran under the grammar
        assert drafted[1][1] > 0.9 * drafted[1][0]
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    for ids in outs[0].values():
        jsonschema.validate(json.loads(text_of(tok, ids)), SCHEMA)


def test_a_thinking_prompt_is_free_until_think_end(default_ckpt, compiler, monkeypatch):
    """The constraint starts after </think>: forced here at the 4th token (random weights never pick it)."""
    e = Engine(EngineConfig(model=str(default_ckpt), seed=0, dtype="float32", cache_memory=128 << 20))
    compute_logits = e.runner.model.compute_logits

    def think_end_at_step_3(h: torch.Tensor) -> torch.Tensor:
        logits = compute_logits(h)
        r = e.scheduler.get("t")
        if r is not None and len(r.output_token_ids) == 3:
            logits[:, THINK_END_ID] = 1e4
        return logits

    monkeypatch.setattr(e.runner.model, "compute_logits", think_end_at_step_3)
    grammar = compiler.compile("g", "regex", "(alpha|beta)")
    out = run(e, [GenerationRequest("t", [151644, 77091, 198, 151667, 198], SamplingParams(temperature=0.0),
                                    StoppingParams(max_new_tokens=30), grammar=grammar,
                                    grammar_starts_after=THINK_END_ID)])["t"]
    assert out[3] == THINK_END_ID and out[-1] in EOS
    tok = Tokenizer.from_file(str(default_ckpt / "tokenizer.json"))
    assert tok.decode(out[4:-1]) in ("alpha", "beta")
    assert not re.fullmatch("(alpha|beta)", tok.decode(out[:3]))  # before </think>: free tokens


def test_constrained_requests_refuse_ignore_eos(engine, compiler):
    grammar = compiler.compile("g", "json_object", "")
    for stopping in (StoppingParams(ignore_eos=True), StoppingParams(max_new_tokens=8, min_new_tokens=2)):
        with pytest.raises(ValueError, match="^grammar: cannot be combined with ignore_eos"):
            engine.add_request(GenerationRequest("x", [1, 2, 3], stopping=stopping, grammar=grammar))
